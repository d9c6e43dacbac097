"""``finetune convert``: turn a trained run (or a timm model, or any model a builder makes) into a
depthwise-separable run.

Loads the model, converts it with :func:`finetune.convert.convert_to_separable`, optionally
re-estimates BatchNorm statistics on calibration images, measures teacher vs student latency and
writes a run directory that ``finetune eval``/``predict`` and :func:`finetune.load_model` accept
(the plan is stored in ``model.json``, so reloading repeats no SVD).

>>> from finetune.tasks.convert import convert_run                                   # doctest: +SKIP
>>> result = convert_run("runs/photos", "runs/photos-sep", macs=0.4, calib_data="~/photos")  # doctest: +SKIP
>>> result = convert_run("torchvision.models:resnet18", "runs/r18-sep", macs=0.4,         # doctest: +SKIP
...                      builder_kwargs={"num_classes": 10}, weights="r18.safetensors", classes=["cat", "dog", ...])

A source that is a builder ref (``package.module:callable``, see :mod:`finetune.models.builders`) is built
with ``builder_kwargs``, gets its dense weights from ``weights`` (a ``.safetensors``/``.pth`` state
dict; ``auto``/``none`` keep what the builder returns), and the converted run records the ref, so
``finetune eval``/``predict`` rebuild it the same way.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from torch.utils.data import DataLoader

from finetune.models.builders import build_model, check_builder_kwargs, is_builder_ref, load_weights_into
from finetune.io import model_state_dict, write_json
from finetune.convert import convert_to_separable, layer_output_errors, reestimate_batchnorm, refit_pointwise
from finetune.convert.latency import compare_latency
from finetune.data import eval_loader, list_images
from finetune.distill import compare_outputs
from finetune.errors import FinetuneError
from finetune.models import default_data_config
from finetune.rundir import is_run_dir, load_model, make_run_meta, read_run_meta, write_run


def _class_names(n: int, classes: Sequence[str] | None, source: str) -> list[str]:
    if classes is not None:
        if len(classes) != n:
            raise FinetuneError(f"{len(classes)} class names given but `{source}` has {n} outputs; "
                                "pass one name per output (--classes)")
        return [str(c) for c in classes]
    return list(timm.data.ImageNetInfo().label_names()) if n == 1000 else [f"class_{i}" for i in range(n)]


def _load_builder_teacher(ref: str, weights: str, builder_kwargs: Mapping[str, Any] | None,
                          classes: Sequence[str] | None, img_size: int | None
                          ) -> tuple[torch.nn.Module, dict, dict[str, Any]]:
    kwargs = check_builder_kwargs(builder_kwargs, ref)
    if weights in ("offline", "hub"):
        raise FinetuneError(f"--weights {weights} is for timm names; for builder `{ref}` pass --weights PATH to the "
                            "dense model's .safetensors/.pth state dict (or none: keep what the builder returns)")
    model = build_model(ref, kwargs)
    what = f"builder `{ref}`" + (f" with {json.dumps(kwargs)}" if kwargs else "")
    source = "the builder's own weights"
    if weights not in ("auto", "none"):
        source = load_weights_into(model, weights, what)
    model.eval()
    data_config = default_data_config(model, img_size)
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, *data_config["input_size"]))
        except Exception as exc:
            raise FinetuneError(f"{what} fails on a {tuple(data_config['input_size'])} image "
                                f"({type(exc).__name__}: {exc}); pass the --img-size it takes") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FinetuneError(f"{what} returns {shape}, not (batch, classes) logits; convert needs a classifier")
    names = _class_names(out.shape[1], classes, ref)
    meta = {"architecture": ref, "builder": ref, "builder_kwargs": kwargs, "classes": names,
            "weights_source": source}
    return model, data_config, meta


def _load_teacher(source: str, weights: str, num_classes: int | None, img_size: int | None,
                  builder_kwargs: Mapping[str, Any] | None = None, classes: Sequence[str] | None = None,
                  ) -> tuple[torch.nn.Module, dict, dict[str, Any]]:
    """The model to convert, its data config, and the run metadata to carry over."""
    if is_run_dir(source):
        if builder_kwargs is not None or classes is not None:
            raise FinetuneError(f"`{source}` is a run directory: it carries its own architecture and classes; "
                                "--builder-kwargs and --classes are for a timm name or a builder ref")
        meta = read_run_meta(source)
        model, data_config = load_model(source, img_size=img_size)
        return model, data_config, meta
    if is_builder_ref(source):
        if num_classes is not None:
            raise FinetuneError(f"--num-classes is for timm names; for builder `{source}` put the head size in "
                                "--builder-kwargs (e.g. '{\"num_classes\": 10}')")
        return _load_builder_teacher(source, weights, builder_kwargs, classes, img_size)
    if builder_kwargs is not None:
        raise FinetuneError(f"--builder-kwargs is for a builder ref source (`package.module:callable`), not `{source}`")
    if classes is not None and num_classes is None:
        num_classes = len(classes)
    model, data_config = load_model(source, weights=weights, num_classes=num_classes, img_size=img_size)
    n = model.num_classes
    meta = {"architecture": source, "classes": _class_names(n, classes, source), "num_classes": n,
            "weights_source": model.pretrained_cfg.get("weights_source")}
    return model, data_config, meta


def _calibration_loader(folder: str | os.PathLike, data_config: dict, images: int, seed: int) -> DataLoader:
    paths, skipped = list_images([folder])
    if not paths:
        raise FinetuneError(f"no readable images in calibration folder `{folder}`; pass a folder of images")
    random.Random(seed).shuffle(paths)
    return eval_loader(paths[:images], data_config, batch_size=32)


def _agreement(teacher: torch.nn.Module, student: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """How closely the student's logits follow the teacher's on real images (:func:`~finetune.distill.compare_outputs`)."""
    stats = compare_outputs(teacher, student, loader)
    return {"top1_agreement": stats["agreement"], "relative_logit_error": stats["relative_logit_error"],
            "images": stats["n"]}


def convert_run(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | str | None = None,
    energy: float | None = None,
    macs: float | None = None,
    form: str = "auto",
    objective: str = "accuracy",
    force: bool = False,
    latency_batch_size: int = 1,
    latency_memory_format: str = "contiguous",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    weights: str = "auto",
    num_classes: int | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    img_size: int | None = None,
    calib_data: str | os.PathLike | None = None,
    calib_images: int = 256,
    refit: bool = True,
    latency: bool = True,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert ``source`` (a run directory, a timm name or a builder ref) and write a run directory at ``out``.

    For a timm name or a builder ref, ``weights`` gives the dense weights and ``classes`` the class
    names (default ``class_0``... or the ImageNet names for 1000 outputs); a builder ref is called
    with ``builder_kwargs``.

    Returns the contents of ``out/convert.json``: the per-layer report, MACs/params totals
    (``torch.utils.flop_counter``), teacher-vs-student agreement on the calibration images and
    measured latency.
    """
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FinetuneError(f"output directory `{out}` already holds files; choose another --out or pass --overwrite")
    source = str(source)
    teacher, data_config, meta = _load_teacher(source, weights, num_classes, img_size, builder_kwargs, classes)
    input_size = tuple(data_config["input_size"])
    example = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        student = convert_to_separable(teacher, rank=rank, energy=energy, macs=macs, form=form,
                                       objective=objective, force=force, latency_batch_size=latency_batch_size,
                                       memory_format=latency_memory_format,
                                       example_input=example, include=include, exclude=exclude)
    report = student.conversion_report
    if report.nothing_converted:
        reason = "; ".join(report.messages) or "nothing worth converting: no dense k×k convolution qualifies"
        raise FinetuneError(f"`{meta['architecture']}`: {reason}")

    result: dict[str, Any] = {"source": source, "report": report.to_dict()}
    if calib_data is not None:
        loader = _calibration_loader(calib_data, data_config, calib_images, seed)
        batches = [images for images, _ in loader]  # replayed layer by layer by the refit
        errors = layer_output_errors(teacher, student, batches)
        for layer in result["report"]["layers"]:
            layer["output_error"] = errors.get(layer["name"])  # the layer's own error, on the teacher's input
        result["agreement_before_bn"] = _agreement(teacher, student, loader)
        if refit:  # least squares on the teacher's layer outputs, before BN re-estimation (order matters)
            refitted = refit_pointwise(teacher, student, batches)
            result["refit"] = {name: {"before": b, "after": a} for name, (b, a) in refitted.items()}
        reestimate_batchnorm(student, batches)
        result["agreement"] = _agreement(teacher, student, loader)
        result["calibration"] = {"folder": str(calib_data), "images": len(loader.dataset), "refit": refit}
    if latency:
        result["latency"] = compare_latency(teacher, student, input_size)

    run_meta = make_run_meta(
        architecture=meta["architecture"], classes=meta["classes"], data_config=data_config,
        builder=meta.get("builder"), builder_kwargs=meta.get("builder_kwargs"),
        separable_plan=student.separable_plan, weights_source=meta.get("weights_source"),
        extra={"converted_from": source,
               "conversion": {"macs_ratio": report.macs_ratio, "params_ratio": report.params_ratio,
                              "layers": len(report.converted), "bn_reestimated": calib_data is not None}})
    write_run(out, model_state_dict(student), run_meta)
    write_json(out / "convert.json", result)
    result["table"] = report.table()
    result["out"] = str(out)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """Human-readable lines for the CLI: the per-layer table, totals, agreement and latency."""
    lines = [result["table"]]
    if "agreement" in result:
        before, after = result["agreement_before_bn"], result["agreement"]
        steps = "least-squares refit + BatchNorm re-estimation" if result["calibration"]["refit"] else \
            "BatchNorm re-estimation"
        errors = [f"{layer['name']} {layer['output_error']:.3f}" for layer in result["report"]["layers"]
                  if layer.get("output_error") is not None]
        if errors:
            lines.append("per-layer output error on calibration images: " + ", ".join(errors))
        lines.append(
            f"teacher vs converted on {after['images']} calibration images: top-1 agreement "
            f"{before['top1_agreement']:.3f} -> {after['top1_agreement']:.3f} after {steps} "
            f"(relative logit error {before['relative_logit_error']:.3f} -> {after['relative_logit_error']:.3f})"
        )
    for row in result.get("latency", []):
        lines.append(
            f"latency batch {row['batch_size']:>2} {row['memory_format']:<13} teacher {row['teacher_ms']:8.1f} ms  "
            f"converted {row['student_ms']:8.1f} ms  speed-up {row['speedup']:.2f}x"
        )
    lines.append(f"wrote {result['out']}/model.safetensors, model.json, convert.json")
    return "\n".join(lines)
