"""Measured choice of memory format for training.

Which layout is faster depends on the model, the input size, the batch and the CPU/GPU build.
On this project's 2-core x86 machines with torch 2.14 channels_last trains the two offline
backbones 1.4-1.8x faster than NCHW (``benchmarks/train_throughput.py``), while resnet18 goes
the other way (8.9 img/s in NCHW vs 4.3 in channels_last). FLOP counts cannot predict this, so
we time a few real training steps (hand-written: neither timm nor accelerate offers a per-model
layout benchmark). Under heavy load from other processes the timing is noisy;
``--memory-format`` forces a choice. A measured choice is cached (``$FINETUNE_CACHE/autotune.json``)
per architecture, input size, batch, device, thread count and torch version, so later runs of
the same setting skip the measurement; ``model.json`` records the format a run used. The
formats and their names are :data:`finetune.convert.latency.MEMORY_FORMATS`.

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
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import Recipe
from finetune.convert.latency import MEMORY_FORMATS, memory_format_of
from finetune.io import write_json
from finetune.models.weights import cache_dir


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
    timings = {name: _step_seconds(probe, images, labels, fmt, steps) for name, fmt in MEMORY_FORMATS.items()}
    del probe
    fastest = min(timings, key=timings.get)
    return MEMORY_FORMATS[fastest], timings


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
    try:
        entry = json.loads((cache_dir() / "autotune.json").read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not entry or entry.get("format") not in MEMORY_FORMATS:
        return None
    return MEMORY_FORMATS[entry["format"]], entry.get("timings", {})


def remember_memory_format(key: str, fmt: torch.memory_format, timings: dict[str, float]) -> None:
    """Add a measured choice to the cache (atomic rewrite of ``autotune.json``)."""
    path = cache_dir() / "autotune.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table[key] = {"format": format_name(fmt), "timings": timings}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, table)


def format_name(fmt: torch.memory_format) -> str:
    """The name of a memory format in :data:`~finetune.convert.latency.MEMORY_FORMATS`.

    >>> format_name(torch.channels_last)
    'channels_last'
    """
    return next(name for name, f in MEMORY_FORMATS.items() if f == fmt)


def format_label(fmt: torch.memory_format) -> str:
    """How ``model.json`` and the log name a format: torch's name without ``torch.``.

    >>> format_label(torch.contiguous_format), format_label(torch.channels_last)
    ('contiguous_format', 'channels_last')
    """
    return str(fmt).replace("torch.", "")


def training_memory_format(recipe: Recipe, model: nn.Module, loader: DataLoader, accelerator: Accelerator,
                           resumed_format: str | None = None) -> torch.memory_format:
    """The format a run trains in: the recipe's forced one; a resumed run's own (``resumed_format``);
    else (``auto``) the one measured faster for this model, input size and machine (cached)."""
    if recipe.runtime.memory_format != "auto":
        return memory_format_of(recipe.runtime.memory_format)
    if resumed_format is not None:  # recorded as format_label() writes it: "contiguous_format" or "channels_last"
        return memory_format_of(resumed_format.removesuffix("_format"))
    with torch.random.fork_rng(devices=[]):  # iter() draws a seed: it must not shift the seeded stream
        images, labels = next(iter(loader))
    images = images.to(accelerator.device)
    # the name alone would not tell a converted model from its dense original: add the size
    name = str(getattr(model, "default_cfg", {}).get("architecture", type(model).__name__))
    key = autotune_key(f"{name}:{sum(p.numel() for p in model.parameters())}", images)
    cached = cached_memory_format(key)
    if cached is not None:
        fmt = cached[0]
        accelerator.print(f"memory format: {format_label(fmt)} (measured before for this model, size "
                          "and machine; --memory-format forces one)")
        return fmt
    with torch.random.fork_rng(devices=[]):  # timing must not shift the seeded random stream
        # labels only feed the timing loss; unlabelled images carry -1
        fmt, timings = choose_memory_format(model.to(accelerator.device), images,
                                            labels.clamp(min=0).to(accelerator.device))
    if accelerator.is_main_process:
        remember_memory_format(key, fmt, timings)
    accelerator.print("memory format: " + ", ".join(f"{k} {v * 1000:.0f} ms/step" for k, v in timings.items())
                      + f" -> {format_label(fmt)}")
    return fmt
