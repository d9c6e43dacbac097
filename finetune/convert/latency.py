"""Measured inference latency: what a converter must check, because MACs are not latency.

Measured on this project's 2-core CPU (DESIGN.md): a ResNet-18 at rank 3 has 2.5× fewer MACs and
runs 0.73-0.83× as fast as the dense model. So the conversion report times both models on the
current device, at batch 1 and a larger batch, in both memory formats (hand-written: torch has no
stable latency-benchmark helper for eager modules; ``torch.utils.benchmark`` would also do, but
its adaptive run lengths are too long for a CLI report on 2 cores).

>>> import timm
>>> model = timm.create_model("resnet18", num_classes=10)
>>> seconds = measure_latency(model, (3, 32, 32), batch_size=1, repeats=2)
>>> seconds > 0
True
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@torch.no_grad()
def measure_latency(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1,
                    memory_format: str = "contiguous", repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one eval-mode forward pass on ``model``'s device (model left untouched)."""
    probe = copy.deepcopy(model).eval()
    device = next(probe.parameters()).device
    fmt = MEMORY_FORMATS[memory_format]
    probe = probe.to(memory_format=fmt)
    x = torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=fmt)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        probe(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


def compare_latency(teacher: nn.Module, student: nn.Module, input_size: tuple[int, int, int],
                    batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 5) -> list[dict]:
    """Teacher vs student latency rows for each batch size and memory format.

    Each row: ``batch_size``, ``memory_format``, ``teacher_ms``, ``student_ms`` and ``speedup``
    (teacher time / student time; below 1 means the converted model is slower).
    """
    rows = []
    for batch_size in batch_sizes:
        for fmt in MEMORY_FORMATS:
            t = measure_latency(teacher, input_size, batch_size, fmt, repeats)
            s = measure_latency(student, input_size, batch_size, fmt, repeats)
            rows.append({"batch_size": batch_size, "memory_format": fmt, "teacher_ms": t * 1000,
                         "student_ms": s * 1000, "speedup": t / s})
    return rows
