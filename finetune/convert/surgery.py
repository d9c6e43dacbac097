"""Model surgery: find the dense k×k convs, pick a form and rank per layer, swap in
:class:`~finetune.convert.layers.SeparableConv2d`, and report what changed.

Why hand-written: module replacement follows timm's ``convert_sync_batchnorm`` / peft's
``_replace_module`` (``setattr`` on the parent), but neither knows about SVD factorisation,
rank budgets or a reloadable plan. The pieces it wires together: the SVD and cost model
(:mod:`~finetune.convert.svd`), the rank policies (:mod:`~finetune.convert.policy`), the latency
objective (:mod:`~finetune.convert.latency_policy`), MAC counting on the example input
(:mod:`~finetune.convert.macs`) and the report (:mod:`~finetune.convert.report`).

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
import warnings
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from finetune.convert.latency_policy import OBJECTIVES, check_objective, choose_by_latency, summarize_latency
from finetune.convert.layers import SeparableConv2d, conv_kind, effective_weight, has_dynamic_same_padding
from finetune.convert.macs import ExampleInput, count_macs, default_example, model_device, record_calls, to_device
from finetune.convert.policy import (
    Choice,
    LayerGeometry,
    allocate_macs,
    check_policy,
    choose_for_energy,
    choose_for_rank,
)
from finetune.convert.report import ConversionReport, LayerReport
from finetune.convert.svd import ChannelSVD, Form, FormArg, RankArg, channel_svd
from finetune.errors import FinetuneError

Patterns = Union[str, Sequence[str], None]
Plan = list[dict[str, Any]]

__all__ = [
    "OBJECTIVES",
    "ConversionReport",
    "LayerReport",
    "Plan",
    "apply_plan",
    "convert_to_separable",
    "count_macs",
    "find_convertible",
    "model_device",
]


# --------------------------------------------------------------------------------------------
# Finding the convs and swapping modules
# --------------------------------------------------------------------------------------------

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
    policy = check_policy(rank, energy, macs)
    if form not in ("A", "B", "auto"):
        raise FinetuneError(f"form must be 'A', 'B' or 'auto', got {form!r}")
    latency = check_objective(objective, force, memory_format, latency_batch_size, latency_repeats,
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
        example = default_example(work)
        if example is not None:
            messages.append(f"no example_input: MACs counted at the model's pretrained_cfg "
                            f"input_size {list(example.shape)}")
    if example is not None:
        example = to_device(example, model_device(work))
        report.input_shape = tuple(example.shape) if isinstance(example, torch.Tensor) else None
        report.macs_before = count_macs(work, example)
        calls = record_calls(work, dict(candidates), example, shapes)
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
        choices, notes = choose_by_latency(
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
    if latency:
        summarize_latency(report)
        return finish(plan)
    kept = [layer.name for layer in report.layers if layer.form == "dense"]
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
