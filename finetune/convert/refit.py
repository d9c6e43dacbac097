"""Data-aware refit of converted layers on calibration images.

The SVD initialisation (:mod:`~finetune.convert.svd`) minimises the *weight* error of each
layer in isolation. In the network, each lossy layer also sees the drifted output of the lossy
layers before it, so the errors compound with depth. The fix: refit, layer by layer in forward
order, the *last* linear map of every separable layer by least squares so that its output
matches the teacher's dense output **given the student's own input** at that layer. Later
layers are then fitted on inputs that already include the refitted earlier layers, which is
what stops the compounding. The errors before and after are measured by
:mod:`~finetune.convert.measure`.

Why hand-written: no library refits SVD-separable convolutions. The closest published
procedures (layer-wise reconstruction in low-rank/pruning papers, e.g. "Network Decoupling",
ThiNet, channel pruning by LASSO + least squares) are paper code tied to their own models.

What is refitted, per form (see :class:`~finetune.convert.layers.SeparableConv2d`):

* **Form A** (``cat(x, r) → depthwise k×k → 1×1``): the 1×1 ``pointwise`` conv (weight and bias),
  with the depthwise part held fixed. Its features are the ``r·C/G`` depthwise outputs of each
  group at every output position; one least-squares problem per group (``groups=G``).
* **Form B** (``1×1 → k×k grouped, groups=N``): the last conv is the k×k one, still linear in its
  weight: for output channel ``n`` the features are the ``r·kh·kw`` values of its ``r`` pointwise
  channels under the kernel window (``F.unfold``, with the layer's stride, dilation, padding and
  padding mode). One small least-squares problem per output channel; the 1×1 stays fixed.

Both cases are the same problem (refit a grouped conv by least squares per group), solved by
one code path. Statistics are accumulated as ``ZᵀZ`` and ``ZᵀY`` in float64, so memory does not
depend on the number of positions; above ``max_samples`` positions per layer a deterministic
random subset of positions is used.

The ridge term pulls the weights towards the *current* (SVD) weights rather than towards zero:
``min ‖W Z + b − Y‖² + λ ‖W − W₀‖²``. At full rank the refit is then a no-op to float precision,
and feature directions the calibration images never excite (dead channels) keep their SVD
weights instead of being zeroed, which matters for held-out images that do excite them.

>>> import torch
>>> from torch import nn
>>> from finetune.convert import convert_to_separable
>>> from finetune.convert.refit import refit_pointwise
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
...                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
>>> student = convert_to_separable(teacher, rank=1, form="A", min_in_channels=3)
>>> calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
>>> errors = refit_pointwise(teacher, student, calib)
>>> all(after < before for before, after in errors.values())
True
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finetune.convert.layers import SeparableConv2d
from finetune.convert.macs import model_device
from finetune.convert.measure import (
    _default_names,
    _eval_mode,
    _first_arg,
    _materialise,
    _measure,
    _modules,
    _to,
)
from finetune.errors import FinetuneError

__all__ = ["refit_pointwise"]

# Elements of one float64 feature chunk (positions × features); bounds the transient memory of
# the Gram accumulation (2**22 float64 = 32 MiB), whatever the image size or batch size.
_CHUNK_ELEMENTS = 1 << 22
# Seed of the deterministic position subsample (offset by the layer's index in forward order).
_SUBSAMPLE_SEED = 20240617


class _StopForward(BaseException):
    """Raised by a hook to end a forward pass once the wanted activation is captured.

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it."""


# --------------------------------------------------------------------------------------------
# Least-squares refit of a (grouped) conv
# --------------------------------------------------------------------------------------------

class _ConvLeastSquares:
    """Normal equations for refitting ``conv`` (weight, and bias when it has one) so that
    ``conv(x) ≈ y``, one problem per group of the conv, accumulated in float64.

    Per group ``g`` the features at an output position are the ``I/G · kh·kw`` input values
    under the kernel window (``F.unfold`` order: channel-major, then kernel position), which is
    the layout of ``conv.weight[o].reshape(-1)``; the targets are the group's ``O/G`` outputs.
    Only ``Σ z zᵀ``, ``Σ z yᵀ``, ``Σ z``, ``Σ y`` and the count are kept.
    """

    def __init__(self, conv: nn.Conv2d, device: torch.device) -> None:
        self.conv = conv
        g = conv.groups
        kh, kw = conv.kernel_size
        self.groups = g
        self.out_per_group = conv.out_channels // g
        self.features = conv.in_channels // g * kh * kw
        self.device = device
        f64 = {"dtype": torch.float64, "device": device}
        self.gram = torch.zeros(g, self.features, self.features, **f64)
        self.cross = torch.zeros(g, self.features, self.out_per_group, **f64)
        self.z_sum = torch.zeros(g, self.features, **f64)
        self.y_sum = torch.zeros(g, self.out_per_group, **f64)
        self.count = 0

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) input → (B, C·kh·kw, L) features, with the conv's own padding."""
        conv = self.conv
        pad = conv._reversed_padding_repeated_twice  # what nn.Conv2d itself pads with (incl. 'same')
        if conv.kernel_size == (1, 1) and tuple(conv.stride) == (1, 1) and not any(pad):
            return x.reshape(x.shape[0], x.shape[1], -1)
        if any(pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pad, mode=mode)
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)

    def add(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Add one batch: ``x`` the conv's input, ``y`` the wanted output (B, O, H', W'),
        ``keep`` the sorted flat indices of the (image, position) pairs to use, or all."""
        b = y.shape[0]
        positions = y.shape[2] * y.shape[3]
        g, d, og = self.groups, self.features, self.out_per_group
        # feature elements per image (an upper bound on strided layers: input pixels ≥ output pixels)
        per_image = max(1, x[0].numel() // max(1, x.shape[1]) * d * g)
        step = max(1, _CHUNK_ELEMENTS // per_image)
        for start in range(0, b, step):
            stop = min(b, start + step)
            z = self._unfold(x[start:stop])
            if z.shape[-1] != positions:
                raise FinetuneError(f"refit: the layer's output has {positions} positions per image but its "
                                    f"last conv gives {z.shape[-1]}: unsupported layer geometry")
            n = stop - start
            # (n, G·d, L) → (G, d, n·L); (n, O, L) → (G, O/G, n·L), position index = image·L + l
            z = z.reshape(n, g, d, positions).permute(1, 2, 0, 3).reshape(g, d, n * positions)
            t = y[start:stop].reshape(n, g, og, positions).permute(1, 2, 0, 3).reshape(g, og, n * positions)
            if keep is not None:
                lo, hi = start * positions, stop * positions
                sel = keep[(keep >= lo) & (keep < hi)] - lo
                if sel.numel() == 0:
                    continue
                z, t = z[..., sel.to(z.device)], t[..., sel.to(t.device)]
            z = z.to(device=self.device, dtype=torch.float64)
            t = t.to(device=self.device, dtype=torch.float64)
            self.gram.baddbmm_(z, z.transpose(1, 2))
            self.cross.baddbmm_(z, t.transpose(1, 2))
            self.z_sum += z.sum(-1)
            self.y_sum += t.sum(-1)
            self.count += z.shape[-1]

    def solve(self, ridge: float) -> None:
        """Solve ``min ‖Wᵀz + b − y‖² + λ‖W − W₀‖²`` (``λ = ridge`` × mean feature variance,
        ``b`` unpenalised) and write ``W``, ``b`` into the conv."""
        if self.count == 0:
            return
        if not (torch.isfinite(self.gram).all() and torch.isfinite(self.cross).all()):
            raise FinetuneError("refit: non-finite activations in the calibration data")
        conv = self.conv
        g, d, og = self.groups, self.features, self.out_per_group
        w0 = conv.weight.detach().reshape(g, og, d).transpose(1, 2).to(self.device, torch.float64)
        gram, cross = self.gram, self.cross
        n = float(self.count)
        if conv.bias is not None:
            # an unpenalised bias is the same as centring features and targets on their means
            gram = gram - self.z_sum[:, :, None] * self.z_sum[:, None, :] / n
            cross = cross - self.z_sum[:, :, None] * self.y_sum[:, None, :] / n
        # λ in units of the mean feature variance, so `ridge` does not depend on activation scale
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(-1).clamp_min(0.0)
        lam = (float(ridge) * torch.where(scale > 0, scale, torch.ones_like(scale)))[:, None, None]
        lhs = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
        rhs = cross + lam * w0
        try:
            weight = torch.linalg.solve(lhs, rhs)
        except RuntimeError:  # singular (ridge=0 with dead features): minimum-norm solution
            weight = torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(self.device)
        conv.weight.copy_(weight.transpose(1, 2).reshape(conv.weight.shape).to(conv.weight))
        if conv.bias is not None:
            bias = (self.y_sum - torch.einsum("gdo,gd->go", weight, self.z_sum)) / n
            conv.bias.copy_(bias.reshape(-1).to(conv.bias))


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, what: Literal["input", "output"]) -> torch.Tensor:
    """Run ``model`` on ``x`` until ``module`` is first called; return its input or output."""
    box: list[torch.Tensor] = []
    if what == "input":
        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            box.append(_first_arg(args, kwargs))
            raise _StopForward
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            box.append(out)
            raise _StopForward
        handle = module.register_forward_hook(hook)
    try:
        model(_to(x, model_device(model)))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise FinetuneError("refit: a converted layer did not run on a calibration batch")
    return box[0]


def _keep_positions(per_batch: Sequence[int], max_samples: int, seed: int) -> list[torch.Tensor | None]:
    """Deterministic subsample: each batch keeps its share of ``max_samples`` positions, drawn
    uniformly without replacement by a generator seeded per layer (so the same batches give the
    same refit), sorted for cache-friendly indexing."""
    total = sum(per_batch)
    if total <= max_samples:
        return [None] * len(per_batch)
    gen = torch.Generator().manual_seed(seed)
    keep: list[torch.Tensor | None] = []
    for count in per_batch:
        k = min(count, max(1, round(count * max_samples / total)))
        keep.append(torch.randperm(count, generator=gen)[:k].sort().values)
    return keep


def _warn_bn_mismatch(teacher: nn.Module, student: nn.Module) -> None:
    """The targets are the teacher's pre-BN outputs: a student whose BN statistics were already
    re-estimated normalises them differently, and the refit then fights the BN."""
    t_buffers = dict(teacher.named_buffers())
    for name, buf in student.named_buffers():
        if name.endswith(("running_mean", "running_var")) and name in t_buffers:
            other = t_buffers[name]
            if other.shape == buf.shape and not torch.allclose(buf.detach().cpu().float(),
                                                               other.detach().cpu().float()):
                warnings.warn("refit_pointwise: the student's BatchNorm statistics differ from the teacher's "
                              f"(e.g. `{name}`). The refit matches the teacher's layer outputs, so run it "
                              "before reestimate_batchnorm (or on a student with the teacher's BN)",
                              UserWarning, stacklevel=3)
                return


@torch.no_grad()
def refit_pointwise(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Any],
    *,
    names: Sequence[str] | None = None,
    ridge: float = 1e-4,
    max_samples: int = 200_000,
) -> dict[str, tuple[float, float]]:
    """Least-squares refit of each converted layer's last conv on the teacher's layer outputs,
    layer by layer in forward order, in place on ``student``.

    For each :class:`SeparableConv2d` (in the order the student's forward first calls them):
    run the student up to the layer's last conv and the teacher up to its dense layer on every
    calibration batch, then solve ``min ‖W z + b − y‖² + λ‖W − W₀‖²`` where ``z`` are the
    student's features at each output position and ``y`` the teacher's output there; write
    ``W``, ``b`` into the student and go on to the next layer, which therefore sees the
    refitted earlier ones (this is what stops errors compounding with depth).

    * Form A: refits the 1×1 ``pointwise`` conv (per group when ``groups > 1``); the depthwise
      part is fixed.
    * Form B: refits the last k×k conv (``groups=N``: one small problem per output channel, on
      the unfolded outputs of the fixed 1×1); the 1×1 is fixed.
    * A bias is fitted only where the layer has one (the structure, hence the state-dict keys
      that :func:`~finetune.convert.apply_plan` expects, never changes).
    * ``ridge``: λ as a fraction of the mean feature variance; the pull is towards the current
      (SVD) weights, so a full-rank layer comes back unchanged to float precision, and a layer
      with fewer calibration positions than unknowns (ResNet-18's last stage at 32 px: one
      position per image) gets the smallest change from the SVD weights that fits the data.
      Measured on a Fashion-MNIST ResNet-18 (16–256 calibration images), the held-out result
      hardly depends on it (1e-4 to 1e-2, or picked per layer on held-out images).
    * ``max_samples``: above this many output positions per layer (images × H'×W'), a
      deterministic random subset of positions feeds the normal equations. Memory does not
      depend on the number of positions (float64 ``ZᵀZ``, ``ZᵀY`` only).

    ``names`` defaults to ``student.separable_plan`` (else every :class:`SeparableConv2d`).
    ``batches``: tensors or ``(images, labels)`` (a few hundred images; held in memory, since
    they are replayed once per layer). Run the refit *before* re-estimating BatchNorm: the
    targets are the teacher's pre-BN outputs (a warning is issued when the BN statistics of the
    two models differ). Re-estimating BN *after* the refit helped further in every case
    measured (convert → refit → :func:`~finetune.convert.reestimate_batchnorm`): the refit
    leaves non-converted convs (e.g. 1×1 downsamples) and the mean shift of bias-free layers to
    the BN. A layer called several times per forward is fitted on its first call. Both models
    run in eval mode; train/eval flags are restored. Cost: per layer, one forward of each model
    up to that layer per batch (≈ L/2 full forwards of each for L layers) plus two full
    forwards to measure; e.g. 2.5–5 s for a ResNet-18 on 256 images of 32 px on one CPU thread.

    Returns ``{name: (error before, error after)}`` in forward order: the relative in-network
    output error (``feed="student"`` in :func:`~finetune.convert.measure.layer_output_errors`) of
    the student as given and of the refitted student, on all calibration positions.

    >>> import torch
    >>> from torch import nn
    >>> from finetune.convert import convert_to_separable
    >>> teacher = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
    ...                         nn.Conv2d(16, 16, 3, padding=1, groups=2)).eval()
    >>> student = convert_to_separable(teacher, rank=1)
    >>> calib = [(torch.randn(4, 8, 10, 10), torch.zeros(4)) for _ in range(2)]
    >>> errors = refit_pointwise(teacher, student, calib)
    >>> list(errors), all(after < before for before, after in errors.values())
    (['0', '2'], True)
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or not math.isfinite(ridge):
        raise FinetuneError(f"ridge must be a finite number ≥ 0, got {ridge!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise FinetuneError(f"max_samples must be a positive int, got {max_samples!r}")
    images = _materialise(batches)
    names = list(_default_names(student) if names is None else names)
    if not names:
        return {}
    s_mods = _modules(student, names, "student")
    t_mods = _modules(teacher, names, "teacher")
    for name, module in s_mods.items():
        if not isinstance(module, SeparableConv2d):
            raise FinetuneError(f"refit: student layer `{name}` is a `{type(module).__name__}`, "
                                "not a SeparableConv2d")
    _warn_bn_mismatch(teacher, student)

    with _eval_mode(teacher, student):
        before_meter = _measure(teacher, student, images, names, "student")
        before = before_meter.result()
        order = before_meter.order  # forward order of the layers that ran
        for index, name in enumerate(order):
            sep = s_mods[name]
            last = sep.pointwise if sep.form == "A" else sep.depthwise
            acc_device = last.weight.device
            if acc_device.type == "mps":  # no float64 there
                acc_device = torch.device("cpu")
            problem = _ConvLeastSquares(last, acc_device)
            keeps = _keep_positions(before_meter.positions[name], max_samples, _SUBSAMPLE_SEED + index)
            for x, keep in zip(images, keeps):
                z_in = _capture(student, last, x, "input")
                y = _capture(teacher, t_mods[name], x, "output")
                if y.shape[0] != z_in.shape[0] or y.shape[1] != last.out_channels:
                    raise FinetuneError(f"refit: teacher layer `{name}` gives {tuple(y.shape)}, the student's "
                                        f"last conv has {last.out_channels} outputs")
                problem.add(z_in, y.to(z_in.device), keep)
            problem.solve(float(ridge))
        after = _measure(teacher, student, images, names, "student").result()
    return {name: (before[name], after[name]) for name in order}
