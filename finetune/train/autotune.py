"""Measured choice of memory format for training.

Which layout is faster depends on the model, the input size, the batch and the CPU/GPU build.
On this project's 2-core x86 machines with torch 2.14 channels_last trains the two offline
backbones 1.4-1.8x faster than NCHW (``benchmarks/train_throughput.py``), while DESIGN notes
resnet18 going the other way (8.9 vs 4.3 img/s). FLOP counts cannot predict this, so we time a
few real training steps (hand-written: neither timm nor accelerate offers a per-model layout
benchmark). Under heavy load from other processes the timing is noisy; ``--memory-format``
forces a choice. A measured choice is cached (``$FINETUNE_CACHE/autotune.json``) per
architecture, input size, batch, device, thread count and torch version, so later runs of the
same setting skip the measurement; ``model.json`` records the format a run used.

``torch.compile`` is not among the candidates: on these CPUs its compile time (minutes for an
EfficientNet) exceeds what it saves in a fine-tuning run of a few epochs.

>>> import timm, torch
>>> model = timm.create_model("mobilenetv3_small_050", num_classes=3)
>>> fmt, timings = choose_memory_format(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
>>> fmt in (torch.channels_last, torch.contiguous_format)
True
"""

from __future__ import annotations

import copy
import json
import platform
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


def autotune_key(architecture: str, images: torch.Tensor) -> str:
    """What a measured choice depends on: model, input shape, device, threads, torch build."""
    device = images.device.type
    if device == "cuda":
        device = torch.cuda.get_device_name(images.device)
    else:
        device = f"cpu:{platform.machine()}:{platform.processor() or '?'}"
    shape = "x".join(str(d) for d in images.shape)
    return f"{architecture}|{shape}|{device}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def cached_memory_format(key: str) -> tuple[torch.memory_format, dict[str, float]] | None:
    """A choice measured before for ``key``, if the cache holds one."""
    from finetune.models.weights import cache_dir

    try:
        entry = json.loads((cache_dir() / "autotune.json").read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not entry or entry.get("format") not in FORMATS:
        return None
    return FORMATS[entry["format"]], entry.get("timings", {})


def remember_memory_format(key: str, fmt: torch.memory_format, timings: dict[str, float]) -> None:
    """Add a measured choice to the cache (atomic rewrite of ``autotune.json``)."""
    from finetune.io import write_json
    from finetune.models.weights import cache_dir

    path = cache_dir() / "autotune.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    name = next(n for n, f in FORMATS.items() if f == fmt)
    table[key] = {"format": name, "timings": timings}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, table)
