"""The run directory: the one place that knows its format.

A run directory holds ``model.safetensors`` (weights, timm names) and ``model.json``
(:func:`make_run_meta`: format, architecture, classes, data config, how it was made), and from
``finetune train`` also ``metrics.json``, ``log.csv``, ``curves.png``, ``confusion.png``,
``recipe.yaml``, ``skipped.txt``, ``checkpoints/`` and, with LoRA, ``adapter/``. The
architecture comes from a timm name (``architecture``) or, for any other ``nn.Module``
(torchvision, your own), from a builder ref ``"package.module:callable"`` plus JSON kwargs
(``builder``, ``builder_kwargs``; see :mod:`finetune.models.builders`); a converted model adds its
``separable_plan``. :func:`save_run` writes one from Python, :func:`load_model` reads any of them
back (no SVD is repeated). Every write is atomic (:mod:`finetune.io`).

>>> import tempfile, torch, timm
>>> net = timm.create_model("mobilenetv3_small_050", num_classes=3).eval()
>>> out = save_run(net, tempfile.mkdtemp() + "/run", classes=["a", "b", "c"], input_size=64)
>>> model, cfg = load_model(out)
>>> cfg["input_size"], model.pretrained_cfg["label_names"], read_run_meta(out)["status"]
((3, 64, 64), ['a', 'b', 'c'], 'complete')
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import timm
import torch
from safetensors.torch import load_file

from finetune.convert import apply_plan
from finetune.errors import FinetuneError
from finetune.io import model_state_dict, read_json, save_weights, write_json, write_text
from finetune.models.builders import build_model, builder_ref, check_builder_kwargs, is_builder_ref
from finetune.models import create_model, default_data_config
from finetune.models.state import load_checked
from finetune.models.weights import check_model_name, model_source
from finetune.version import __version__

RUN_META = "model.json"
RUN_WEIGHTS = "model.safetensors"
RUN_FORMAT = "finetune-vision/1"
RUN_RECIPE = "recipe.yaml"
RUN_METRICS = "metrics.json"
RUN_LOG = "log.csv"
RUN_SKIPPED = "skipped.txt"
RUN_ADAPTER = "adapter"
RUN_CHECKPOINTS = "checkpoints"
#: The elastic agent's run id of the job that created the folder (a restarted worker group may start it over).
RUN_JOB = ".elastic-job"
#: timm's / the Hub's model-folder files (:mod:`finetune.hub`): ``timm.create_model("local-dir:RUN", pretrained=True)``
RUN_TIMM_CONFIG = "config.json"
RUN_CARD = "README.md"
#: the self-contained HTML page of a run or an evaluation (:mod:`finetune.report`)
RUN_REPORT = "report.html"
#: Everything ``finetune train`` writes into a run directory (``--overwrite`` removes exactly these).
RUN_ARTEFACTS = (RUN_WEIGHTS, RUN_META, RUN_METRICS, RUN_LOG, "confusion.png", "curves.png", RUN_RECIPE,
                 RUN_SKIPPED, RUN_CHECKPOINTS, RUN_ADAPTER, RUN_JOB, RUN_TIMM_CONFIG, RUN_CARD, RUN_REPORT, "eval-*")
#: The columns of ``log.csv``, one row per epoch.
LOG_COLUMNS = (
    "epoch", "phase", "lr_head", "lr_body", "train_loss", "train_top1",
    "val_loss", "val_top1", "val_macro_f1", "epoch_seconds", "train_images_per_s",
)


# --------------------------------------------------------------------------- reading

def is_run_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a run directory (holds ``model.json``)."""
    return (Path(path) / RUN_META).is_file()


def read_run_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``model.json`` of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise FinetuneError(f"run directory `{run_dir}` does not exist; pass the --out folder of `finetune train`")
    if not is_run_dir(run_dir):
        raise FinetuneError(
            f"`{run_dir}` is not a run directory (no {RUN_META}); pass the --out folder of `finetune train`"
        )
    try:
        meta = read_json(run_dir / RUN_META)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"`{run_dir / RUN_META}` is not valid JSON ({exc}); the run directory is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FinetuneError(f"`{run_dir / RUN_META}` has format `{found}`, expected `{RUN_FORMAT}`")
    missing = [key for key in ("architecture", "classes", "data_config") if key not in meta]
    if missing:
        raise FinetuneError(f"`{run_dir / RUN_META}` lacks {', '.join(missing)}; the run directory is damaged")
    return meta


def load_model(
    name_or_run: str | os.PathLike,
    weights: str | os.PathLike = "auto",
    num_classes: int | None = None,
    img_size: int | None = None,
    **timm_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained run directory, or a timm model with pretrained weights (:func:`~finetune.models.create_model`).

    Args:
        name_or_run: a run directory (``finetune train``/``convert``/:func:`save_run`), or a timm name.
        weights, num_classes, timm_kwargs: for a timm name (see :func:`~finetune.models.create_model`);
            ignored for run directories.
        img_size: input size for the returned data config (the model itself accepts any size).

    Returns:
        ``(model, data_config)`` in eval mode on the CPU; for a run directory
        ``model.pretrained_cfg["label_names"]`` holds the class names.

    >>> model, cfg = load_model("mobilenetv2_100", weights="none", num_classes=3)
    >>> cfg["input_size"], model.num_classes
    ((3, 224, 224), 3)
    """
    if is_run_dir(name_or_run):
        return load_run(Path(name_or_run), img_size)
    name = str(name_or_run)
    if model_source(name) is None and (os.sep in name or Path(name).exists()):
        read_run_meta(name)  # raises the "not a run directory" message
    return create_model(name, weights=weights, num_classes=num_classes, img_size=img_size, **timm_kwargs)


def _run_builder(meta: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The builder ref and kwargs of a run's ``model.json`` (``None`` for a timm architecture)."""
    builder = meta.get("builder")
    if builder is None and is_builder_ref(meta.get("architecture")):
        builder = meta["architecture"]  # a run that lost its `builder` key but names one as architecture
    return builder, dict(meta.get("builder_kwargs") or {})


def _describe(meta: Mapping[str, Any]) -> str:
    builder, kwargs = _run_builder(meta)
    if builder is None:
        return f"architecture `{meta['architecture']}`"
    return f"builder `{builder}`" + (f" with {json.dumps(kwargs)}" if kwargs else "")


def _build_run_model(meta: Mapping[str, Any]) -> torch.nn.Module:
    """A fresh model of a run's architecture (timm name or builder), with its separable plan applied."""
    builder, kwargs = _run_builder(meta)
    if builder is not None:
        model = build_model(builder, kwargs)
    else:
        model = timm.create_model(meta["architecture"], pretrained=False, num_classes=len(meta["classes"]))
    if meta.get("separable_plan"):  # a converted run: rebuild its layers, no SVD; weights come next
        model = apply_plan(model, meta["separable_plan"])
    return model


def load_run(run_dir: str | os.PathLike, img_size: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a run directory (architecture or builder, separable plan, weights checked
    strictly) and its data config; ``model.pretrained_cfg["label_names"]`` holds the class names."""
    run_dir = Path(run_dir).expanduser()
    meta = read_run_meta(run_dir)
    classes = list(meta["classes"])
    weights_file = run_dir / RUN_WEIGHTS
    if not weights_file.is_file():
        raise FinetuneError(f"`{weights_file}` is missing; the run did not finish saving a model")
    model = _build_run_model(meta)
    load_checked(model, load_file(weights_file), f"`{weights_file}`", _describe(meta),
                 fix="the weights and model.json come from different runs")
    model.eval()
    data_config = dict(meta["data_config"])
    data_config["input_size"] = tuple(data_config["input_size"])
    data_config["mean"], data_config["std"] = tuple(data_config["mean"]), tuple(data_config["std"])
    if img_size is not None:
        data_config["input_size"] = (3, int(img_size), int(img_size))
    base_cfg = getattr(model, "pretrained_cfg", None)
    model.pretrained_cfg = {**(base_cfg if isinstance(base_cfg, dict) else {}), **data_config,
                            "label_names": classes, "num_classes": len(classes),
                            "weights_source": f"the trained run `{run_dir}`"}
    return model, data_config


# --------------------------------------------------------------------------- writing

def make_run_meta(*, architecture: str, classes: Sequence[str], data_config: Mapping[str, Any],
                  builder: str | None = None, builder_kwargs: Mapping[str, Any] | None = None,
                  separable_plan: Sequence[Mapping[str, Any]] | None = None, weights_source: str | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``model.json`` of a finished run (``extra`` adds keys, never replaces these)."""
    meta: dict[str, Any] = {
        "format": RUN_FORMAT,
        "architecture": architecture,
        "num_classes": len(classes),
        "classes": list(classes),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "weights_source": weights_source,
    }
    if builder is not None:
        meta["builder"] = builder
        meta["builder_kwargs"] = check_builder_kwargs(builder_kwargs, builder)
    if separable_plan:
        meta["separable_plan"] = [dict(entry) for entry in separable_plan]
    meta.update({k: v for k, v in dict(extra or {}).items() if k not in meta})
    meta.setdefault("versions", {"finetune-vision": __version__, "torch": torch.__version__,
                                 "timm": timm.__version__, "python": platform.python_version()})
    meta.setdefault("created", datetime.now().isoformat(timespec="seconds"))
    meta.setdefault("status", "complete")
    return meta


def write_meta(run_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Atomically (re)write ``model.json``: the one writer of that file."""
    write_json(Path(run_dir) / RUN_META, dict(meta))


def update_meta(run_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Change some keys of an existing run's ``model.json``; returns the new contents."""
    meta = {**read_run_meta(run_dir), **changes}
    write_meta(run_dir, meta)
    return meta


def weights_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """Class names and preprocessing in the safetensors header too, for users of plain timm."""
    return {"format": "pt", "architecture": meta["architecture"], "classes": json.dumps(meta["classes"]),
            "data_config": json.dumps(meta["data_config"])}


def write_weights(run_dir: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write ``model.safetensors``, with class names and preprocessing in its header."""
    save_weights(dict(state), Path(run_dir) / RUN_WEIGHTS, weights_metadata(dict(meta)))


def write_run(out_dir: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Atomically write ``model.safetensors`` then ``model.json`` (a reader never sees a half run)."""
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weights(out_dir, state, meta)
    write_meta(out_dir, meta)
    return out_dir


def write_log(rows: Sequence[Mapping[str, Any]], run_dir: str | os.PathLike) -> None:
    """``log.csv``: one row per epoch, columns :data:`LOG_COLUMNS`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(Path(run_dir) / RUN_LOG, buffer.getvalue())


def _classes(classes: Sequence[str] | int) -> list[str]:
    if isinstance(classes, int) and not isinstance(classes, bool):
        if classes < 1:
            raise FinetuneError(f"classes: `{classes}` must be at least 1 (or a list of class names)")
        return [f"class_{i}" for i in range(classes)]
    if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
        raise FinetuneError(f"classes must be a non-empty list of class names (or their count), got {classes!r}")
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        dup = next(c for c in names if names.count(c) > 1)
        raise FinetuneError(f"classes: `{dup}` appears twice; class names must be unique")
    return names


@torch.no_grad()
def _check_rebuilds(model: torch.nn.Module, rebuilt: torch.nn.Module, meta: Mapping[str, Any]) -> None:
    """The rebuilt model gives the model's logits (one class per name) on a random batch."""
    size = tuple(meta["data_config"]["input_size"])
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    try:
        expected = rebuilt.eval()(x)
    except Exception as exc:
        raise FinetuneError(f"the model rebuilt from {_describe(meta)} fails on a (2, {', '.join(map(str, size))}) "
                            f"input ({type(exc).__name__}: {exc}); pass the input_size it takes") from exc
    n = len(meta["classes"])
    if not isinstance(expected, torch.Tensor) or tuple(expected.shape) != (2, n):
        shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
        raise FinetuneError(f"the model returns {shape} for 2 images but {n} classes were given; "
                            "pass one class name per output")
    param = next(model.parameters(), None)
    was_training = model.training
    try:
        model.eval()
        got = model(x.to(param.device, param.dtype) if param is not None and param.is_floating_point() else x)
    finally:
        model.train(was_training)
    err = float((got.detach().float().cpu() - expected).norm() / expected.norm().clamp_min(1e-12))
    tol = 1e-3 if param is None or param.dtype == torch.float32 else 2e-2
    if not err <= tol:
        raise FinetuneError(
            f"{_describe(meta)} does not rebuild this model: same weights, but outputs differ (relative error "
            f"{err:.2g}), e.g. a layer without weights was replaced after building; make the builder build the "
            "final model (or pass verify=False)")


def save_run(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    classes: Sequence[str] | int,
    builder: str | Callable[..., Any] | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    architecture: str | None = None,
    input_size: int | Sequence[int] | None = None,
    data_config: Mapping[str, Any] | None = None,
    separable_plan: Sequence[Mapping[str, Any]] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write ``model`` as a run directory that :func:`load_model`, ``finetune eval``/``predict``/``convert``
    and ``finetune train --model RUN`` accept; returns its path.

    Args:
        model: any image classifier ``nn.Module`` (trained, and possibly converted by
            :func:`~finetune.convert.convert_to_separable`; its ``separable_plan`` is recorded).
        classes: the class names, one per output logit (or their count: ``class_0``, ...).
        builder: for a model that is not a timm model, how to build it again: a ref
            ``"package.module:callable"`` or the function/class itself (defined in an importable
            module, not ``__main__``); see :mod:`finetune.models.builders`. It is called again at load
            time, so give kwargs that build the architecture without downloading weights.
        builder_kwargs: JSON-able keyword arguments for the builder (e.g. ``{"num_classes": 10}``).
        architecture: timm name, when ``builder`` is not given (default: the timm model's own).
        input_size, data_config: preprocessing at eval/predict time. A timm model starts from its
            ``pretrained_cfg``; any other from :data:`DEFAULT_DATA_CONFIG` (ImageNet mean/std,
            224 px, bilinear, ``crop_pct`` 1.0); ``data_config`` overrides keys, ``input_size``
            (an int or ``(3, H, W)``) the size.
        separable_plan: default ``model.separable_plan`` (set by the converter), if any.
        extra_meta: more keys for ``model.json`` (the ones above win).
        overwrite: replace a run already in ``out_dir``.
        verify: rebuild the model from the builder/timm name + plan, load the weights strictly and
            compare its outputs with ``model``'s on a random batch, so a run that saves also reloads.

    >>> import torch, torchvision, finetune                                            # doctest: +SKIP
    >>> net = torchvision.models.resnet18(num_classes=10)                               # doctest: +SKIP
    >>> sep = finetune.convert_to_separable(net, macs=0.4, example_input=torch.randn(1, 3, 64, 64))  # doctest: +SKIP
    >>> finetune.save_run(sep, "runs/mine-sep", classes=10, input_size=64,             # doctest: +SKIP
    ...                   builder="torchvision.models:resnet18", builder_kwargs={"num_classes": 10})
    >>> model, cfg = finetune.load_model("runs/mine-sep")   # builder + plan + weights, no SVD  # doctest: +SKIP
    """
    if not isinstance(model, torch.nn.Module):
        raise FinetuneError(f"save_run needs a torch.nn.Module, got {type(model).__name__}")
    out_dir = Path(out_dir).expanduser()
    if not overwrite and any((out_dir / name).exists() for name in (RUN_META, RUN_WEIGHTS)):
        raise FinetuneError(f"`{out_dir}` already holds a run; choose another directory or pass overwrite=True")
    names = _classes(classes)
    ref = builder_ref(builder) if builder is not None else None
    if ref is None:
        if builder_kwargs:
            raise FinetuneError("builder_kwargs without builder: pass builder='package.module:callable' too")
        cfg = getattr(model, "pretrained_cfg", None)
        architecture = architecture or (cfg.get("architecture") if isinstance(cfg, dict) else None)
        if not architecture:
            raise FinetuneError(
                f"save_run cannot tell how to rebuild a `{type(model).__name__}`: pass builder='package.module:"
                "callable' (the function or class that builds it, e.g. 'torchvision.models:resnet18') with "
                "builder_kwargs, or architecture= a timm name")
        check_model_name(architecture)
    plan = getattr(model, "separable_plan", None) if separable_plan is None else separable_plan
    config = default_data_config(model, input_size, data_config)
    meta = make_run_meta(architecture=architecture or ref, classes=names, data_config=config, builder=ref,
                         builder_kwargs=builder_kwargs, separable_plan=plan,
                         weights_source="saved with finetune.save_run", extra=extra_meta)
    state = model_state_dict(model)
    if verify:
        rebuilt = _build_run_model(meta)
        load_checked(rebuilt, state, f"the weights of this `{type(model).__name__}`", _describe(meta),
                     fix="make the builder and its kwargs build this architecture")
        _check_rebuilds(model, rebuilt, meta)
    return write_run(out_dir, state, meta)
