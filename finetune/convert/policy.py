"""Rank policies: how many separable branches each converted layer keeps, and in which form.

* ``rank=int | "full"`` – the same rank everywhere (clipped to each layer's exact rank).
* ``energy=f`` – per layer, the smallest rank keeping a fraction ``f`` of the kernel's
  singular-value energy (Σ kept σ² / ‖W‖²).
* ``macs=f`` – a global budget, ``f`` × the original model's MACs: greedy allocation by weight
  error dropped per added MAC (per-layer error = dropped σ² / ‖W‖²), keeping a layer dense when
  that is the better use of the budget.

Hand-written because no library allocates SVD ranks under a MAC budget; the greedy walks each
layer's lower convex hull of (MACs, error) options, which is the classic marginal-analysis
allocation (optimal for the convex relaxation), then spends what is left on the best remaining
single upgrades.

>>> import torch
>>> from finetune.convert.svd import channel_svd
>>> from finetune.convert.policy import energy_rank
>>> w = torch.zeros(4, 1, 3, 3)                  # one input channel, 4 × 9 matrix, σ = 3, 2, 1
>>> w[0, 0, 0, 0], w[1, 0, 0, 1], w[2, 0, 0, 2] = 3.0, 2.0, 1.0
>>> svd = channel_svd(w, form="A")
>>> energy_rank(svd, 0.9), energy_rank(svd, 13 / 14), energy_rank(svd, 0.99)
(2, 2, 3)
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Collection, Mapping, Optional, Sequence, Tuple

from finetune.convert.svd import (
    ChannelSVD,
    Form,
    RankArg,
    dense_macs,
    dense_params,
    pick_form,
    separable_macs,
    separable_params,
)
from finetune.errors import FinetuneError

Choice = Optional[Tuple[Form, int]]  # (form, rank), or None: keep the layer dense

__all__ = ["Choice", "LayerGeometry", "allocate_macs", "check_policy", "choose_for_energy", "choose_for_rank",
           "energy_rank"]


def check_policy(rank: RankArg | None, energy: float | None, macs: float | None) -> str:
    """Validate that exactly one of ``rank``, ``energy``, ``macs`` is given; returns it as
    ``"key=value"`` (the report's ``policy``). Raises :class:`FinetuneError` otherwise.

    >>> check_policy(rank=None, energy=None, macs=0.4)
    'macs=0.4'
    """
    given = [(k, v) for k, v in (("rank", rank), ("energy", energy), ("macs", macs)) if v is not None]
    if len(given) != 1:
        raise FinetuneError("pass exactly one of rank=, energy=, macs= "
                            f"(got {', '.join(k for k, _ in given) or 'none'})")
    key, value = given[0]
    if key == "rank" and value != "full" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise FinetuneError(f"rank must be a positive int or 'full', got {value!r}")
    if key == "energy" and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not 0.0 < float(value) <= 1.0):
        raise FinetuneError(f"energy must be a fraction in (0, 1], got {value!r}")
    if key == "macs" and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value) or value <= 0):
        raise FinetuneError(f"macs must be a positive fraction of the original MACs, got {value!r}")
    return f"{key}={value}"


@dataclass
class LayerGeometry:
    """What the cost model needs about one conv: its shape and the spatial sizes it ran at.

    ``calls`` holds ``(input pixels, output pixels)`` per image for every call seen while
    running the example input (a conv called twice counts twice); empty when unknown, and then
    :meth:`cost` falls back to a per-output-pixel estimate (``stride²`` input pixels).

    >>> geom = LayerGeometry("conv", 8, 16, 1, 9, (1, 1), False, calls=[(64, 64)])
    >>> geom.dense_cost(), geom.cost("A", 1), geom.cost("B", 1), geom.params("A", 1)
    (73728, 17408, 12800, 272)
    """

    name: str
    out_channels: int
    in_channels: int
    groups: int
    kernel: int  # kh·kw
    stride: tuple[int, int]
    bias: bool
    calls: list[tuple[int, int]] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return bool(self.calls)

    def _calls(self) -> list[tuple[int, int]]:
        return self.calls or [(self.stride[0] * self.stride[1], 1)]

    def dense_cost(self) -> int:
        return sum(dense_macs(self.out_channels, self.in_channels, self.groups, self.kernel, o)
                   for _, o in self._calls())

    def cost(self, form: Form, rank: int) -> int:
        return sum(separable_macs(form, rank, self.out_channels, self.in_channels, self.groups,
                                  self.kernel, i, o) for i, o in self._calls())

    def dense_macs(self) -> int | None:
        """MACs per image of the dense conv; ``None`` when the spatial sizes are unknown."""
        return self.dense_cost() if self.known else None

    def macs(self, form: Form, rank: int) -> int | None:
        """MACs per image of the separable module; ``None`` when the spatial sizes are unknown."""
        return self.cost(form, rank) if self.known else None

    def dense_params(self) -> int:
        return dense_params(self.out_channels, self.in_channels, self.groups, self.kernel, self.bias)

    def params(self, form: Form, rank: int) -> int:
        return separable_params(form, rank, self.out_channels, self.in_channels, self.groups,
                                self.kernel, self.bias)


def energy_rank(svd: ChannelSVD, energy: float) -> int:
    """Smallest rank (same for every channel) keeping at least ``energy`` of Σσ².

    A tolerance of 1e-9 absorbs float round-off at exact boundaries (e.g. 13/14 in the module
    example).

    >>> import torch
    >>> from finetune.convert.svd import channel_svd
    >>> energy_rank(channel_svd(torch.randn(8, 16, 3, 3), form="A"), 1.0)   # all of it: exact rank
    8
    """
    if not 0.0 < energy <= 1.0:
        raise FinetuneError(f"energy must be in (0, 1], got {energy!r}")
    dropped = svd.dropped_energy()
    for r in range(1, svd.max_rank + 1):
        if 1.0 - float(dropped[r]) >= energy - 1e-9:
            return r
    return svd.max_rank


def choose_for_rank(svds: Mapping[Form, ChannelSVD], geom: LayerGeometry, rank: int | str) -> tuple[Form, int]:
    """``rank=int|"full"``: with one form, that form at ``min(rank, exact rank)``; with both,
    Form B only where it has no more error and no more MACs than Form A and beats it on one.

    >>> import torch
    >>> from finetune.convert.svd import channel_svd
    >>> w = torch.randn(8, 16, 3, 3)                  # more inputs than outputs: Form B is cheaper
    >>> svds = {f: channel_svd(w, form=f) for f in ("A", "B")}
    >>> geom = LayerGeometry("conv", 8, 16, 1, 9, (1, 1), False, calls=[(64, 64)])
    >>> choose_for_rank({"A": svds["A"]}, geom, 99), choose_for_rank(svds, geom, "full")
    (('A', 8), ('B', 9))
    """
    picks = {}
    for form, svd in svds.items():
        r = svd.max_rank if rank == "full" else min(int(rank), svd.max_rank)
        picks[form] = (r, svd.weight_error(r) ** 2, geom.cost(form, r))
    if len(picks) == 1:
        form = next(iter(picks))
        return form, picks[form][0]
    (_, ea, ca), (_, eb, cb) = picks["A"], picks["B"]
    form = pick_form(ea, ca, eb, cb)
    return form, picks[form][0]


def choose_for_energy(svds: Mapping[Form, ChannelSVD], geom: LayerGeometry, energy: float) -> tuple[Form, int]:
    """``energy=f``: per form the smallest rank keeping ``f``; with both forms, the one with
    fewer MACs (ties: lower error, then Form A).

    >>> import torch
    >>> from finetune.convert.svd import channel_svd
    >>> w = torch.randn(8, 16, 3, 3)
    >>> svds = {f: channel_svd(w, form=f) for f in ("A", "B")}
    >>> geom = LayerGeometry("conv", 8, 16, 1, 9, (1, 1), False, calls=[(64, 64)])
    >>> choose_for_energy(svds, geom, 1.0)            # both exact; Form B needs fewer MACs here
    ('B', 9)
    """
    best: tuple[float, float, int, Form] | None = None
    for form, svd in svds.items():
        r = energy_rank(svd, energy)
        key = (geom.cost(form, r), float(svd.dropped_energy()[r]), 0 if form == "A" else 1, form)
        if best is None or key[:3] < best[:3]:
            best = key
    assert best is not None
    return best[3], energy_rank(svds[best[3]], energy)


@dataclass
class _Option:
    macs: float
    err: float
    choice: Choice


def _frontier(svds: Mapping[Form, ChannelSVD], geom: LayerGeometry,
              allowed: Collection[tuple[Form, int]] | None = None) -> list[_Option]:
    """All (MACs, error) options of a layer, Pareto-pruned: cost up, error strictly down.
    Keeping the layer dense (error 0 at the dense cost) is one of them; ``allowed`` (when given)
    limits the separable ones to those ``(form, rank)`` pairs."""
    options = [_Option(float(geom.dense_cost()), 0.0, None)]
    for form, svd in svds.items():
        dropped = svd.dropped_energy()
        for r in range(1, svd.max_rank + 1):
            if allowed is None or (form, r) in allowed:
                options.append(_Option(float(geom.cost(form, r)), float(dropped[r]), (form, r)))
    options.sort(key=lambda o: (o.macs, o.err, o.choice is not None))
    pareto: list[_Option] = []
    for o in options:
        if not pareto or o.err < pareto[-1].err - 1e-15:
            pareto.append(o)
    return pareto


def _lower_hull(points: list[_Option]) -> list[_Option]:
    """Lower convex hull of a Pareto front sorted by cost (monotone chain)."""
    hull: list[_Option] = []
    for p in points:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a → p
            if (b.err - a.err) * (p.macs - a.macs) >= (p.err - a.err) * (b.macs - a.macs):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate_macs(
    layers: Sequence[tuple[LayerGeometry, Mapping[Form, ChannelSVD]]],
    budget: float,
    allowed: Mapping[str, Collection[tuple[Form, int]]] | None = None,
) -> dict[str, Choice]:
    """Greedy rank allocation: the layers' MACs together stay ≤ ``budget`` (MACs per image
    left for these layers once everything unconverted is paid for), minimising the sum of
    per-layer errors (dropped σ² / ‖W‖²). Returns ``{name: (form, rank) or None (dense)}``.

    ``allowed`` maps a layer name to the ``(form, rank)`` variants it may take (keeping it dense
    is always allowed); layers not in it may take any. ``objective="latency"`` passes the
    variants measured faster than the dense layer.

    Raises :class:`FinetuneError` when even the cheapest option of every layer does not fit.

    >>> import torch
    >>> from finetune.convert.svd import channel_svd
    >>> geom = LayerGeometry("conv", 8, 8, 1, 9, (1, 1), False, calls=[(64, 64)])
    >>> svds = {"A": channel_svd(torch.randn(8, 8, 3, 3), form="A")}
    >>> allocate_macs([(geom, svds)], budget=geom.dense_cost())      # dense fits: keep it exact
    {'conv': None}
    >>> allocate_macs([(geom, svds)], budget=geom.cost("A", 2))
    {'conv': ('A', 2)}
    """
    fronts = {geom.name: _frontier(svds, geom, None if allowed is None else allowed.get(geom.name))
              for geom, svds in layers}
    hulls = {name: _lower_hull(front) for name, front in fronts.items()}
    current = {name: front[0] for name, front in fronts.items()}  # cheapest option each
    spent = sum(o.macs for o in current.values())
    if spent > budget * (1 + 1e-12):
        raise FinetuneError(f"the MAC budget cannot be met: rank 1 everywhere still needs {spent:.4g} "
                            f"MACs in the converted layers, {budget:.4g} are left for them")
    # Phase 1: walk each layer's hull by best error drop per added MAC.
    position = {name: 0 for name in hulls}
    heap: list[tuple[float, int, str]] = []
    tie = 0

    def push(name: str) -> None:
        nonlocal tie
        hull, i = hulls[name], position[name]
        if i + 1 < len(hull):
            step_macs = hull[i + 1].macs - hull[i].macs
            drop = hull[i].err - hull[i + 1].err
            slope = drop / step_macs if step_macs > 0 else float("inf")
            heapq.heappush(heap, (-slope, tie, name))
            tie += 1

    for name in hulls:
        push(name)
    while heap:
        _, _, name = heapq.heappop(heap)
        hull, i = hulls[name], position[name]
        extra = hull[i + 1].macs - current[name].macs
        if spent + extra > budget * (1 + 1e-12):
            continue  # this layer's next hull step does not fit; later ones cost even more
        spent += extra
        position[name] = i + 1
        current[name] = hull[i + 1]
        push(name)
    # Phase 2: off-hull Pareto points can still use the leftover; take the largest error drop.
    while True:
        best: tuple[float, str, _Option] | None = None
        for name, front in fronts.items():
            for o in front:
                extra = o.macs - current[name].macs
                drop = current[name].err - o.err
                if drop > 0 and spent + extra <= budget * (1 + 1e-12):
                    if best is None or drop > best[0]:
                        best = (drop, name, o)
        if best is None:
            break
        _, name, o = best
        spent += o.macs - current[name].macs
        current[name] = o
    return {name: o.choice for name, o in current.items()}
