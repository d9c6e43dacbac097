"""What a conversion did: one :class:`LayerReport` per dense k×k conv considered, gathered in a
:class:`ConversionReport` (``model.conversion_report``) that prints as a table and serialises to
JSON (``convert.json``).

>>> from torch import nn
>>> from finetune.convert import convert_to_separable
>>> sep = convert_to_separable(nn.Sequential(nn.Conv2d(8, 8, 3)), rank=2, form="A")
>>> print(sep.conversion_report)                       # doctest: +ELLIPSIS
layer  kernel   stride  form  rank  MACs before → after  params before → after  w.err
0      8x8x3x3  1x1     A     2/8   ?                    584 → 280              ...
policy rank=2: 1 of 1 layers converted; params 584 → 280 (0.479x)
>>> round(sep.conversion_report.to_dict()["params_ratio"], 3)
0.479
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "LayerReport"]


@dataclass
class LayerReport:
    """One dense k×k conv that was considered.

    ``form`` is ``"A"``/``"B"`` for a converted layer, ``"dense"`` where the ``macs`` budget was
    best spent keeping it (or, with ``objective="latency"``, where no variant beat it). MACs are
    per image at the example input's size (``None`` without one). ``weight_error`` is
    ``‖W − Ŵ‖_F / ‖W‖_F``; ``energy_kept`` is ``1 − weight_error²``.

    Only with ``objective="latency"`` (else ``None``): ``dense_ms`` and ``separable_ms`` are the
    layer's measured milliseconds per call at the latency batch size (summed over its calls) –
    ``separable_ms`` for the chosen variant, or for the fastest candidate when the layer was kept
    dense; ``candidates_ms`` maps every timed variant (``"A1"`` = Form A, rank 1) to its time;
    ``reason`` says why a layer stayed dense (e.g. ``"slower than dense: 0.41 ms vs 0.38 ms"``)
    or that a slower variant was forced.
    """

    name: str
    shape: tuple[int, int, int, int]  # (N, C/G, kh, kw) of the dense kernel
    groups: int
    stride: tuple[int, int]
    form: str
    rank: int | None
    max_rank: int | None
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    weight_error: float
    energy_kept: float
    dense_ms: float | None = None
    separable_ms: float | None = None
    candidates_ms: dict[str, float] | None = None
    reason: str | None = None


@dataclass
class ConversionReport:
    """What :func:`convert_to_separable` did.

    ``macs_before``/``macs_after`` are whole-model MACs per image counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on the example input (``None``
    without one); ``skipped`` lists every other ``Conv2d`` with the reason; ``messages`` holds
    notes such as "nothing worth converting". ``objective`` is ``"accuracy"`` or ``"latency"``;
    for the latter ``latency_setup`` records where the layers were timed (device, dtype, memory
    format, batch size, threads, margin, force). ``str(report)`` is a table; ``to_dict()`` is
    JSON-ready.
    """

    policy: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int = 0
    params_after: int = 0
    input_shape: tuple[int, ...] | None = None
    messages: list[str] = field(default_factory=list)
    objective: str = "accuracy"
    latency_setup: dict[str, Any] | None = None

    @property
    def converted(self) -> list[LayerReport]:
        """The layers that became separable."""
        return [layer for layer in self.layers if layer.form != "dense"]

    @property
    def nothing_converted(self) -> bool:
        return not self.converted

    @property
    def macs_ratio(self) -> float | None:
        if self.macs_before is None or self.macs_after is None or not self.macs_before:
            return None
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float | None:
        return self.params_after / self.params_before if self.params_before else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (e.g. for ``convert.json``)."""
        out = asdict(self)
        out["skipped"] = [list(s) for s in self.skipped]
        out["macs_ratio"] = self.macs_ratio
        out["params_ratio"] = self.params_ratio
        return out

    def table(self) -> str:
        """The report as a fixed-width text table."""
        timed = any(layer.dense_ms is not None for layer in self.layers)
        rows = [("layer", "kernel", "stride", "form", "rank", "MACs before → after", "params before → after",
                 "w.err") + (("ms dense → sep", "note") if timed else ())]
        for layer in self.layers:
            n, cg, kh, kw = layer.shape
            kernel = f"{n}x{cg}x{kh}x{kw}" + (f"/g{layer.groups}" if layer.groups > 1 else "")
            rank = "-" if layer.rank is None else f"{layer.rank}/{layer.max_rank}"
            macs = (f"{_si(layer.macs_before)} → {_si(layer.macs_after)}"
                    if layer.macs_before is not None else "?")
            params = f"{_si(layer.params_before)} → {_si(layer.params_after)}"
            row = (layer.name, kernel, "x".join(map(str, layer.stride)), layer.form, rank, macs,
                   params, f"{layer.weight_error:.3f}")
            if timed:
                ms = (f"{layer.dense_ms:.3f} → {layer.separable_ms:.3f}"
                      if layer.dense_ms is not None and layer.separable_ms is not None else "?")
                row += (ms, layer.reason or "")
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        total = f"policy {self.policy}: {len(self.converted)} of {len(self.layers)} layers converted"
        if self.objective != "accuracy":
            total = f"objective {self.objective}, {total}"
        if self.macs_ratio is not None:
            total += (f"; MACs/image {_si(self.macs_before)} → {_si(self.macs_after)} "
                      f"({self.macs_ratio:.3f}x, FlopCounterMode at input {list(self.input_shape or [])})")
        if self.params_ratio is not None:
            total += f"; params {_si(self.params_before)} → {_si(self.params_after)} ({self.params_ratio:.3f}x)"
        lines.append(total)
        lines.extend(f"note: {m}" for m in self.messages)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _si(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)
