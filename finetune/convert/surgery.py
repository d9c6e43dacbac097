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
from finetune.convert.policy import (
    Choice,
    LayerGeometry,
    allocate_macs,
    choose_for_energy,
    choose_for_rank,
)
from finetune.errors import FinetuneError

ExampleInput = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]
Patterns = Union[str, Sequence[str], None]
Plan = list[dict[str, Any]]

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
    best spent keeping it. MACs are per image at the example input's size (``None`` without
    one). ``weight_error`` is ``‖W − Ŵ‖_F / ‖W‖_F``; ``energy_kept`` is ``1 − weight_error²``.
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


@dataclass
class ConversionReport:
    """What :func:`convert_to_separable` did.

    ``macs_before``/``macs_after`` are whole-model MACs per image counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on the example input (``None``
    without one); ``skipped`` lists every other ``Conv2d`` with the reason; ``messages`` holds
    notes such as "nothing worth converting". ``str(report)`` is a table; ``to_dict()`` is JSON-ready.
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
        rows = [("layer", "kernel", "stride", "form", "rank", "MACs before → after", "params before → after",
                 "w.err")]
        for layer in self.layers:
            n, cg, kh, kw = layer.shape
            kernel = f"{n}x{cg}x{kh}x{kw}" + (f"/g{layer.groups}" if layer.groups > 1 else "")
            rank = "-" if layer.rank is None else f"{layer.rank}/{layer.max_rank}"
            macs = (f"{_si(layer.macs_before)} → {_si(layer.macs_after)}"
                    if layer.macs_before is not None else "?")
            params = f"{_si(layer.params_before)} → {_si(layer.params_after)}"
            rows.append((layer.name, kernel, "x".join(map(str, layer.stride)), layer.form, rank, macs,
                         params, f"{layer.weight_error:.3f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        total = f"policy {self.policy}: {len(self.converted)} of {len(self.layers)} layers converted"
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


def _record_calls(model: nn.Module, convs: Mapping[str, nn.Conv2d],
                  example: ExampleInput) -> dict[str, list[tuple[int, int]]]:
    """(input pixels, output pixels) per image for each call of each conv, by forward hooks."""
    calls: dict[str, list[tuple[int, int]]] = {name: [] for name in convs}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return  # called with keyword input only: its MACs stay unknown (0)
            x = args[0]
            calls[name].append((int(x.shape[-2] * x.shape[-1]), int(output.shape[-2] * output.shape[-1])))
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
    work = model if inplace else copy.deepcopy(model)
    candidates, skipped = find_convertible(work, include=include, exclude=exclude,
                                           min_in_channels=min_in_channels)
    report = ConversionReport(policy=policy, skipped=skipped)
    report.params_before = sum(p.numel() for p in work.parameters())

    messages = report.messages
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
        calls = _record_calls(work, dict(candidates), example)
    else:
        calls = {name: [] for name, _ in candidates}
        if macs is not None:
            raise FinetuneError("macs= needs the layers' spatial sizes: pass example_input="
                                "(e.g. torch.randn(1, 3, 224, 224))")

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
        choices = allocate_macs([(geoms[name], svds[name]) for name, _ in candidates], budget - fixed)

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
                                             weight_error=0.0, energy_kept=1.0))
            continue
        f, r = choice
        svd = svds[name][f]
        sep = SeparableConv2d.from_dense(conv, r, f, svd=svd)
        work = _replace(work, conv, sep)
        plan.append(_plan_entry(name, sep))
        err = svd.weight_error(r)
        layer = LayerReport(**base, form=f, rank=r, max_rank=svd.max_rank,  # type: ignore[arg-type]
                            macs_after=geom.macs(f, r), params_after=geom.params(f, r),
                            weight_error=err, energy_kept=1.0 - err * err)
        report.layers.append(layer)
        if geom.cost(f, r) > geom.dense_cost():
            more_expensive.append(name)
    if more_expensive:
        messages.append(f"{len(more_expensive)} converted layer(s) cost more MACs than dense at the "
                        f"chosen rank (e.g. {more_expensive[0]}); use macs= to keep those dense")
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
