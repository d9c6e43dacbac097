"""Classification metrics, confusion-matrix / training-curve plots and log reading.

Everything here works on plain tensors (any device, any float dtype: half and
bfloat16 logits are upcast to float32 before computing) and returns plain Python
numbers, so results can go straight into ``metrics.json``. Plots use
``matplotlib.figure.Figure`` with the Agg canvas directly, so the global pyplot
state and backend of the caller are never touched, and every file is written
atomically through :func:`finetune.io.atomic_path`.

Bad input (empty tensors, labels out of range, mismatched shapes) raises
``ValueError`` with a message that says what was wrong.

>>> import torch
>>> logits = torch.tensor([[2.0, 0.5, 0.1], [0.2, 1.5, 0.3], [0.1, 0.2, 3.0], [1.0, 2.0, 0.0]])
>>> labels = torch.tensor([0, 1, 2, 0])
>>> m = classification_metrics(logits, labels, ["cat", "dog", "owl"])
>>> m["top1"], m["num_samples"], m["confusion"]
(0.75, 4, [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from finetune.io import atomic_path

__all__ = [
    "topk_accuracy",
    "confusion_matrix",
    "per_class_metrics",
    "expected_calibration_error",
    "classification_metrics",
    "plot_confusion",
    "plot_curves",
    "read_log_csv",
]

# Above this many classes the confusion plot drops per-cell count annotations.
_MAX_ANNOTATED_CLASSES = 20
# Above this many classes only every n-th tick label is drawn.
_MAX_TICK_LABELS = 60
_MAX_LABEL_CHARS = 28


# --------------------------------------------------------------------------- validation


def _check_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Validate an [N, C] score tensor and return it detached, on CPU, in float32 (or float64)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, C], got {type(scores).__name__}")
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C] (samples x classes), got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples); metrics need at least one sample")
    if scores.shape[1] == 0:
        raise ValueError(f"{name} has 0 classes; expected shape [N, C] with C >= 1")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {scores.dtype}")
    scores = scores.detach().cpu()
    if scores.dtype != torch.float64:  # half / bfloat16 -> float32; float64 is kept
        scores = scores.float()
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} of {scores.shape[0]} rows")
    return scores


def _check_labels(labels: torch.Tensor, num_samples: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    """Validate a [N] integer class-index tensor and return it on CPU as int64."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N], got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if labels.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples); metrics need at least one sample")
    if labels.shape[0] != num_samples:
        raise ValueError(f"{name} has {labels.shape[0]} entries but there are {num_samples} samples")
    labels = labels.detach().cpu().long()
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains class index {bad}, outside the valid range 0..{num_classes - 1}")
    return labels


def _check_classes(classes: Sequence[str], num_classes: int) -> list[str]:
    if isinstance(classes, str):
        raise ValueError("classes must be a sequence of class names, not a single string")
    names = [str(c) for c in classes]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names but the data has {num_classes} classes")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names must be unique; duplicated: {dupes}")
    return names


def _as_confusion(confusion: Any) -> torch.Tensor:
    """Accept a tensor, array or nested list; return a CPU int64 [C, C] tensor."""
    if isinstance(confusion, torch.Tensor):
        conf = confusion.detach().cpu()
    else:
        conf = torch.as_tensor(np.asarray(confusion))
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {tuple(conf.shape)}")
    if conf.shape[0] == 0:
        raise ValueError("confusion matrix is empty (0 classes)")
    if conf.is_floating_point():
        if not torch.equal(conf, conf.round()):
            raise ValueError("confusion matrix must hold integer counts")
    elif conf.dtype == torch.bool or conf.is_complex():
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {conf.dtype}")
    conf = conf.long()
    if (conf < 0).any():
        raise ValueError("confusion matrix contains negative counts")
    return conf


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


# --------------------------------------------------------------------------- metrics


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1,)) -> dict[int, float]:
    """Fraction of samples whose label is among the ``k`` highest-scoring classes, for each k.

    ``k`` larger than the number of classes is clamped to it (every label is then
    within the top k, giving 1.0).

    >>> import torch
    >>> logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    >>> topk_accuracy(logits, torch.tensor([2, 0]), ks=(1, 2))
    {1: 0.5, 2: 1.0}
    """
    scores = _check_scores(logits, "logits")
    n, c = scores.shape
    target = _check_labels(labels, n, c)
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks:
        raise ValueError("ks is empty; pass at least one k, e.g. ks=(1, 5)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
    kmax = min(max(ks), c)
    top = scores.topk(kmax, dim=1).indices  # [N, kmax], best first
    hits = top.eq(target[:, None])  # at most one True per row
    cum = hits.cumsum(dim=1).sum(dim=0).double()  # cum[j] = #samples with label in top j+1
    return {int(k): float(cum[min(k, c) - 1] / n) for k in ks}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count matrix ``M[true, pred]`` (int64, shape [num_classes, num_classes]).

    >>> import torch
    >>> confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    tensor([[1, 0, 0],
            [0, 1, 0],
            [0, 1, 1]])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of shape [N], got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {tuple(labels.shape)}")
    target = _check_labels(labels, labels.shape[0], num_classes, "labels")
    pred = _check_labels(preds, target.shape[0], num_classes, "preds")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support for every class, from a ``[true, pred]`` confusion matrix.

    Undefined ratios (a class never predicted, or never present) are reported as
    0.0, never NaN; ``support`` is the number of true samples of the class (an int).

    >>> import torch
    >>> m = per_class_metrics(torch.tensor([[3, 1], [0, 0]]), ["a", "b"])
    >>> m["a"]
    {'precision': 1.0, 'recall': 0.75, 'f1': 0.8571428571428571, 'support': 4}
    >>> m["b"]
    {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 0}
    """
    conf = _as_confusion(confusion)
    names = _check_classes(classes, conf.shape[0])
    tp = conf.diag().tolist()
    true_count = conf.sum(dim=1).tolist()
    pred_count = conf.sum(dim=0).tolist()
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        fp = pred_count[i] - tp[i]
        fn = true_count[i] - tp[i]
        out[name] = {
            "precision": _safe_div(tp[i], pred_count[i]),
            "recall": _safe_div(tp[i], true_count[i]),
            # 2TP / (2TP + FP + FN) == harmonic mean of P and R whenever both are defined.
            "f1": _safe_div(2 * tp[i], 2 * tp[i] + fp + fn),
            "support": int(true_count[i]),
        }
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|`` where the
    confidence of a sample is its highest probability and bin ``b`` covers
    ``(b/n_bins, (b+1)/n_bins]``. ``probs`` are softmax probabilities [N, C].

    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    >>> round(expected_calibration_error(probs, torch.tensor([0, 1, 1, 1]), n_bins=10), 4)
    0.25
    """
    p = _check_scores(probs, "probs")
    n, c = p.shape
    target = _check_labels(labels, n, c)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    tol = 1e-3 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if float(p.min()) < -tol or float(p.max()) > 1 + tol:
        raise ValueError("probs must lie in [0, 1]; pass softmax probabilities, not logits")
    row_sum = p.double().sum(dim=1)
    if not torch.allclose(row_sum, torch.ones_like(row_sum), atol=max(1e-2, 10 * tol), rtol=0):
        raise ValueError("each row of probs must sum to 1; pass softmax probabilities, not logits")
    conf, pred = p.double().max(dim=1)
    correct = pred.eq(target).double()
    edges = torch.linspace(0, 1, int(n_bins) + 1, dtype=torch.float64)
    # right=False: index i with edges[i-1] < conf <= edges[i]; interior edges only.
    bin_idx = torch.bucketize(conf.clamp(0, 1), edges[1:-1], right=False)
    conf_sum = torch.bincount(bin_idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bin_idx, weights=correct, minlength=n_bins)
    # sum_b |B_b|/N * |acc_b - conf_b| == sum_b |acc_sum_b - conf_sum_b| / N
    return float((acc_sum - conf_sum).abs().sum() / n)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """All evaluation metrics for one pass over a dataset, as a JSON-ready dict.

    Keys: ``num_samples``, ``loss`` (mean cross-entropy), ``top1``, ``top5`` (only
    with at least 5 classes), ``macro_f1``, ``balanced_accuracy``, ``ece``
    (15 bins), ``per_class`` (see :func:`per_class_metrics`), ``confusion``
    (``[true][pred]`` counts) and ``classes``.

    ``macro_f1`` averages over classes that occur in ``labels`` or in the
    predictions (scikit-learn's default); ``balanced_accuracy`` is the mean recall
    over classes that occur in ``labels``. Classes absent from both are listed in
    ``per_class`` with zeros but do not drag the averages down.

    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.1], [0.3, 1.0], [1.5, 0.2]])
    >>> m = classification_metrics(logits, torch.tensor([0, 1, 1]), ["no", "yes"])
    >>> m["top1"], "top5" in m, m["per_class"]["yes"]["recall"]
    (0.6666666666666666, False, 0.5)
    """
    scores = _check_scores(logits, "logits")
    n, c = scores.shape
    target = _check_labels(labels, n, c)
    names = _check_classes(classes, c)

    loss = float(F.cross_entropy(scores, target, reduction="mean"))
    ks = (1, 5) if c >= 5 else (1,)
    topk = topk_accuracy(scores, target, ks)
    preds = scores.argmax(dim=1)
    conf = confusion_matrix(preds, target, c)
    per_class = per_class_metrics(conf, names)

    true_count = conf.sum(dim=1)
    present = (true_count > 0) | (conf.sum(dim=0) > 0)
    f1s = [per_class[name]["f1"] for name in names]
    macro_f1 = float(np.mean([f for f, keep in zip(f1s, present.tolist()) if keep]))
    recalls = [per_class[name]["recall"] for name, s in zip(names, true_count.tolist()) if s > 0]
    balanced = float(np.mean(recalls))
    ece = expected_calibration_error(scores.softmax(dim=1), target)

    out: dict[str, Any] = {"num_samples": int(n), "loss": loss, "top1": topk[1]}
    if c >= 5:
        out["top5"] = topk[5]
    out.update(
        macro_f1=macro_f1,
        balanced_accuracy=balanced,
        ece=ece,
        per_class=per_class,
        confusion=conf.tolist(),
        classes=names,
    )
    return out


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot involved
    return fig


def _save_png(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.15)


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL_CHARS else label[: _MAX_LABEL_CHARS - 1] + "\u2026"


def plot_confusion(
    confusion: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Save a confusion-matrix heatmap as PNG: rows (true class) normalised for colour.

    Counts are written in the cells when there are at most 20 classes; x tick
    labels are rotated, long names shortened, and the figure grows with the class
    count (capped so huge label sets still give a sane image).

    >>> import tempfile, pathlib, torch
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "confusion.png"
    >>> plot_confusion(torch.tensor([[5, 1], [2, 7]]), ["cat", "dog"], out)
    >>> out.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    conf = _as_confusion(confusion)
    names = _check_classes(classes, conf.shape[0])
    c = conf.shape[0]
    counts = conf.numpy()
    row_tot = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, row_tot, out=np.zeros(counts.shape, dtype=float), where=row_tot > 0)

    longest = max(len(_short(n)) for n in names)
    side = float(np.clip(2.5 + 0.42 * c, 5.0, 36.0))
    margin = min(0.075 * longest, 2.5)  # room for the (rotated) tick labels
    fig = _new_figure(side + margin + 1.2, side + margin)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label("fraction of true class")

    step = max(1, math.ceil(c / _MAX_TICK_LABELS))
    ticks = np.arange(0, c, step)
    tick_font = float(np.clip(11 - 0.08 * c, 6, 10))
    ax.set_xticks(ticks, [_short(names[i]) for i in ticks], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=tick_font)
    ax.set_yticks(ticks, [_short(names[i]) for i in ticks], fontsize=tick_font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    acc = _safe_div(np.trace(counts), total)
    ax.set_title(title if title is not None else f"Confusion matrix (n={total}, accuracy {acc:.1%})")

    if c <= _MAX_ANNOTATED_CLASSES:
        cell_font = float(np.clip(14 - 0.45 * c, 6, 11))
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=cell_font,
                        color="white" if norm[i, j] > 0.5 else "black")
    _save_png(fig, path)


def _to_float(value: Any) -> float | None:
    """A finite float from a log value (number or numeric string), else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def plot_curves(rows: Sequence[Mapping[str, float | str]], path: str | os.PathLike) -> None:
    """Save training curves from log rows (e.g. :func:`read_log_csv`) as a PNG.

    x axis is ``epoch`` (fractional epochs allowed; the row number when the column
    is absent). Panel 1: ``train_loss`` and ``val_loss``; panel 2: ``val_top1``
    and ``train_top1``; panel 3: ``lr`` (or per-group ``lr_*`` columns such as
    ``lr_head``/``lr_body``), only when logged. Values may be numeric
    strings; missing columns and empty or non-numeric cells are skipped.

    >>> import tempfile, pathlib
    >>> rows = [{"epoch": 1, "train_loss": "0.9", "val_loss": 0.8, "val_top1": 0.6, "lr": 1e-3},
    ...         {"epoch": 2, "train_loss": "0.5", "val_loss": 0.6, "val_top1": 0.7, "lr": 5e-4}]
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "curves.png"
    >>> plot_curves(rows, out)
    >>> out.exists()
    True
    """
    if isinstance(rows, Mapping) or isinstance(rows, (str, bytes)):
        raise ValueError("rows must be a sequence of dicts (one per log line), e.g. from read_log_csv()")
    rows = list(rows)
    if not rows:
        raise ValueError("no log rows to plot (the log is empty)")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"log row {i} is a {type(row).__name__}, expected a dict of column -> value")

    has_epoch = any(_to_float(r.get("epoch")) is not None for r in rows)
    xs = [_to_float(r.get("epoch")) if has_epoch else float(i + 1) for i, r in enumerate(rows)]

    def series(key: str) -> tuple[list[float], list[float]] | None:
        pts = [(x, _to_float(r.get(key))) for x, r in zip(xs, rows)]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None

    # (y label, [(column, legend label, colour or None for the default cycle)])
    panels: list[tuple[str, list[tuple[str, str, str | None]]]] = [
        ("loss", [("train_loss", "train", "tab:blue"), ("val_loss", "val", "tab:orange")]),
        ("top-1 accuracy", [("train_top1", "train", "tab:blue"), ("val_top1", "val", "tab:orange")]),
    ]
    # "lr", or one column per parameter group such as "lr_head" / "lr_body".
    columns = dict.fromkeys(k for r in rows for k in r if isinstance(k, str))
    lr_keys = [k for k in columns if (k == "lr" or k.startswith("lr_")) and series(k) is not None]
    if lr_keys:
        panels.append(("learning rate", [(k, k[3:] or "lr", None) for k in lr_keys]))

    fig = _new_figure(5.0 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, keys) in zip(axes, panels):
        drawn = 0
        for key, label, color in keys:
            s = series(key)
            if s is None:
                continue
            marker = "o" if len(s[0]) <= 30 else None
            ax.plot(s[0], s[1], label=label, color=color, marker=marker, markersize=3)
            drawn += 1
        ax.set_xlabel("epoch" if has_epoch else "log row")
        if all(x is not None and float(x).is_integer() for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn == 0:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif drawn > 1:
            ax.legend()
        if ylabel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.suptitle("Training curves")
    _save_png(fig, path)


# --------------------------------------------------------------------------- logs


def read_log_csv(path: str | os.PathLike) -> list[dict[str, float | str]]:
    """Read a ``log.csv`` into a list of row dicts; numeric strings become floats.

    Non-numeric cells (and empty cells, as ``""``) stay strings; rows shorter than
    the header are padded with ``""``.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.csv"
    >>> _ = p.write_text("epoch,train_loss,phase\\n1,0.5,train\\n")
    >>> read_log_csv(p)
    [{'epoch': 1.0, 'train_loss': 0.5, 'phase': 'train'}]
    """
    out: list[dict[str, float | str]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, restval="")
        for row in reader:
            if None in row:
                raise ValueError(
                    f"{os.fspath(path)} line {reader.line_num}: more fields than the header has columns"
                )
            out.append({key: _parse_cell(value) for key, value in row.items()})
    return out


def _parse_cell(value: str) -> float | str:
    text = value.strip()
    if not text or "_" in text:  # float() accepts "1_000"; a log never writes that
        return value
    try:
        return float(text)
    except ValueError:
        return value
