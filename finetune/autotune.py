"""Measured choice of memory format for training.

Which layout is faster depends on the model, the input size, the batch and the CPU/GPU build.
On this project's 2-core x86 machines with torch 2.14 channels_last trains the two offline
backbones 1.4-1.8x faster than NCHW (``benchmarks/train_throughput.py``), while DESIGN notes
resnet18 going the other way (8.9 vs 4.3 img/s). FLOP counts cannot predict this, so we time a
few real training steps (hand-written: neither timm nor accelerate offers a per-model layout
benchmark). Under heavy load from other processes the timing is noisy; ``--memory-format``
forces a choice.

>>> import timm, torch
>>> model = timm.create_model("mobilenetv3_small_050", num_classes=3)
>>> fmt, timings = choose_memory_format(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
>>> fmt in (torch.channels_last, torch.contiguous_format)
True
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _step_seconds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fmt: torch.memory_format,
                  steps: int) -> float:
    model = model.to(memory_format=fmt)
    images = images.contiguous(memory_format=fmt)
    best = float("inf")
    for i in range(steps + 1):  # the first step warms up kernels/caches and is not counted
        tic = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - tic)
    return best


def choose_memory_format(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 2
) -> tuple[torch.memory_format, dict[str, float]]:
    """Time forward+backward on a copy of ``model`` in each memory format; return the faster.

    The model itself is not touched (BatchNorm statistics, gradients and weights stay as they are).
    Returns the format and the measured seconds per step, by format name.
    """
    probe = copy.deepcopy(model).train()
    for p in probe.parameters():
        p.requires_grad_(True)
    timings = {name: _step_seconds(probe, images, labels, fmt, steps) for name, fmt in FORMATS.items()}
    del probe
    fastest = min(timings, key=timings.get)
    return FORMATS[fastest], timings
