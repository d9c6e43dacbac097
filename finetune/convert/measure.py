"""Per-layer output errors of a converted student against its dense teacher on calibration images.

:func:`layer_output_errors` compares, layer by layer, what each converted layer outputs with what
the teacher's dense layer outputs there: either on the teacher's own input to the layer (the
layer's own approximation error) or in the student's network (with the drift from the earlier
converted layers, which is what :func:`~finetune.convert.refit.refit_pointwise` reduces). The
helpers here (calibration batches, layer lookup, eval mode) are shared with the refit.

>>> import torch
>>> from torch import nn
>>> from finetune.convert import convert_to_separable
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> teacher = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
>>> student = convert_to_separable(teacher, rank=1)
>>> x = [torch.randn(2, 8, 10, 10)]
>>> own = layer_output_errors(teacher, student, x)                     # on the teacher's input
>>> in_network = layer_output_errors(teacher, student, x, feed="student")
>>> own["0"] == in_network["0"], own["2"] < in_network["2"]    # the first layer sees the same input
(True, True)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from finetune.convert.batchnorm import _images
from finetune.convert.layers import SeparableConv2d
from finetune.convert.macs import model_device
from finetune.errors import FinetuneError

Feed = Literal["teacher", "student"]

__all__ = ["Feed", "layer_output_errors"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _to(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return x if device is None else x.to(device)


def _materialise(batches: Iterable[Any]) -> list[torch.Tensor]:
    """The images of every batch, as a list: the refit iterates over them once per layer, so a
    one-shot iterator must be kept, and a shuffling DataLoader must not reshuffle between layers."""
    images = []
    for batch in batches:
        x = _images(batch)
        if not isinstance(x, torch.Tensor):
            raise FinetuneError(f"calibration batches must hold image tensors, got `{type(x).__name__}`")
        images.append(x)
    if not images:
        raise FinetuneError("no calibration batches: pass a few batches of images (a few hundred images)")
    return images


def _default_names(student: nn.Module) -> list[str]:
    plan = getattr(student, "separable_plan", None)
    if plan:
        return [str(entry["name"]) for entry in plan]
    return [name for name, module in student.named_modules() if isinstance(module, SeparableConv2d)]


def _modules(model: nn.Module, names: Sequence[str], which: str) -> dict[str, nn.Module]:
    out = {}
    for name in names:
        try:
            out[name] = model.get_submodule(name) if name else model
        except AttributeError as exc:
            raise FinetuneError(f"the {which} has no module `{name}` (were teacher and student built "
                                "from the same architecture?)") from exc
    return out


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for all models (BN uses running stats, dropout off); flags restored after."""
    flags = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _relative(sq_err: float, sq_ref: float) -> float:
    if sq_ref > 0.0:
        return math.sqrt(sq_err / sq_ref)
    return 0.0 if sq_err == 0.0 else math.inf


def _sq(t: torch.Tensor) -> float:
    return float(t.detach().to(torch.float64).pow(2).sum())


# --------------------------------------------------------------------------------------------
# Per-layer output errors
# --------------------------------------------------------------------------------------------

class _Meter:
    """Σ‖y_s − y_t‖², Σ‖y_t‖², forward order and output positions of the layers being watched."""

    def __init__(self, names: Sequence[str]) -> None:
        self.err = dict.fromkeys(names, 0.0)
        self.ref = dict.fromkeys(names, 0.0)
        self.order: list[str] = []
        self.positions: dict[str, list[int]] = {name: [] for name in names}
        self._seen: set[str] = set()

    def new_batch(self) -> None:
        self._seen = set()

    def add(self, name: str, y_student: torch.Tensor, y_teacher: torch.Tensor) -> None:
        if y_student.shape != y_teacher.shape:
            raise FinetuneError(f"layer `{name}`: student output {tuple(y_student.shape)} vs teacher "
                                f"output {tuple(y_teacher.shape)}")
        y_student = y_student.to(y_teacher.device)
        self.err[name] += _sq(y_student - y_teacher)
        self.ref[name] += _sq(y_teacher)
        if name not in self._seen:  # the refit uses a layer's first call in each forward
            self._seen.add(name)
            if name not in self.order:
                self.order.append(name)
            self.positions[name].append(y_teacher.numel() // max(1, y_teacher.shape[1]))

    def result(self) -> dict[str, float]:
        never = [name for name in self.err if not self.positions[name]]
        if never:
            warnings.warn(f"layer(s) {', '.join(never)} never ran on the calibration images: "
                          "their error is reported as nan", UserWarning, stacklevel=3)
        return {name: (_relative(self.err[name], self.ref[name]) if self.positions[name] else math.nan)
                for name in self.err}


def _measure(teacher: nn.Module, student: nn.Module, images: Sequence[torch.Tensor],
             names: Sequence[str], feed: Feed) -> _Meter:
    """Run both models over ``images`` and compare each named layer's output (see
    :func:`layer_output_errors` for the two ``feed`` variants). Models must already be in eval."""
    t_mods = _modules(teacher, names, "teacher")
    s_mods = _modules(student, names, "student")
    t_dev, s_dev = model_device(teacher), model_device(student)
    meter = _Meter(names)

    if feed == "teacher":
        def teacher_hook(name: str):
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
                x = _first_arg(args, kwargs)
                meter.add(name, s_mods[name](_to(x, model_device(s_mods[name]) or s_dev)), out)
            return hook

        handles = [t_mods[n].register_forward_hook(teacher_hook(n), with_kwargs=True) for n in names]
        with _hooks(handles):
            for x in images:
                meter.new_batch()
                teacher(_to(x, t_dev))
        return meter

    if feed != "student":
        raise FinetuneError(f"feed must be 'teacher' or 'student', got {feed!r}")
    # Teacher first, keeping each watched layer's outputs of this batch; then the student,
    # whose hooks compare call by call and drop the teacher's tensor at once.
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            # a copy: a following in-place op (VGG's ReLU(inplace=True)) would overwrite it
            kept[name].append(out.clone())
        return hook

    def compare_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if kept[name]:
                meter.add(name, out, kept[name].pop(0))
        return hook

    handles = [t_mods[n].register_forward_hook(keep_hook(n)) for n in names]
    handles += [s_mods[n].register_forward_hook(compare_hook(n)) for n in names]
    with _hooks(handles):
        for x in images:
            meter.new_batch()
            teacher(_to(x, t_dev))
            student(_to(x, s_dev))
            for outs in kept.values():
                outs.clear()
    return meter


@torch.no_grad()
def layer_output_errors(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str] | None = None,
    *,
    feed: Feed = "teacher",
) -> dict[str, float]:
    """Relative output error ``‖y_s − y_t‖ / ‖y_t‖`` of each converted layer on calibration
    images, summed over all batches, positions and channels (a pooled ratio, not a mean of
    per-batch ratios).

    ``feed="teacher"`` (the default, what the conversion report shows): the student's layer is
    run on the **teacher's** input to that layer, so the number isolates the layer's own
    approximation error and does not include drift from earlier converted layers.
    ``feed="student"``: each model runs on its own, so the student layer sees the student's
    input; this in-network error includes the compounding from earlier layers (it is what
    :func:`refit_pointwise` minimises and reports).

    ``names`` defaults to the layers of ``student.separable_plan`` (else every
    :class:`SeparableConv2d`); each must name a module in both models (the converter keeps the
    original names). ``batches``: tensors, ``(images, labels)`` tuples or dicts with an
    ``"image"`` key, all fed to both models (each on its own device). Both models run in eval
    mode; their train/eval flags are restored afterwards. A layer that never runs gets ``nan``
    (with a warning).

    >>> import torch
    >>> from torch import nn
    >>> from finetune.convert import convert_to_separable
    >>> teacher = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    >>> exact = convert_to_separable(teacher, rank="full")
    >>> errors = layer_output_errors(teacher, exact, [torch.randn(2, 8, 10, 10)])
    >>> sorted(errors), max(errors.values()) < 1e-5
    (['0', '2'], True)
    """
    images = _materialise(batches)
    names = list(_default_names(student) if names is None else names)
    if not names:
        return {}
    with _eval_mode(teacher, student):
        return _measure(teacher, student, images, names, feed).result()
