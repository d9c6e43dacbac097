"""Build timm models with the right weights and data config, and reload trained runs.

>>> from finetune.models import load_model
>>> model, data_config = load_model("tf_efficientnet_lite0", weights="offline", num_classes=10)
>>> data_config["mean"], model.num_classes
((0.5, 0.5, 0.5), 10)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file

from finetune.checkpoint import read_json
from finetune.errors import FinetuneError
from finetune.weights import OFFLINE_MODELS, check_model_name, resolve_weights  # noqa: F401 (re-export)

#: The families this toolkit is built and tested for (any timm CNN loads, though).
FAMILY_PATTERNS = ("mobilenet*", "efficientnet*", "tf_efficientnet*")
RUN_META = "model.json"
RUN_WEIGHTS = "model.safetensors"
RUN_FORMAT = "finetune-vision/1"


def family_models() -> list[str]:
    """All timm names in the MobileNet / EfficientNet families.

    >>> "mobilenetv2_100" in family_models()
    True
    """
    return sorted(set(timm.list_models(list(FAMILY_PATTERNS))))


def is_run_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``finetune train`` (holds model.json)."""
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


def resolve_data_config(model: torch.nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's data config for ``model`` (mean, std, input size, interpolation, crop_pct)."""
    config = timm.data.resolve_data_config({}, model=model)
    if img_size is not None:
        config["input_size"] = (3, int(img_size), int(img_size))
    return dict(config)


def load_model(
    name_or_run: str | os.PathLike,
    weights: str | os.PathLike = "auto",
    num_classes: int | None = None,
    img_size: int | None = None,
    **timm_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Create a timm model with weights from the hub, a local file, the offline packages or nothing.

    Args:
        name_or_run: a timm model name, or a run directory written by ``finetune train``.
        weights: ``auto`` (offline if shipped, else hub), ``offline``, ``hub``, ``none`` or a path
            to a ``.safetensors`` / ``.pth`` file. Ignored for run directories.
        num_classes: size of a new classification head; ``None`` keeps the pretrained head
            (1000 ImageNet classes), as does ``1000``.
        img_size: input size for the returned data config (the model itself accepts any size).
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        ``(model, data_config)``; the model is in eval mode on the CPU. For a run directory
        ``model.pretrained_cfg["label_names"]`` holds the class names.

    >>> model, cfg = load_model("mobilenetv2_100", weights="none", num_classes=3)
    >>> cfg["input_size"], model.num_classes
    ((3, 224, 224), 3)
    """
    if is_run_dir(name_or_run):
        return _load_run(Path(name_or_run), img_size)
    name = str(name_or_run)
    if os.sep in name or Path(name).exists():
        read_run_meta(name)  # raises the "not a run directory" message
    check_model_name(name)
    plan = resolve_weights(name, weights)
    kwargs = dict(plan.create_kwargs())
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    kwargs.update(timm_kwargs)
    model = timm.create_model(name, **kwargs)
    if num_classes is not None and plan.pretrained and model.num_classes != 1000:
        _init_fresh_head(model)
    model.eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "weights_source": plan.description}
    return model, resolve_data_config(model, img_size)


def _init_fresh_head(model: torch.nn.Module) -> None:
    """Small-normal init for a new head on pretrained features.

    timm's EfficientNet/MobileNet init draws the classifier from U(±1/sqrt(num_classes)): with 10
    classes and 1280 pooled features that gives initial logits of magnitude ~10 and a first loss
    of ~15, which wrecks the first fine-tuning steps. std=0.01 (as in MAE/DeiT fine-tuning)
    starts at the uniform prediction.
    """
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)


def _load_run(run_dir: Path, img_size: int | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    meta = read_run_meta(run_dir)
    classes = list(meta["classes"])
    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=len(classes))
    if meta.get("separable_plan"):  # a converted run: rebuild its layers, no SVD; weights come next
        from finetune.convert import apply_plan

        model = apply_plan(model, meta["separable_plan"])
    weights_file = run_dir / RUN_WEIGHTS
    if not weights_file.is_file():
        raise FinetuneError(f"`{weights_file}` is missing; the run did not finish saving a model")
    state = load_file(weights_file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FinetuneError(
            f"`{weights_file}` does not match architecture `{meta['architecture']}` "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    model.eval()
    data_config = dict(meta["data_config"])
    data_config["input_size"] = tuple(data_config["input_size"])
    data_config["mean"], data_config["std"] = tuple(data_config["mean"]), tuple(data_config["std"])
    if img_size is not None:
        data_config["input_size"] = (3, int(img_size), int(img_size))
    model.pretrained_cfg = {**model.pretrained_cfg, **data_config, "label_names": classes, "num_classes": len(classes),
                            "weights_source": f"the trained run `{run_dir}`"}
    return model, data_config


def offline_model_names() -> list[str]:
    """Names whose ImageNet weights ship inside registry packages."""
    return list(OFFLINE_MODELS)
