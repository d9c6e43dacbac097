"""``finetune convert``: turn a trained run (or a timm model) into a depthwise-separable run.

Loads the model, converts it with :func:`finetune.convert.convert_to_separable`, optionally
re-estimates BatchNorm statistics on calibration images, measures teacher vs student latency and
writes a run directory that ``finetune eval``/``predict`` and :func:`finetune.load_model` accept
(the plan is stored in ``model.json``, so reloading repeats no SVD).

>>> from finetune.conversion import convert_run                                   # doctest: +SKIP
>>> result = convert_run("runs/photos", "runs/photos-sep", macs=0.4, calib_data="~/photos")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch.utils.data import DataLoader

from finetune import __version__
from finetune.checkpoint import model_state_dict, save_weights, weights_metadata, write_json
from finetune.convert import convert_to_separable, layer_output_errors, reestimate_batchnorm, refit_pointwise
from finetune.convert.latency import compare_latency
from finetune.data import eval_loader, list_images
from finetune.errors import FinetuneError
from finetune.models import RUN_FORMAT, RUN_META, RUN_WEIGHTS, is_run_dir, load_model, read_run_meta


def _load_teacher(source: str, weights: str, num_classes: int | None,
                  img_size: int | None) -> tuple[torch.nn.Module, dict, dict[str, Any]]:
    """The model to convert, its data config, and the run metadata to carry over."""
    if is_run_dir(source):
        meta = read_run_meta(source)
        model, data_config = load_model(source, img_size=img_size)
        return model, data_config, meta
    model, data_config = load_model(source, weights=weights, num_classes=num_classes, img_size=img_size)
    n = model.num_classes
    classes = (list(timm.data.ImageNetInfo().label_names()) if n == 1000
               else [f"class_{i}" for i in range(n)])
    meta = {"architecture": source, "classes": classes, "num_classes": n,
            "weights_source": model.pretrained_cfg.get("weights_source")}
    return model, data_config, meta


def _calibration_loader(folder: str | os.PathLike, data_config: dict, images: int, seed: int) -> DataLoader:
    paths, skipped = list_images([folder])
    if not paths:
        raise FinetuneError(f"no readable images in calibration folder `{folder}`; pass a folder of images")
    random.Random(seed).shuffle(paths)
    return eval_loader(paths[:images], data_config, batch_size=32)


@torch.no_grad()
def _agreement(teacher: torch.nn.Module, student: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """How closely the student's logits follow the teacher's on real images."""
    teacher.eval(), student.eval()
    same, total, err_num, err_den = 0, 0, 0.0, 0.0
    for images, _ in loader:
        t, s = teacher(images), student(images)
        same += int((t.argmax(1) == s.argmax(1)).sum())
        total += len(images)
        err_num += float((t - s).pow(2).sum())
        err_den += float(t.pow(2).sum())
    return {"top1_agreement": same / max(total, 1), "relative_logit_error": (err_num / max(err_den, 1e-12)) ** 0.5,
            "images": total}


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
    img_size: int | None = None,
    calib_data: str | os.PathLike | None = None,
    calib_images: int = 256,
    refit: bool = True,
    latency: bool = True,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert ``source`` (a run directory or a timm name) and write a run directory at ``out``.

    Returns the contents of ``out/convert.json``: the per-layer report, MACs/params totals
    (``torch.utils.flop_counter``), teacher-vs-student agreement on the calibration images and
    measured latency.
    """
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FinetuneError(f"output directory `{out}` already holds files; choose another --out or pass --overwrite")
    source = str(source)
    teacher, data_config, meta = _load_teacher(source, weights, num_classes, img_size)
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

    run_meta = {
        "format": RUN_FORMAT,
        "architecture": meta["architecture"],
        "num_classes": len(meta["classes"]),
        "classes": list(meta["classes"]),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "weights_source": meta.get("weights_source"),
        "separable_plan": student.separable_plan,
        "converted_from": source,
        "conversion": {"macs_ratio": report.macs_ratio, "params_ratio": report.params_ratio,
                       "layers": len(report.converted), "bn_reestimated": calib_data is not None},
        "versions": {"finetune-vision": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "created": datetime.now().isoformat(timespec="seconds"),
        "status": "complete",
    }
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model_state_dict(student), out / RUN_WEIGHTS, weights_metadata(run_meta))
    write_json(out / RUN_META, run_meta)
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
