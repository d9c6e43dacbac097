"""ONNX Runtime helpers shared by the int8 export and ``finetune compress``: sessions with a stated
thread count, logits of an ONNX model on a loader, accuracy figures of two models side by side, and
interleaved latency medians.

>>> import numpy as np
>>> a = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]); b = np.array([[1.5, 1.0], [0.0, 2.0], [0.0, 1.0]])
>>> stats = compare_logits(a, b, np.array([0, 1, 0]))
>>> stats["reference_top1"], round(stats["top1"], 3), round(stats["agreement"], 3), stats["max_abs_logit_diff"]
(1.0, 0.667, 0.667, 1.0)
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from finetune.export.sidecar import INPUT_NAME, OUTPUT_NAME

__all__ = ["compare_logits", "default_threads", "file_mb", "interleaved_latency", "onnx_logits", "session"]


def default_threads() -> int:
    """Intra-op threads used for ONNX Runtime here: torch's thread count (``OMP_NUM_THREADS`` or the cores).

    >>> default_threads() >= 1
    True
    """
    return max(1, int(torch.get_num_threads()))


def session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` on ``threads`` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path_or_session: Any, loader: Iterable, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of an ONNX model over a loader of ``(images, labels)`` batches."""
    sess = session(path_or_session, threads) if isinstance(path_or_session, (str, os.PathLike)) else path_or_session
    logits, labels = [], []
    for images, targets in loader:
        x = np.ascontiguousarray(images.numpy() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
        logits.append(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        labels.append(np.asarray(targets))
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 of both, the candidate's drop in points, top-1 agreement and max |logit difference|."""
    ref_pred, cand_pred = reference.argmax(1), candidate.argmax(1)
    ref_top1, top1 = float((ref_pred == labels).mean()), float((cand_pred == labels).mean())
    return {"reference_top1": ref_top1, "top1": top1, "drop_points": round(100.0 * (ref_top1 - top1), 6),
            "agreement": float((ref_pred == cand_pred).mean()),
            "max_abs_logit_diff": float(np.abs(reference.astype(np.float64) - candidate).max()),
            "images": int(len(labels))}


def interleaved_latency(models: Mapping[str, str | os.PathLike], input_size: Sequence[int],
                        batch_sizes: Sequence[int] = (1, 32), threads: int | None = None,
                        seconds: float = 2.0, min_repeats: int = 5, max_repeats: int = 200) -> list[dict[str, Any]]:
    """Median ONNX Runtime latency of each model at each batch size, runs interleaved.

    Every repeat runs each model once (the order rotates), so a slow moment of a shared machine
    hits all models alike. Repeats: enough for about ``seconds`` per model and batch size, within
    ``[min_repeats, max_repeats]``, after two warm-up runs. Input: a fixed random batch.

    Returns one row per (model, batch size): ``model``, ``batch_size``, ``median_ms``, ``min_ms``,
    ``images_per_s`` (from the median), ``repeats``, ``threads``.
    """
    threads = threads or default_threads()
    sessions = {name: session(path, threads) for name, path in models.items()}
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        x = rng.standard_normal((batch, *input_size), dtype=np.float32)
        first = {}
        for name, sess in sessions.items():
            for _ in range(2):
                start = time.perf_counter()
                sess.run([OUTPUT_NAME], {INPUT_NAME: x})
                first[name] = time.perf_counter() - start
        repeats = int(min(max_repeats, max(min_repeats, seconds / max(max(first.values()), 1e-6))))
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                sessions[name].run([OUTPUT_NAME], {INPUT_NAME: x})
                times[name].append(time.perf_counter() - start)
        for name in names:
            median = statistics.median(times[name])
            rows.append({"model": name, "batch_size": int(batch), "median_ms": 1e3 * median,
                         "min_ms": 1e3 * min(times[name]), "images_per_s": batch / median,
                         "repeats": repeats, "threads": threads})
    return rows


def file_mb(path: str | os.PathLike) -> float:
    """Size of a file in MB (10^6 bytes)."""
    return Path(path).stat().st_size / 1e6
