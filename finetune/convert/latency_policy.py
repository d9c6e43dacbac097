"""``convert_to_separable(objective="latency")``: time each convertible layer's candidate variants
against the dense layer (:func:`~finetune.convert.latency.time_layer_variants`) and choose only
among those measured faster than it (all of them with ``force=True``).

The candidates are the variants the rank policy would consider: ``rank=``: that rank;
``energy=``: the energy rank; ``macs=``: ranks 1–:data:`LATENCY_MAX_RANK` and the MAC policy's own
pick; each in every allowed form. A layer with no faster variant stays dense, its
:class:`~finetune.convert.report.LayerReport` ``reason`` starting with one of
:data:`VETO_PREFIXES`.

>>> import torch
>>> from torch import nn
>>> from finetune.convert import convert_to_separable
>>> net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1))
>>> sep = convert_to_separable(net, rank=1, objective="latency", force=True,   # force: convert even if slower
...                            example_input=torch.randn(1, 16, 32, 32), latency_repeats=3)
>>> layer = sep.conversion_report.layers[0]
>>> sorted(layer.candidates_ms), layer.form in ("A", "B"), layer.dense_ms > 0
(['A1', 'B1'], True, True)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from finetune.config.choices import OBJECTIVES  # the recipe's convert.objective choices: one list
from finetune.convert.latency import LayerTiming, memory_format_of, time_layer_variants
from finetune.convert.layers import SeparableConv2d
from finetune.convert.policy import Choice, LayerGeometry, allocate_macs, energy_rank
from finetune.convert.report import ConversionReport
from finetune.convert.svd import ChannelSVD, Form, RankArg
from finetune.errors import FinetuneError

LATENCY_MAX_RANK = 4  # macs= with objective="latency" times ranks 1..4 (and the MAC policy's pick)
VETO_PREFIXES = ("slower than dense", "not faster than dense", "not run by example_input")

__all__ = ["LATENCY_MAX_RANK", "OBJECTIVES", "VETO_PREFIXES", "check_objective", "choose_by_latency",
           "summarize_latency"]


def check_objective(objective: str, force: bool, memory_format: str, batch_size: int, repeats: int,
                     margin: float) -> bool:
    """Validate the objective and its timing options; True for ``objective="latency"``.

    >>> check_objective("latency", force=False, memory_format="channels_last", batch_size=1, repeats=7,
    ...                 margin=0.05)
    True
    """
    if objective not in OBJECTIVES:
        raise FinetuneError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))}, got {objective!r}")
    memory_format_of(memory_format)
    if not isinstance(force, bool):
        raise FinetuneError(f"force must be True or False, got {force!r}")
    if force and objective != "latency":
        raise FinetuneError("force=True lifts the latency objective's slower-than-dense veto: "
                            "pass objective='latency' with it")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FinetuneError(f"latency_batch_size must be a positive int, got {batch_size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise FinetuneError(f"latency_repeats must be a positive int, got {repeats!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
        raise FinetuneError(f"latency_margin must be a fraction in [0, 1), got {margin!r}")
    return objective == "latency"


def _label(choice: tuple[Form, int]) -> str:
    return f"{choice[0]}{choice[1]}"


def _latency_candidates(svds: Mapping[Form, ChannelSVD], policy_choice: Choice, rank: RankArg | None,
                        energy: float | None) -> list[tuple[Form, int]]:
    """The variants the policy would consider for one layer: ``rank``: that rank (clipped to the
    exact rank); ``energy``: the energy rank; ``macs``: ranks 1..LATENCY_MAX_RANK; in each form,
    plus the accuracy policy's own pick."""
    out: list[tuple[Form, int]] = []
    for f, svd in svds.items():
        if rank is not None:
            ranks = [svd.max_rank if rank == "full" else min(int(rank), svd.max_rank)]
        elif energy is not None:
            ranks = [energy_rank(svd, float(energy))]
        else:
            ranks = list(range(1, min(LATENCY_MAX_RANK, svd.max_rank) + 1))
        out += [(f, r) for r in ranks if (f, r) not in out]
    if policy_choice is not None and policy_choice not in out:
        out.append(policy_choice)
    return out


def choose_by_latency(
    candidates: Sequence[tuple[str, nn.Conv2d]],
    svds: Mapping[str, Mapping[Form, ChannelSVD]],
    geoms: Mapping[str, LayerGeometry],
    policy_choices: Mapping[str, Choice],
    shapes: Mapping[str, list[tuple[int, ...]]],
    *,
    rank: RankArg | None,
    energy: float | None,
    budget: float | None,
    macs: float | None,
    force: bool,
    memory_format: str,
    batch_size: int,
    repeats: int,
    margin: float,
    report: ConversionReport,
) -> tuple[dict[str, Choice], dict[str, dict[str, Any]]]:
    """Time every layer's candidates against the dense conv and choose among those faster than
    it (all of them with ``force``). Returns the choices and, per layer, the LayerReport timing
    fields (``dense_ms``, ``separable_ms``, ``candidates_ms``, ``reason``)."""
    weight = candidates[0][1].weight
    report.latency_setup = {
        "device": str(weight.device), "dtype": str(weight.dtype).replace("torch.", ""),
        "memory_format": memory_format, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "repeats": repeats, "margin": margin, "force": force,
    }
    cands: dict[str, list[tuple[Form, int]]] = {}
    timings: dict[str, LayerTiming | None] = {}
    allowed: dict[str, list[tuple[Form, int]]] = {}
    for name, conv in candidates:
        cands[name] = _latency_candidates(svds[name], policy_choices[name], rank, energy)
        if not shapes.get(name):
            timings[name] = None  # the example input never reached this conv
            allowed[name] = list(cands[name]) if force else []
            continue
        variants = {c: SeparableConv2d.from_dense(conv, c[1], c[0], svd=svds[name][c[0]]) for c in cands[name]}
        timings[name] = timing = time_layer_variants(conv, variants, shapes[name], batch_size=batch_size,
                                                     memory_format=memory_format, repeats=repeats)
        allowed[name] = [c for c in cands[name] if force or timing.faster(c, margin)]

    def fastest(name: str, among: Sequence[tuple[Form, int]]) -> tuple[Form, int]:
        timing = timings[name]
        if timing is None:  # forced without a measurement: the accuracy policy's pick if allowed
            pick = policy_choices[name]
            return pick if pick in among else among[0]  # type: ignore[return-value]
        return min(among, key=lambda c: timing.variants[c].seconds)

    choices: dict[str, Choice] = {}
    if budget is None:  # rank= / energy=: the fastest allowed variant, else dense
        choices = {name: fastest(name, allowed[name]) if allowed[name] else None for name, _ in candidates}
    else:
        def cheapest(name: str) -> Choice:
            geom = geoms[name]
            options: list[tuple[float, int, Choice]] = [(float(geom.dense_cost()), 0, None)]
            options += [(float(geom.cost(*c)), i + 1, c) for i, c in enumerate(allowed[name])]
            return min(options, key=lambda o: (o[0], o[1]))[2]

        floor_choices = {name: cheapest(name) for name, _ in candidates}
        need = sum(geoms[n].dense_cost() if c is None else geoms[n].cost(*c) for n, c in floor_choices.items())
        if need <= budget * (1 + 1e-12):
            choices = allocate_macs([(geoms[name], svds[name]) for name, _ in candidates], budget,
                                    allowed={name: set(allowed[name]) for name, _ in candidates})
        else:
            assert report.macs_before and macs is not None
            fixed = float(macs) * report.macs_before - budget  # MACs outside the convertible layers
            left = (fixed + need) / report.macs_before
            report.messages.append(
                f"macs={macs} cannot be met with variants measured faster than dense: the cheapest such "
                f"choices leave {left:.3f} of the original MACs; kept the faster-than-dense choices "
                "(cheapest in MACs per layer; pass force=True to allow slower variants)")
            choices = floor_choices

    notes: dict[str, dict[str, Any]] = {}
    for name, _ in candidates:
        timing, choice = timings[name], choices[name]
        if timing is None:
            notes[name] = {"reason": "not run by example_input: its latency could not be measured"
                           if choice is None else "forced: not run by example_input, latency unmeasured"}
            continue
        dense_ms = timing.dense_s * 1e3
        cand_ms = {_label(c): timing.variants[c].seconds * 1e3 for c in cands[name]}
        shown = choice if choice is not None else fastest(name, cands[name])
        sep_ms = timing.variants[shown].seconds * 1e3
        reason: str | None = None
        if choice is None:
            if allowed[name]:  # a variant was allowed, the macs= allocation preferred dense
                reason = "kept dense: the MAC budget is better spent on other layers"
            elif sep_ms >= dense_ms:
                reason = f"slower than dense: {sep_ms:.3f} ms vs {dense_ms:.3f} ms"
            else:
                reason = (f"not faster than dense by the {margin:.0%} margin: {sep_ms:.3f} ms vs "
                          f"{dense_ms:.3f} ms")
        elif not timing.faster(choice, margin):
            reason = f"forced: {sep_ms:.3f} ms vs {dense_ms:.3f} ms dense"
        notes[name] = {"dense_ms": dense_ms, "separable_ms": sep_ms, "candidates_ms": cand_ms, "reason": reason}

    setup = report.latency_setup
    timed = [(notes[n]["dense_ms"], notes[n]["separable_ms"]) for n, _ in candidates
             if choices[n] is not None and notes[n].get("dense_ms") is not None]
    report.messages.append(
        f"objective latency: each convertible layer timed on {setup['device']} {setup['dtype']} "
        f"{memory_format} at batch {batch_size} with {setup['threads']} thread(s), dense vs "
        f"{sum(len(c) for c in cands.values())} candidate variant(s), {repeats} interleaved rounds; a "
        f"variant must beat dense by {margin:.0%}" + (" (force=True: veto lifted)" if force else "")
        + (f"; converted layers {sum(d for d, _ in timed):.3f} ms dense → {sum(s for _, s in timed):.3f} ms"
           if timed else ""))
    return choices, notes


def summarize_latency(report: ConversionReport) -> None:
    """Append to ``report.messages`` why layers stayed dense under ``objective="latency"``: no
    variant measured faster (the veto) or the MAC budget better spent elsewhere.

    >>> from finetune.convert.report import LayerReport
    >>> report = ConversionReport(policy="rank=1", objective="latency")
    >>> report.layers.append(LayerReport("conv", (8, 8, 3, 3), 1, (1, 1), "dense", None, None, None, None,
    ...                                  584, 584, 0.0, 1.0, reason="slower than dense: 0.5 ms vs 0.4 ms"))
    >>> summarize_latency(report)
    >>> report.messages[-1]
    'nothing converted: no candidate variant was measured faster than its dense layer'
    """
    messages = report.messages
    dense = [layer for layer in report.layers if layer.form == "dense"]
    vetoed = [layer.name for layer in dense if layer.reason and layer.reason.startswith(VETO_PREFIXES)]
    if vetoed:
        messages.append(f"{len(vetoed)} layer(s) kept dense: no candidate variant was measured faster "
                        f"than the dense layer (e.g. {vetoed[0]}); pass force=True to convert anyway")
    budgeted = [layer.name for layer in dense if layer.name not in vetoed]
    if budgeted:
        messages.append(f"{len(budgeted)} layer(s) kept dense: the MAC budget is better spent on other "
                        "layers")
    if report.nothing_converted:
        messages.append("nothing converted: no candidate variant was measured faster than its dense layer"
                        if vetoed else "nothing converted: the MAC budget is met with every layer dense")
