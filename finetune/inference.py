"""Evaluate a trained run on a labelled folder, and predict labels for image files.

>>> from finetune import evaluate, predict                       # doctest: +SKIP
>>> evaluate("runs/photos", "~/photos_test")["top1"]           # doctest: +SKIP
>>> predict("runs/photos", ["cat.jpg", "more_photos/"], top_k=3)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from finetune.io import write_json, write_text
from finetune.data import eval_loader, list_images, scan_labelled, scan_manifest_labelled, write_skipped
from finetune.data.hf import is_hf_source, normalise_source, scan_hf_labelled, source_folder
from finetune.errors import FinetuneError
from finetune.metrics import classification_metrics, plot_confusion
from finetune.report import write_report
from finetune.rundir import RUN_METRICS, load_model, read_run_meta


@dataclass
class Prediction:
    """Top-k labels and probabilities for one image."""

    path: Path
    labels: list[str]
    probs: list[float]
    error: str | None = None  # set (and labels empty) when the file could not be read

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "labels": self.labels, "probs": [round(p, 6) for p in self.probs],
                "error": self.error}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: ``--tta`` modes and what ``metrics["tta"]`` calls them.
TTA_MODES = {"flip": "hflip", "five-crop": "five-crop+hflip"}


def tta_mode(tta: bool | str | None) -> str | None:
    """The TTA mode a ``tta`` argument asks for: ``None`` (off), ``"flip"`` (``True`` too) or ``"five-crop"``.

    >>> tta_mode(True), tta_mode("five-crop"), tta_mode(False)
    ('flip', 'five-crop', None)
    """
    if tta is None or tta is False:
        return None
    if tta is True or tta in ("flip", "hflip"):
        return "flip"
    if tta in ("five-crop", "five_crop", "5crop", "5-crop"):
        return "five-crop"
    raise FinetuneError(f"tta: `{tta}` is not valid; choose one of {', '.join(TTA_MODES)}")


def _views(model: nn.Module, loader: Iterable, device: torch.device | None,
           tta: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Plain logits, TTA log-probabilities (``None`` without ``tta``) and labels, in one pass (CPU).

    Batches of ``[B, V, C, H, W]`` (a loader with ``five_crop``) are V crops per image: the plain logits
    are the last (centre) crop's, the TTA probabilities the mean softmax over every crop and its flip."""
    device = device or default_device()
    model = model.to(device).eval()
    logits, flipped, labels = [], [], []
    multi = False
    with torch.no_grad():
        for images, targets in loader:
            images = images.to(device)
            if images.ndim == 5:  # multi-crop
                multi = True
                batch, views = images.shape[:2]
                flat = images.flatten(0, 1)
                out = model(flat).float().view(batch, views, -1)
                mirrored = model(torch.flip(flat, dims=[3])).float().view(batch, views, -1)
                logits.append(out[:, -1].cpu())
                flipped.append(((out.softmax(2).sum(1) + mirrored.softmax(2).sum(1)) / (2 * views)).cpu())
                labels.append(targets)
                continue
            logits.append(model(images).float().cpu())
            if tta:
                flipped.append(model(torch.flip(images, dims=[3])).float().cpu())
            labels.append(targets)
    if not logits:
        return torch.empty(0, 0), (torch.empty(0, 0) if tta else None), torch.empty(0, dtype=torch.long)
    plain = torch.cat(logits)
    if multi:  # already mean probabilities
        return plain, torch.cat(flipped).log(), torch.cat(labels)
    mean = ((plain.softmax(1) + torch.cat(flipped).softmax(1)) / 2).log() if tta else None
    return plain, mean, torch.cat(labels)


def predict_logits(model: nn.Module, loader: Iterable, device: torch.device | None = None,
                   tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over a loader of ``(images, labels)``; return stacked logits and labels (CPU).

    With ``tta`` (test-time augmentation, horizontal flip) the "logits" are ``log`` of the mean of
    the softmax over each image and its mirror image, so ``softmax`` (and cross-entropy) of them
    are those of the averaged probabilities. A loader of crops (``eval_loader(..., five_crop=True)``)
    averages over every crop and its mirror image, with or without ``tta``.

    >>> from torch.utils.data import TensorDataset, DataLoader
    >>> model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    >>> loader = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])), batch_size=2)
    >>> logits, labels = predict_logits(model, loader, torch.device("cpu"), tta=True)
    >>> logits.shape, labels.tolist(), torch.allclose(logits.exp().sum(1), torch.ones(4))
    (torch.Size([4, 3]), [0, 1, 2, 0], True)
    """
    plain, mean, labels = _views(model, loader, device, tta)
    return (plain if mean is None else mean), labels


def evaluate(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    batch_size: int = 64,
    img_size: int | None = None,
    labels: str | os.PathLike | None = None,
    tta: bool | str = False,
    image_column: str = "image",
    label_column: str = "label",
) -> dict[str, Any]:
    """Evaluate a run on every image of a labelled folder (``data/<class>/…``, or its ``val/`` split),
    on every row of the manifest ``labels`` (CSV/JSON Lines, paths relative to ``data``), or on a
    Hugging Face data set (``data="hf:DIR"``: its ``test`` split, else ``validation``; columns
    ``image_column``/``label_column``; :mod:`finetune.data.hf`).

    With ``tta`` (``True`` or ``"flip"``: mean softmax over each image and its horizontal flip;
    ``"five-crop"``: over five crops -- corners and centre of the image resized by ``1/crop_pct`` --
    and their flips) the main metrics are the TTA ones, ``metrics["tta"]`` is ``"hflip"`` (or
    ``"five-crop+hflip"``) and ``metrics["plain"]`` holds ``top1``, ``top5``, ``macro_f1`` and
    ``loss`` without TTA (the centre view, same pass), for comparison.

    Writes ``metrics.json``, ``confusion.png`` and ``predictions.csv`` to ``out`` (default
    ``RUN/eval-<folder name>``) and returns the metrics dict.
    """
    meta = read_run_meta(run_dir)
    if batch_size < 1:
        raise FinetuneError(f"batch_size: `{batch_size}` must be at least 1")
    mode = tta_mode(tta)
    model, data_config = load_model(run_dir, img_size=img_size)
    if is_hf_source(data):
        data = normalise_source(data)
        classes, samples, skipped = scan_hf_labelled(data, classes=list(meta["classes"]), image_column=image_column,
                                                     label_column=label_column)
    elif labels is not None:
        classes, samples, skipped = scan_manifest_labelled(data, labels, classes=list(meta["classes"]))
    else:
        classes, samples, skipped = scan_labelled(data, classes=list(meta["classes"]))
    name = source_folder(data).name if is_hf_source(data) else Path(data).expanduser().resolve().name
    out_dir = Path(out) if out else Path(run_dir) / f"eval-{name}"
    loader = eval_loader(samples, data_config, batch_size, five_crop=mode == "five-crop")
    plain, mean, labels = _views(model, loader, None, mode is not None)
    logits = plain if mean is None else mean
    metrics = classification_metrics(logits, labels, classes)
    if mean is not None:
        reference = classification_metrics(plain, labels, classes)
        metrics["tta"] = TTA_MODES[mode]
        metrics["plain"] = {k: reference.get(k) for k in ("top1", "top5", "macro_f1", "loss")}
    metrics["data"] = data if is_hf_source(data) else str(Path(data).expanduser())
    metrics["skipped_images"] = len(skipped)
    write_json(out_dir / RUN_METRICS, metrics)
    plot_confusion(metrics["confusion"], classes, out_dir / "confusion.png",
                   title=f"{meta['architecture']} on {Path(data).name} (top-1 {metrics['top1']:.3f})")
    probs = logits.softmax(1)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "predicted", "probability"])
    for sample, p in zip(samples, probs):
        writer.writerow([sample.path, classes[sample.label], classes[int(p.argmax())], f"{p.max().item():.6f}"])
    write_text(out_dir / "predictions.csv", buffer.getvalue())
    if skipped:
        write_skipped(skipped, out_dir / "skipped.txt")
    write_report(out_dir, title=f"{Path(run_dir).name} on {Path(data).name}", metrics=metrics, classes=classes,
                 subtitle=f"`finetune eval` of {run_dir} ({meta['architecture']}) on {metrics['data']}",
                 probs=probs, labels=labels, paths=[s.path for s in samples],
                 plots={"confusion": out_dir / "confusion.png"}, skipped=[(s.path, s.reason) for s in skipped])
    metrics["out_dir"] = str(out_dir)
    return metrics


def report_run(run_dir: str | os.PathLike, batch_size: int = 64) -> Path:
    """Write ``RUN/report.html`` for a run trained before reports existed: its validation split is
    rebuilt from ``recipe.yaml`` (same folder, fraction and seed) and predicted again.

    >>> report_run("runs/photos")                                  # doctest: +SKIP
    PosixPath('runs/photos/report.html')
    """
    from finetune.config import Recipe
    from finetune.data import read_skipped
    from finetune.data.manifest import scan_data_section
    from finetune.rundir import RUN_RECIPE, RUN_SKIPPED

    run_dir = Path(run_dir).expanduser()
    meta = read_run_meta(run_dir)
    if not (run_dir / RUN_RECIPE).is_file() or not (run_dir / RUN_METRICS).is_file():
        raise FinetuneError(f"`{run_dir}` has no {RUN_RECIPE} and {RUN_METRICS}: only a finished `finetune train` "
                            "run has a report; for any run and folder use `finetune eval RUN --data DIR`")
    recipe = Recipe.from_yaml(run_dir / RUN_RECIPE)
    recipe.require_data()
    split = scan_data_section(recipe.data, recipe.runtime.seed)
    if list(split.classes) != list(meta["classes"]):
        raise FinetuneError(f"the classes in {split.root} are no longer the run's; use `finetune eval RUN --data DIR`")
    model, data_config = load_model(run_dir)
    logits, labels = predict_logits(model, eval_loader(split.val, data_config, batch_size))
    metrics = {**classification_metrics(logits, labels, split.classes),
               "best_epoch": meta.get("best_epoch")}
    return write_report(run_dir, title=f"{run_dir.name}: {meta['architecture']}", metrics=metrics,
                        subtitle=f"validation split of {split.root} ({len(split.val)} images), predicted again",
                        classes=split.classes, probs=logits.softmax(1), labels=labels,
                        paths=[s.path for s in split.val],
                        plots={"curves": run_dir / "curves.png", "confusion": run_dir / "confusion.png"},
                        skipped=[(s.path, s.reason) for s in read_skipped(run_dir / RUN_SKIPPED)],
                        recipe=(run_dir / RUN_RECIPE).read_text())


def predict(
    run_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    top_k: int = 5,
    batch_size: int = 32,
    tta: bool | str = False,
) -> list[Prediction]:
    """Top-k labels for image files and folders (searched recursively), in batches.

    Unreadable files come last, with ``error`` set and no labels. ``tta`` (``True``/``"flip"``): the
    probabilities are the mean softmax over each image and its horizontal flip; ``"five-crop"``: over
    five crops and their flips (see :func:`evaluate`).
    """
    mode = tta_mode(tta)
    read_run_meta(run_dir)  # a clear error when run_dir is not a run (not a timm name lookup)
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if value < 1:
            raise FinetuneError(f"{name}: `{value}` must be at least 1")
    model, data_config = load_model(run_dir)
    classes = list(model.pretrained_cfg["label_names"])
    paths, skipped = list_images(inputs)
    results = []
    if paths:
        loader = eval_loader(paths, data_config, batch_size, five_crop=mode == "five-crop")
        logits, _ = predict_logits(model, loader, tta=mode is not None)
        probs, indices = logits.softmax(1).topk(min(top_k, len(classes)), dim=1)
        results = [
            Prediction(path, [classes[i] for i in idx.tolist()], p.tolist())
            for path, p, idx in zip(paths, probs, indices)
        ]
    return results + [Prediction(s.path, [], [], error=s.reason) for s in skipped]
