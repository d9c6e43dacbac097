"""Measured inference latency: what a converter must check, because MACs are not latency.

Measured on a 2-core CPU (ResNet-18, batch 1, 2 threads): rank 1 (5.4× fewer MACs) runs 1.5–2.1×
faster than the dense model, rank 2 (3.4× fewer) 0.8–1.0× as fast, and rank 3 (2.5× fewer)
0.73–0.83× as fast, i.e. slower (``benchmarks/convert_resnet18.py`` measures a converted model
end to end). So the conversion report times both models on the
current device, at batch 1 and a larger batch, in both memory formats, and
``convert_to_separable(objective="latency")`` times every candidate layer variant against the
dense layer with :func:`time_modules` (hand-written: torch has no stable latency-benchmark helper
for eager modules; ``torch.utils.benchmark`` would also do, but its adaptive run lengths are too
long for a CLI report on 2 cores, and it does not interleave the modules it compares).

Both timers share one inner loop, :func:`_time_call` (synchronise, run ``number`` calls,
synchronise).

>>> import timm
>>> model = timm.create_model("resnet18", num_classes=10)
>>> seconds = measure_latency(model, (3, 32, 32), batch_size=1, repeats=2)
>>> seconds > 0
True
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, TypeVar

import torch
from torch import nn

from finetune.errors import FinetuneError

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

K = TypeVar("K", bound=Hashable)

__all__ = ["MEMORY_FORMATS", "LayerTiming", "VariantTiming", "compare_latency", "measure_latency",
           "memory_format_of", "time_layer_variants", "time_modules"]


def memory_format_of(name: str) -> torch.memory_format:
    """The torch memory format for ``"contiguous"`` / ``"channels_last"`` (the keys of
    :data:`MEMORY_FORMATS`); :class:`FinetuneError` for any other name.

    >>> memory_format_of("channels_last")
    torch.channels_last
    """
    try:
        return MEMORY_FORMATS[name]
    except (KeyError, TypeError):
        raise FinetuneError(f"memory_format must be one of {', '.join(map(repr, MEMORY_FORMATS))}, "
                            f"got {name!r}") from None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _time_call(fn: Callable[[], object], device: torch.device, number: int = 1) -> float:
    """Seconds per call of ``fn()``, averaged over ``number`` back-to-back calls, with the
    device synchronised before and after (asynchronous accelerators)."""
    _synchronize(device)
    tic = time.perf_counter()
    for _ in range(number):
        fn()
    _synchronize(device)
    return (time.perf_counter() - tic) / number


@torch.no_grad()
def measure_latency(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1,
                    memory_format: str = "contiguous", repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one eval-mode forward pass on ``model``'s device (model left untouched).

    >>> from torch import nn
    >>> measure_latency(nn.Conv2d(3, 8, 3), (3, 16, 16), memory_format="channels_last", repeats=2) > 0
    True
    """
    probe = copy.deepcopy(model).eval()
    device = next(probe.parameters()).device
    fmt = memory_format_of(memory_format)
    probe = probe.to(memory_format=fmt)
    x = torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=fmt)
    times = [_time_call(lambda: probe(x), device) for _ in range(warmup + repeats)]
    return statistics.median(times[warmup:])


@dataclass
class VariantTiming:
    """What :func:`time_modules` measured for one module.

    ``seconds``: median seconds per call over the repeats. ``ratio``: median over the repeats of
    this module's time divided by the reference module's time *in the same round* (1.0 for the
    reference itself) – a paired statistic, so load that comes and goes between rounds cancels.
    """

    seconds: float
    ratio: float


@torch.no_grad()
def time_modules(modules: Mapping[K, nn.Module], x: torch.Tensor, *, reference: K, repeats: int = 7,
                 warmup: int = 2, min_sample_s: float = 1e-3) -> dict[K, VariantTiming]:
    """Time several modules on the same input, interleaved, against ``reference``.

    The modules run as they are (device, dtype and memory format of their weights and of ``x``
    are the caller's choice) under ``no_grad``; callers put them in eval mode. Every round runs
    each module once in a rotated order, so slow drifts in machine load hit all modules alike.
    Each sample is the mean of ``number`` back-to-back calls, ``number`` chosen once from the
    reference so that a sample lasts about ``min_sample_s`` (tiny layers are otherwise
    dominated by timer and scheduler noise). ``warmup`` rounds (first-call kernel selection,
    allocator growth) are not counted.

    >>> from torch import nn
    >>> mods = {"dense": nn.Conv2d(8, 8, 3, padding=1), "pw": nn.Conv2d(8, 8, 1)}
    >>> timing = time_modules(mods, torch.randn(1, 8, 16, 16), reference="dense", repeats=3)
    >>> sorted(timing), timing["dense"].ratio
    (['dense', 'pw'], 1.0)
    """
    if reference not in modules:
        raise ValueError(f"reference {reference!r} is not one of the modules")
    keys = list(modules)
    device = x.device
    calls = {key: (lambda m=modules[key]: m(x)) for key in keys}
    for _ in range(max(1, warmup)):
        for key in keys:
            calls[key]()
    one = _time_call(calls[reference], device)
    number = max(1, min(1000, math.ceil(min_sample_s / max(one, 1e-9))))
    samples: dict[K, list[float]] = {key: [] for key in keys}
    ratios: dict[K, list[float]] = {key: [] for key in keys}
    for i in range(repeats):
        shift = i % len(keys)
        for key in keys[shift:] + keys[:shift]:
            samples[key].append(_time_call(calls[key], device, number))
        ref = samples[reference][-1]
        for key in keys:
            ratios[key].append(samples[key][-1] / ref if ref > 0 else float("inf"))
    return {key: VariantTiming(seconds=statistics.median(samples[key]),
                               ratio=1.0 if key == reference else statistics.median(ratios[key]))
            for key in keys}


def compare_latency(teacher: nn.Module, student: nn.Module, input_size: tuple[int, int, int],
                    batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 5) -> list[dict]:
    """Teacher vs student latency rows for each batch size and memory format.

    Each row: ``batch_size``, ``memory_format``, ``teacher_ms``, ``student_ms`` and ``speedup``
    (teacher time / student time; below 1 means the converted model is slower).

    >>> from torch import nn
    >>> rows = compare_latency(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1), (8, 16, 16), batch_sizes=(1,), repeats=2)
    >>> [(row["batch_size"], row["memory_format"]) for row in rows], rows[0]["speedup"] > 0
    ([(1, 'contiguous'), (1, 'channels_last')], True)
    """
    rows = []
    for batch_size in batch_sizes:
        for fmt in MEMORY_FORMATS:
            t = measure_latency(teacher, input_size, batch_size, fmt, repeats)
            s = measure_latency(student, input_size, batch_size, fmt, repeats)
            rows.append({"batch_size": batch_size, "memory_format": fmt, "teacher_ms": t * 1000,
                         "student_ms": s * 1000, "speedup": t / s})
    return rows


@dataclass
class LayerTiming:
    """:func:`time_layer_variants`' result: seconds per image batch of the dense layer and of
    each variant, summed over the layer's calls (a layer called twice counts twice), and each
    variant's paired time ratio to dense (weighted by the dense time of each call shape)."""

    dense_s: float
    variants: dict  # key -> VariantTiming (seconds summed over calls, ratio to dense)
    shapes: list  # the (C, H, W) input shapes timed, one per distinct call shape

    def faster(self, key: Hashable, margin: float) -> bool:
        """Whether variant ``key`` beat dense by at least ``margin`` (0.05 = 5%) both in median
        time and in the median of paired per-round ratios.

        >>> timing = LayerTiming(1e-3, {"A1": VariantTiming(seconds=0.9e-3, ratio=0.97)}, [(8, 16, 16)])
        >>> timing.faster("A1", margin=0.05), timing.faster("A1", margin=0.0)
        (False, True)
        """
        t = self.variants[key]
        return t.seconds <= (1.0 - margin) * self.dense_s and t.ratio <= 1.0 - margin


def time_layer_variants(dense: nn.Module, variants: Mapping[K, nn.Module],
                        input_shapes: list[tuple[int, ...]], *, batch_size: int = 1,
                        memory_format: str = "contiguous", repeats: int = 7,
                        warmup: int = 2) -> LayerTiming:
    """Time a dense layer against replacement ``variants`` at the input shapes it was called with.

    ``input_shapes`` are per-call input shapes with or without the batch dimension (only the
    last three dims are used); each distinct shape is timed once with :func:`time_modules` at
    ``batch_size`` and weighted by how often it occurs. Copies of the modules run in eval mode
    under ``no_grad`` on the dense layer's device and dtype, in ``memory_format``; the originals
    are left untouched.

    >>> from torch import nn
    >>> dense = nn.Conv2d(8, 8, 3, padding=1)
    >>> timing = time_layer_variants(dense, {"1x1": nn.Conv2d(8, 8, 1)}, [(1, 8, 16, 16)], repeats=3)
    >>> timing.dense_s > 0 and set(timing.variants) == {"1x1"}
    True
    """
    if not input_shapes:
        raise ValueError("no input shapes to time the layer at")
    fmt = memory_format_of(memory_format)
    weight = next(iter(dense.parameters()))
    device, dtype = weight.device, weight.dtype

    def prepare(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).eval().to(device=device, dtype=dtype, memory_format=fmt)

    reference = object()  # a key no caller can use
    modules: dict = {reference: prepare(dense)}
    modules.update({key: prepare(module) for key, module in variants.items()})
    counts: dict[tuple[int, ...], int] = {}
    for shape in input_shapes:
        key = tuple(int(s) for s in shape[-3:])
        counts[key] = counts.get(key, 0) + 1
    dense_s = 0.0
    seconds = {key: 0.0 for key in variants}
    weighted_ratio = {key: 0.0 for key in variants}
    for shape, count in counts.items():
        x = torch.randn(batch_size, *shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        timing = time_modules(modules, x, reference=reference, repeats=repeats, warmup=warmup)
        d = timing[reference].seconds
        dense_s += count * d
        for key in variants:
            seconds[key] += count * timing[key].seconds
            weighted_ratio[key] += count * d * timing[key].ratio
    return LayerTiming(
        dense_s=dense_s,
        variants={key: VariantTiming(seconds=seconds[key],
                                     ratio=weighted_ratio[key] / dense_s if dense_s > 0 else float("inf"))
                  for key in variants},
        shapes=list(counts),
    )
