"""Model surgery: find the dense k×k convs, pick a form and rank per layer, swap in
:class:`~finetune.convert.layers.SeparableConv2d`, and report what changed.

Why hand-written: module replacement follows timm's ``convert_sync_batchnorm`` / peft's
``_replace_module`` (``setattr`` on the parent), but neither knows about SVD factorisation,
rank budgets or a reloadable plan.

Return convention: :func:`convert_to_separable` and :func:`apply_plan` return the model and
attach two plain attributes to it:

* ``model.separable_plan`` – a JSON-ready ``list[dict]``, one entry per converted layer:
  ``{"name", "form", "rank", "in_channels", "out_channels", "kernel_size", "groups"}``. It is
  all :func:`apply_plan` needs to rebuild the structure before ``load_state_dict``.
* ``model.conversion_report`` – a :class:`ConversionReport` (only from ``convert_to_separable``).

>>> import torch, timm
>>> from finetune.convert import convert_to_separable, apply_plan
>>> model = timm.create_model("resnet18", num_classes=10).eval()
>>> x = torch.randn(1, 3, 64, 64)
>>> sep = convert_to_separable(model, macs=0.4, example_input=x)
>>> sep.conversion_report.macs_after <= 0.4 * sep.conversion_report.macs_before
True
>>> fresh = apply_plan(timm.create_model("resnet18", num_classes=10), sep.separable_plan)
>>> _ = fresh.load_state_dict(sep.state_dict())
>>> bool(torch.equal(fresh.eval()(x), sep(x)))
True
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from finetune.convert.layers import (
    ChannelSVD,
    Form,
    FormArg,
    RankArg,
    SeparableConv2d,
    channel_svd,
    conv_kind,
    effective_weight,
    has_dynamic_same_padding,
)
from finetune.convert.latency import LayerTiming, memory_format_of, time_layer_variants
from finetune.convert.policy import (
    Choice,
    LayerGeometry,
    allocate_macs,
    choose_for_energy,
    choose_for_rank,
    energy_rank,
)
from finetune.errors import FinetuneError

ExampleInput = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]
Patterns = Union[str, Sequence[str], None]
Plan = list[dict[str, Any]]

OBJECTIVES = ("accuracy", "latency")
LATENCY_MAX_RANK = 4  # macs= with objective="latency" times ranks 1..4 (and the MAC policy's pick)

__all__ = [
    "ConversionReport",
    "LayerReport",
    "Plan",
    "apply_plan",
    "convert_to_separable",
    "count_macs",
    "find_convertible",
]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Helpers: running the example input, counting MACs, replacing modules
# --------------------------------------------------------------------------------------------

def model_device(model: nn.Module) -> torch.device | None:
    """Device of the first parameter (or buffer); ``None`` for a module with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _to_device(example: ExampleInput, device: torch.device | None) -> ExampleInput:
    if device is None:
        return example
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    return type(example)(v.to(device) if isinstance(v, torch.Tensor) else v for v in example)  # type: ignore[call-arg]


def _batch_size(example: ExampleInput) -> int:
    values: Iterable[Any]
    if isinstance(example, torch.Tensor):
        values = [example]
    elif isinstance(example, Mapping):
        values = example.values()
    else:
        values = example
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _run(model: nn.Module, example: ExampleInput) -> None:
    """One eval-mode, no-grad forward (BN running stats untouched); training flags restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example, torch.Tensor):
                model(example)
            elif isinstance(example, Mapping):
                model(**example)
            else:
                model(*example)
    finally:
        for m, flag in flags.items():
            m.training = flag


def count_macs(model: nn.Module, example_input: ExampleInput) -> int:
    """Whole-model multiply-accumulates per image, counted by ``torch.utils.flop_counter``
    (FLOPs / 2, bias adds and elementwise ops not counted) in eval mode on ``example_input``
    (a tensor, a tuple of positional inputs, or a dict of keyword inputs).

    >>> import torch
    >>> from torch import nn
    >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 4, 4))   # 8·3·9 per pixel, 16 pixels
    3456
    """
    example = _to_device(example_input, model_device(model))
    counter = FlopCounterMode(display=False)
    with counter:
        _run(model, example)
    return int(counter.get_total_flops()) // 2 // _batch_size(example)


def _default_example(model: nn.Module) -> torch.Tensor | None:
    """A zero batch at a timm model's ``pretrained_cfg['input_size']``, when it has one."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if not size or len(size) != 3:
        return None
    return torch.zeros(1, *[int(s) for s in size])


def _record_calls(model: nn.Module, convs: Mapping[str, nn.Conv2d], example: ExampleInput,
                  shapes: dict[str, list[tuple[int, ...]]] | None = None) -> dict[str, list[tuple[int, int]]]:
    """(input pixels, output pixels) per image for each call of each conv, by forward hooks;
    when ``shapes`` is given, each call's full input shape is appended to ``shapes[name]``."""
    calls: dict[str, list[tuple[int, int]]] = {name: [] for name in convs}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return  # called with keyword input only: its MACs stay unknown (0)
            x = args[0]
            calls[name].append((int(x.shape[-2] * x.shape[-1]), int(output.shape[-2] * output.shape[-1])))
            if shapes is not None:
                shapes.setdefault(name, []).append(tuple(int(d) for d in x.shape))
        return hook

    handles = [conv.register_forward_hook(hook_for(name)) for name, conv in convs.items()]
    try:
        _run(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``old`` is referenced (shared modules included); returns the root."""
    if model is old:
        return new
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, key, new)
    return model


def _as_patterns(patterns: Patterns) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def find_convertible(
    model: nn.Module,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    min_in_channels: int = 5,
) -> tuple[list[tuple[str, nn.Conv2d]], list[tuple[str, str]]]:
    """Split the model's ``Conv2d`` modules into ``(convertible, skipped-with-reason)``.

    Left alone: 1×1 convs, depthwise convs (``groups == in_channels``: already separable),
    convs with fewer than ``min_in_channels`` input channels (RGB stems: little to gain, much to
    lose), convs inside an existing :class:`SeparableConv2d`, unknown ``Conv2d`` subclasses, and
    names filtered out by ``include``/``exclude`` (``fnmatch`` patterns on module names).

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1))
    >>> ok, skipped = find_convertible(net)
    >>> [name for name, _ in ok], [name for name, _ in skipped]
    (['1'], ['0', '2'])
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    convertible: list[tuple[str, nn.Conv2d]] = []
    skipped: list[tuple[str, str]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, SeparableConv2d):
            inside.append(name + "." if name else "")
            continue
        if not isinstance(module, nn.Conv2d):
            continue
        if conv_kind(module) is None:
            reason = f"unsupported Conv2d subclass `{type(module).__name__}`"
        elif tuple(module.kernel_size) == (1, 1):
            reason = "1x1"
        elif module.groups == module.in_channels:
            reason = "depthwise (already separable)"
        elif inc is not None and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            reason = "not matched by include"
        elif exc is not None and any(fnmatch.fnmatchcase(name, p) for p in exc):
            reason = "matched by exclude"
        elif module.in_channels < min_in_channels:
            reason = (f"{module.in_channels} input channels < min_in_channels={min_in_channels} "
                      f"(pass min_in_channels={module.in_channels} to convert it)")
        else:
            convertible.append((name, module))
            continue
        skipped.append((name, reason))
    return convertible, skipped


def _geometry(name: str, conv: nn.Conv2d, calls: list[tuple[int, int]]) -> LayerGeometry:
    return LayerGeometry(name=name, out_channels=conv.out_channels, in_channels=conv.in_channels,
                         groups=conv.groups, kernel=conv.kernel_size[0] * conv.kernel_size[1],
                         stride=tuple(conv.stride), bias=conv.bias is not None, calls=calls)  # type: ignore[arg-type]


def _plan_entry(name: str, sep: SeparableConv2d) -> dict[str, Any]:
    return {"name": name, "form": sep.form, "rank": sep.rank, "in_channels": sep.in_channels,
            "out_channels": sep.out_channels, "kernel_size": list(sep.kernel_size), "groups": sep.groups}


def _check_policy(rank: RankArg | None, energy: float | None, macs: float | None) -> str:
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


def _check_objective(objective: str, force: bool, memory_format: str, batch_size: int, repeats: int,
                     margin: float) -> bool:
    """Validate the objective and its timing options; True for ``objective="latency"``."""
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


# --------------------------------------------------------------------------------------------
# objective="latency": time each layer's candidates, veto those not faster than dense
# --------------------------------------------------------------------------------------------

_VETO_PREFIXES = ("slower than dense", "not faster than dense", "not run by example_input")


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


def _choose_by_latency(
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


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def convert_to_separable(
    model: nn.Module,
    *,
    rank: RankArg | None = None,
    energy: float | None = None,
    macs: float | None = None,
    form: FormArg = "auto",
    example_input: ExampleInput | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    min_in_channels: int = 5,
    inplace: bool = False,
    objective: str = "accuracy",
    force: bool = False,
    memory_format: str = "contiguous",
    latency_batch_size: int = 1,
    latency_repeats: int = 7,
    latency_margin: float = 0.05,
) -> nn.Module:
    """Replace dense k×k convs by SVD-initialised :class:`SeparableConv2d` modules.

    Exactly one policy: ``rank`` (int or ``"full"``: exact, same outputs to float precision),
    ``energy`` (per-layer fraction of Σσ² to keep) or ``macs`` (the converted model's MACs ≤
    ``macs`` × the original's, as counted by ``FlopCounterMode``; needs spatial sizes).
    ``form``: ``"A"``, ``"B"`` or ``"auto"`` (both considered: see
    :func:`~finetune.convert.policy.choose_for_rank` and friends).

    ``example_input`` (tensor / tuple / dict fed to ``model``) gives each layer's spatial size
    for MACs; without it a timm model's ``pretrained_cfg["input_size"]`` is used, else MACs are
    not reported and ``macs=`` is refused. The forward runs in eval mode under ``no_grad``.

    Returns a deep copy (the original is untouched) unless ``inplace=True``, with
    ``.separable_plan`` (for :func:`apply_plan`) and ``.conversion_report``
    (:class:`ConversionReport`) attached. When there is nothing worth converting (MobileNet /
    EfficientNet: only an RGB stem is a dense k×k conv) the model comes back unconverted, the
    report's ``messages`` say why and a ``UserWarning`` is issued.

    ``objective``: ``"accuracy"`` (default) takes what the policy picks from weights and MACs
    alone. ``"latency"`` also *measures* each convertible layer on the model's current device
    and dtype, in ``memory_format`` (``"contiguous"`` or ``"channels_last"``), at the input
    shape(s) it saw in ``example_input`` with batch ``latency_batch_size`` (default 1), using the
    current torch thread count: the dense conv and every candidate variant the policy would
    consider (``rank``: that rank; ``energy``: the energy rank; ``macs``: ranks 1–4 and the MAC
    policy's pick; in each allowed form) are timed interleaved (``latency_repeats`` rounds,
    medians; :func:`~finetune.convert.latency.time_layer_variants`). A variant counts as faster
    only if it beats dense by ``latency_margin`` (5%) both in median time and in the median of
    paired per-round ratios. ``rank``/``energy`` take the fastest such variant; ``macs`` allocates
    the budget among such variants (keeping the faster-than-dense choices and saying so in
    ``messages`` when the budget cannot be met with them). A layer with no faster variant stays
    dense, its :class:`LayerReport` ``reason`` saying ``"slower than dense: X ms vs Y ms"``,
    unless ``force=True`` (which lifts that veto; only valid with ``objective="latency"``). The
    timings land in each layer's ``dense_ms`` / ``separable_ms`` / ``candidates_ms``.

    BN statistics after a lossy conversion are stale: call
    :func:`~finetune.convert.reestimate_batchnorm` on a few training batches next.

    >>> import torch, timm
    >>> model = timm.create_model("resnet18", num_classes=10).eval()
    >>> x = torch.randn(2, 3, 64, 64)
    >>> exact = convert_to_separable(model, rank="full")
    >>> bool(torch.allclose(exact(x), model(x), rtol=1e-4, atol=1e-4))
    True
    >>> small = convert_to_separable(model, rank=1, example_input=x)
    >>> round(small.conversion_report.macs_ratio, 2) < 0.2
    True
    """
    policy = _check_policy(rank, energy, macs)
    if form not in ("A", "B", "auto"):
        raise FinetuneError(f"form must be 'A', 'B' or 'auto', got {form!r}")
    latency = _check_objective(objective, force, memory_format, latency_batch_size, latency_repeats,
                               latency_margin)
    work = model if inplace else copy.deepcopy(model)
    candidates, skipped = find_convertible(work, include=include, exclude=exclude,
                                           min_in_channels=min_in_channels)
    report = ConversionReport(policy=policy, skipped=skipped, objective=objective)
    report.params_before = sum(p.numel() for p in work.parameters())

    messages = report.messages
    shapes: dict[str, list[tuple[int, ...]]] = {}
    example = example_input
    if example is None:
        example = _default_example(work)
        if example is not None:
            messages.append(f"no example_input: MACs counted at the model's pretrained_cfg "
                            f"input_size {list(example.shape)}")
    if example is not None:
        example = _to_device(example, model_device(work))
        report.input_shape = tuple(example.shape) if isinstance(example, torch.Tensor) else None
        report.macs_before = count_macs(work, example)
        calls = _record_calls(work, dict(candidates), example, shapes)
    else:
        calls = {name: [] for name, _ in candidates}
        if macs is not None:
            raise FinetuneError("macs= needs the layers' spatial sizes: pass example_input="
                                "(e.g. torch.randn(1, 3, 224, 224))")
        if latency:
            raise FinetuneError("objective='latency' times each layer at the input sizes it sees: pass "
                                "example_input= (e.g. torch.randn(1, 3, 224, 224))")

    geoms = {name: _geometry(name, conv, calls[name]) for name, conv in candidates}
    if report.macs_before and candidates and example is not None:
        share = sum(g.dense_cost() for g in geoms.values()) / report.macs_before
        messages.append(f"the convertible k×k convs hold {100 * share:.1f}% of the model's MACs")

    def finish(plan_added: Plan) -> nn.Module:
        old_plan = list(getattr(work, "separable_plan", None) or [])
        out = work
        out.separable_plan = old_plan + plan_added  # type: ignore[assignment]
        report.params_after = sum(p.numel() for p in out.parameters())
        if example is not None:
            report.macs_after = count_macs(out, example)
        if report.nothing_converted:
            warnings.warn(f"convert_to_separable: {messages[-1]}", UserWarning, stacklevel=3)
        out.conversion_report = report  # type: ignore[assignment]
        return out

    if not candidates:
        kxk = [(n, r) for n, r in skipped if r not in ("1x1", "depthwise (already separable)")]
        detail = "; ".join(f"{n}: {r}" for n, r in kxk[:5]) or "the model has only 1x1 and depthwise convs"
        messages.append(f"nothing worth converting: no dense k×k conv qualifies ({detail})")
        return finish([])

    forms: tuple[Form, ...] = ("A", "B") if form == "auto" else (form,)  # type: ignore[assignment]
    svds: dict[str, dict[Form, ChannelSVD]] = {
        name: {f: channel_svd(effective_weight(conv), conv.groups, f) for f in forms}
        for name, conv in candidates
    }

    choices: dict[str, Choice]
    budget_left: float | None = None  # MACs per image left for the convertible layers (macs=)
    if rank is not None:
        choices = {name: choose_for_rank(svds[name], geoms[name], rank) for name, _ in candidates}
    elif energy is not None:
        choices = {name: choose_for_energy(svds[name], geoms[name], float(energy)) for name, _ in candidates}
    else:
        assert macs is not None and report.macs_before is not None
        budget = float(macs) * report.macs_before
        fixed = report.macs_before - sum(g.dense_cost() for g in geoms.values())
        cheapest = sum(min([g.dense_cost()] + [g.cost(f, 1) for f in forms]) for g in geoms.values())
        if fixed + cheapest > budget:
            floor = (fixed + cheapest) / report.macs_before
            raise FinetuneError(f"macs={macs} cannot be met: rank 1 in every convertible layer still "
                                f"leaves {floor:.3f} of the original MACs; pass macs>={floor:.3f}, "
                                "or include more layers / lower min_in_channels")
        budget_left = budget - fixed
        choices = allocate_macs([(geoms[name], svds[name]) for name, _ in candidates], budget_left)

    notes: dict[str, dict[str, Any]] = {}
    if latency:
        choices, notes = _choose_by_latency(
            candidates, svds, geoms, choices, shapes, rank=rank, energy=energy,
            budget=budget_left, macs=macs, force=force, memory_format=memory_format, batch_size=latency_batch_size,
            repeats=latency_repeats, margin=latency_margin, report=report)

    plan: Plan = []
    more_expensive = []
    for name, conv in candidates:
        geom, choice = geoms[name], choices[name]
        n, cg, kh, kw = conv.weight.shape
        base = dict(name=name, shape=(n, cg, kh, kw), groups=conv.groups, stride=tuple(conv.stride),
                    macs_before=geom.dense_macs(), params_before=geom.dense_params())
        if choice is None:
            report.layers.append(LayerReport(**base, form="dense", rank=None, max_rank=None,  # type: ignore[arg-type]
                                             macs_after=geom.dense_macs(), params_after=geom.dense_params(),
                                             weight_error=0.0, energy_kept=1.0, **notes.get(name, {})))
            continue
        f, r = choice
        svd = svds[name][f]
        sep = SeparableConv2d.from_dense(conv, r, f, svd=svd)
        work = _replace(work, conv, sep)
        plan.append(_plan_entry(name, sep))
        err = svd.weight_error(r)
        layer = LayerReport(**base, form=f, rank=r, max_rank=svd.max_rank,  # type: ignore[arg-type]
                            macs_after=geom.macs(f, r), params_after=geom.params(f, r),
                            weight_error=err, energy_kept=1.0 - err * err, **notes.get(name, {}))
        report.layers.append(layer)
        if geom.cost(f, r) > geom.dense_cost():
            more_expensive.append(name)
    if more_expensive:
        messages.append(f"{len(more_expensive)} converted layer(s) cost more MACs than dense at the "
                        f"chosen rank (e.g. {more_expensive[0]}); use macs= to keep those dense")
    kept = [layer.name for layer in report.layers if layer.form == "dense"]
    if latency:
        vetoed = [layer.name for layer in report.layers if layer.form == "dense" and layer.reason
                  and layer.reason.startswith(_VETO_PREFIXES)]
        if vetoed:
            messages.append(f"{len(vetoed)} layer(s) kept dense: no candidate variant was measured faster "
                            f"than the dense layer (e.g. {vetoed[0]}); pass force=True to convert anyway")
        budgeted = [layer.name for layer in report.layers if layer.form == "dense" and layer.name not in vetoed]
        if budgeted:
            messages.append(f"{len(budgeted)} layer(s) kept dense: the MAC budget is better spent on other "
                            "layers")
        if not plan:
            messages.append("nothing converted: no candidate variant was measured faster than its dense layer"
                            if vetoed else "nothing converted: the MAC budget is met with every layer dense")
        return finish(plan)
    if kept:
        messages.append(f"{len(kept)} layer(s) kept dense: the budget is better spent there")
    if not plan:
        messages.append("nothing converted: the MAC budget is met with every layer dense")
    return finish(plan)


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Rebuild the separable structure of a converted model on a fresh copy of its
    architecture, in place, without any SVD; the weights then come from ``load_state_dict``
    (e.g. a converted run's ``model.safetensors``). Returns the model (a new module only when
    the plan converts the root module itself) with ``.separable_plan`` set.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    >>> sep = convert_to_separable(net, rank=2)
    >>> fresh = apply_plan(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), sep.separable_plan)
    >>> fresh.load_state_dict(sep.state_dict())
    <All keys matched successfully>
    """
    if isinstance(plan, Mapping) and "layers" in plan:  # tolerate {"layers": [...]} wrappers
        plan = list(plan["layers"])  # type: ignore[index]
    for entry in plan:
        try:
            name, form, rank = entry["name"], entry["form"], int(entry["rank"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FinetuneError(f"malformed plan entry {entry!r}: needs name, form, rank") from exc
        try:
            conv = model.get_submodule(name) if name else model
        except AttributeError as exc:
            raise FinetuneError(f"plan names layer `{name}` but the model has no such module "
                                "(was the plan made for another architecture?)") from exc
        if isinstance(conv, SeparableConv2d):
            raise FinetuneError(f"layer `{name}` is already separable: apply a plan to a fresh model")
        if not isinstance(conv, nn.Conv2d) or conv_kind(conv) is None:
            raise FinetuneError(f"plan layer `{name}` is a `{type(conv).__name__}`, not a supported Conv2d")
        expect = {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                  "kernel_size": list(conv.kernel_size), "groups": conv.groups}
        for key, value in expect.items():
            if key in entry and (list(entry[key]) if key == "kernel_size" else entry[key]) != value:
                raise FinetuneError(f"plan layer `{name}`: {key}={entry[key]} but the model has {value}")
        sep = SeparableConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, form=form, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            same_pad=has_dynamic_same_padding(conv), device=conv.weight.device, dtype=conv.weight.dtype,
        )
        model = _replace(model, conv, sep)
    model.separable_plan = [dict(entry) for entry in plan]  # type: ignore[assignment]
    return model
