"""A depthwise-separable stand-in for a dense k×k convolution, built by per-channel SVD.

Why this is hand-written: torch and timm ship separable *blocks* (timm's
``DepthwiseSeparableConv``) but nothing that turns a trained dense ``Conv2d`` into one
initialised from its weights. The maths (see ``../shared/DESIGN.md``, "Converter: what works"):

* Dense weight ``W``: ``N × C/G × kh × kw`` (``G`` groups), ``K = kh·kw``.
* **Form A** (depthwise → pointwise): for every input channel ``c`` the ``N/G × K`` slice
  ``W[:, c]`` (output channels of ``c``'s group) has an SVD ``U Σ Vᵀ``. Branch ``j`` of channel
  ``c`` is a depthwise kernel ``√σ_j·V[:, j]`` followed by a pointwise column ``√σ_j·U[:, j]``.
  Exact at ``r = min(N/G, K)``.
* **Form B** (pointwise → "depthwise"): for every output channel ``n`` the ``C/G × K`` slice
  ``W[n]`` has an SVD; branch ``j`` is a pointwise row ``√σ_j·U[:, j]`` then a k×k kernel
  ``√σ_j·V[:, j]``, and the ``r`` branches of ``n`` are summed by one grouped conv
  (``groups=N``, ``r`` inputs per group). Exact at ``r = min(C/G, K)``. The pointwise runs at
  the *input* resolution, so it costs ``stride²`` more on strided layers.

Layout: Form A concatenates the input ``r`` times along channels (``torch.cat``; ``.repeat``
drops channels_last) and runs one depthwise conv with ``groups = r·C`` instead of one depthwise
conv with ``C·r`` outputs and ``groups = C``; DESIGN.md measured the former far faster on CPU.
The pointwise columns are ordered to match (branch-major inside each group).

>>> import torch
>>> from torch import nn
>>> from finetune.convert import SeparableConv2d
>>> dense = nn.Conv2d(8, 16, 3, padding=1)
>>> sep = SeparableConv2d.from_dense(dense, rank="full")
>>> x = torch.randn(2, 8, 10, 10)
>>> bool(torch.allclose(sep(x), dense(x), atol=1e-5))
True
>>> sep.rank, tuple(sep.to_dense().shape)
(9, (16, 8, 3, 3))
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import FinetuneError

Form = Literal["A", "B"]
FormArg = Literal["A", "B", "auto"]
RankArg = Union[int, Literal["full"]]

__all__ = [
    "ChannelSVD",
    "SeparableConv2d",
    "channel_svd",
    "conv_kind",
    "dense_macs",
    "dense_params",
    "effective_weight",
    "has_dynamic_same_padding",
    "pad_same",
    "separable_macs",
    "separable_params",
]

# timm Conv2d subclasses whose forward we know: (what the weight becomes, dynamic 'same' pad?).
# Matched by class name under the ``timm.`` package, not by isinstance: a subclass of these
# could change forward in ways we cannot see, and this keeps ``import timm`` optional here.
_TIMM_CONVS = {
    "Conv2dSame": "plain",
    "Conv2dSameExport": "plain",
    "StdConv2d": "std",
    "StdConv2dSame": "std",
    "ScaledStdConv2d": "scaled_std",
    "ScaledStdConv2dSame": "scaled_std",
}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


def conv_kind(conv: nn.Module) -> str | None:
    """How to read a conv's effective weight: ``"plain"``, ``"std"``, ``"scaled_std"``; ``None``
    for a module we do not know how to decompose (not a Conv2d, or an unknown subclass).

    >>> from torch import nn
    >>> conv_kind(nn.Conv2d(3, 4, 3)), conv_kind(nn.Linear(3, 4))
    ('plain', None)
    """
    cls = type(conv)
    if cls is nn.Conv2d:
        return "plain"
    if isinstance(conv, nn.Conv2d) and cls.__module__.startswith("timm."):
        return _TIMM_CONVS.get(cls.__name__)
    return None


def has_dynamic_same_padding(conv: nn.Conv2d) -> bool:
    """True for timm convs that pad TF-'SAME' in forward from the input size (``Conv2dSame``,
    ``StdConv2dSame``/``ScaledStdConv2dSame`` when their static padding was not possible)."""
    name = type(conv).__name__
    if name in ("Conv2dSame", "Conv2dSameExport"):
        return True
    if name in ("StdConv2dSame", "ScaledStdConv2dSame"):
        return bool(getattr(conv, "same_pad", False))
    return False


def effective_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel the conv actually applies (detached), e.g. the standardised weight of timm's
    ``StdConv2d``; repeats the exact op timm's forward uses so the result matches bit for bit.

    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 4, 3)
    >>> bool(torch.equal(effective_weight(conv), conv.weight))
    True
    """
    kind = conv_kind(conv)
    if kind is None:
        raise FinetuneError(f"cannot decompose a `{type(conv).__name__}`: only nn.Conv2d and timm's "
                            "Conv2dSame/StdConv2d(Same)/ScaledStdConv2d(Same) are supported")
    with torch.no_grad():
        w = conv.weight
        if kind == "plain":
            return w.detach().clone()
        n = conv.out_channels
        scale = (conv.gain * conv.scale).view(-1) if kind == "scaled_std" else None
        return F.batch_norm(w.reshape(1, n, -1), None, None, weight=scale, training=True,
                            momentum=0.0, eps=conv.eps).reshape_as(w).detach()


def pad_same(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
             dilation: Sequence[int]) -> torch.Tensor:
    """TF-style 'SAME' padding computed from the input size (extra pixel right/bottom).

    Mirrors ``timm.layers.padding.pad_same`` so the core needs only torch; the tests check it
    against timm's ``Conv2dSame``.
    """
    ih, iw = x.shape[-2:]
    pad_h = max((-(-ih // stride[0]) - 1) * stride[0] + (kernel_size[0] - 1) * dilation[0] + 1 - ih, 0)
    pad_w = max((-(-iw // stride[1]) - 1) * stride[1] + (kernel_size[1] - 1) * dilation[1] + 1 - iw, 0)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return x


# --------------------------------------------------------------------------------------------
# Cost model (multiply-accumulates per image, and parameters). It matches what
# torch.utils.flop_counter counts for convolutions (bias ignored), so a budget planned with it
# is met when measured with FlopCounterMode.
# --------------------------------------------------------------------------------------------

def dense_macs(n: int, c: int, groups: int, k: int, out_hw: int) -> int:
    """MACs of a dense conv: ``N · C/G · K`` per output pixel."""
    return n * (c // groups) * k * out_hw


def separable_macs(form: Form, rank: int, n: int, c: int, groups: int, k: int,
                   in_hw: int, out_hw: int) -> int:
    """MACs of the separable module. Form A: depthwise ``r·C·K`` + pointwise ``N·r·C/G`` per
    output pixel; Form B: pointwise ``N·r·C/G`` per *input* pixel + grouped k×k ``N·r·K`` per
    output pixel."""
    cg = c // groups
    if form == "A":
        return rank * c * k * out_hw + n * rank * cg * out_hw
    return n * rank * cg * in_hw + n * rank * k * out_hw


def dense_params(n: int, c: int, groups: int, k: int, bias: bool) -> int:
    """Parameters of a dense conv."""
    return n * (c // groups) * k + (n if bias else 0)


def separable_params(form: Form, rank: int, n: int, c: int, groups: int, k: int, bias: bool) -> int:
    """Parameters of the separable module (same bias as the dense conv)."""
    cg = c // groups
    spatial = rank * c * k if form == "A" else n * rank * k
    return spatial + n * rank * cg + (n if bias else 0)


# --------------------------------------------------------------------------------------------
# Per-channel SVD
# --------------------------------------------------------------------------------------------

@dataclass
class ChannelSVD:
    """Per-channel SVDs of one dense kernel in one form (float64, CPU).

    ``u``: ``(B, M, m)``, ``s``: ``(B, m)``, ``vh``: ``(B, m, K)`` with ``B`` matrices (``C`` input
    channels in Form A, ``N`` output channels in Form B), ``M = N/G`` (A) or ``C/G`` (B) and
    ``m = min(M, K)`` the rank at which the decomposition is exact.
    """

    form: Form
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    weight_shape: tuple[int, int, int, int]
    groups: int

    @property
    def max_rank(self) -> int:
        """Rank per channel at which the separable module is exact."""
        return int(self.s.shape[1])

    def dropped_energy(self) -> torch.Tensor:
        """``e[r]`` = Σ of dropped σ² / ‖W‖² when every channel keeps ``r`` branches, for
        ``r = 0 … max_rank`` (``e[0] = 1``, ``e[max_rank] = 0``); the per-layer error the rank
        policies trade against MACs. Equals ``‖W − Ŵ_r‖²_F / ‖W‖²_F``."""
        sq = self.s.pow(2).sum(0)  # energy of the j-th branch summed over channels
        total = float(sq.sum())
        if total <= 0.0:  # an all-zero kernel: nothing to lose at any rank
            return torch.zeros(self.max_rank + 1, dtype=torch.float64)
        kept = torch.cat([torch.zeros(1, dtype=torch.float64), sq.cumsum(0)])
        return (1.0 - kept / total).clamp_min(0.0)

    def weight_error(self, rank: int) -> float:
        """Relative Frobenius error ``‖W − Ŵ_r‖ / ‖W‖`` at ``rank``."""
        return math.sqrt(float(self.dropped_energy()[min(rank, self.max_rank)]))

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first conv weight, second conv weight) of the separable module at ``rank``, float64.

        √σ goes to both factors (rather than σ on the pointwise, as in the paper) so the two
        convs start at comparable scales, which suits the distillation that usually follows.
        """
        n, cg, kh, kw = self.weight_shape
        g = self.groups
        r = min(rank, self.max_rank)
        root = self.s[:, :r].sqrt()  # (B, r)
        spatial = self.vh[:, :r, :] * root[:, :, None]  # (B, r, K)
        columns = self.u[:, :, :r] * root[:, None, :]  # (B, M, r)
        if self.form == "A":
            ng = n // g
            # depthwise channel order: g·r·Cg + j·Cg + ci (matches the concatenated input)
            dw = spatial.reshape(g, cg, r, kh * kw).permute(0, 2, 1, 3).reshape(g * r * cg, 1, kh, kw)
            # pointwise (N, r·Cg): output g·Ng + ng, input j·Cg + ci inside group g
            pw = columns.reshape(g, cg, ng, r).permute(0, 2, 3, 1).reshape(n, r * cg, 1, 1)
            return dw, pw
        # Form B: pointwise output channel n·r + j, then grouped k×k with groups=N
        pw = columns.permute(0, 2, 1).reshape(n * r, cg, 1, 1)
        dw = spatial.reshape(n, r, kh, kw)
        return pw, dw


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run a batch of tiny SVDs on one intra-op thread, then restore the thread count.

    Measured here (2 shared cores, MKL/OpenMP): torch's batched CPU SVD of 512 matrices 512×9
    took 8.2 s with 2 threads and 0.03 s with 1; per-matrix LAPACK calls are far too small to
    parallelise and the thread barriers dominate.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def channel_svd(weight: torch.Tensor, groups: int = 1, form: Form = "A") -> ChannelSVD:
    """Per-channel SVDs of a dense kernel ``(N, C/G, kh, kw)``, in float64 on CPU for accuracy
    (kernels are small; float64 SVD is not available on every accelerator).

    >>> w = torch.randn(6, 4, 3, 3)
    >>> svd = channel_svd(w, form="A")
    >>> svd.max_rank, tuple(svd.s.shape)
    (6, (4, 6))
    """
    if form not in ("A", "B"):
        raise FinetuneError(f"form must be 'A' or 'B', got {form!r}")
    n, cg, kh, kw = weight.shape
    k = kh * kw
    g = int(groups)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if form == "A":
        # one (N/G × K) matrix per input channel c = g·Cg + ci
        mats = w.reshape(g, n // g, cg, k).permute(0, 2, 1, 3).reshape(g * cg, n // g, k)
    else:
        # one (C/G × K) matrix per output channel n
        mats = w.reshape(n, cg, k)
    with _one_thread():
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    return ChannelSVD(form=form, u=u, s=s, vh=vh, weight_shape=(n, cg, kh, kw), groups=g)


def _pick_form(err_a: float, cost_a: float, err_b: float, cost_b: float) -> Form:
    """Form B only when it is at least as good on both error and cost and better on one;
    otherwise the default Form A (the cheaper one on strided layers, and the paper's)."""
    tol = 1e-12
    b_no_worse = err_b <= err_a + tol and cost_b <= cost_a
    b_better = err_b < err_a - tol or cost_b < cost_a
    return "B" if b_no_worse and b_better else "A"


class SeparableConv2d(nn.Module):
    """A dense k×k conv factored into a depthwise k×k and a 1×1 conv of rank ``r`` per channel.

    Form A: ``x → cat(x, r times) → depthwise k×k (groups=r·C, stride/padding/dilation of the
    dense conv) → 1×1 (r·C → N, groups=G, dense bias)``. Form B: ``x → 1×1 (C → N·r, groups=G)
    → k×k (N·r → N, groups=N, stride/padding/dilation, dense bias)``. Nothing in between (no BN
    or activation), so at full rank it computes exactly the dense conv.

    Build one with :meth:`from_dense`; the constructor makes the structure with default init
    (what :func:`finetune.convert.apply_plan` uses before loading a state dict).

    >>> from torch import nn
    >>> sep = SeparableConv2d.from_dense(nn.Conv2d(16, 32, 3, stride=2, padding=1), rank=2)
    >>> sep
    SeparableConv2d(
      16, 32, kernel_size=(3, 3), rank=2, form='A', stride=(2, 2), padding=(1, 1)
      (depthwise): Conv2d(32, 32, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=32, bias=False)
      (pointwise): Conv2d(32, 32, kernel_size=(1, 1), stride=(1, 1))
    )
    >>> tuple(sep(torch.randn(1, 16, 8, 8)).shape)
    (1, 32, 4, 4)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        *,
        form: Form = "A",
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        same_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if form not in ("A", "B"):
            raise FinetuneError(f"form must be 'A' or 'B', got {form!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise FinetuneError(f"rank must be a positive int, got {rank!r}")
        if in_channels % groups or out_channels % groups:
            raise FinetuneError(f"channels {in_channels}→{out_channels} not divisible by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.rank = rank
        self.form: Form = form
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.same_pad = bool(same_pad)
        dd = {"device": device, "dtype": dtype}
        spatial = {"stride": self.stride, "padding": 0 if self.same_pad else self.padding,
                   "dilation": self.dilation, "padding_mode": padding_mode}
        c, n, r = in_channels, out_channels, rank
        if form == "A":
            self.depthwise = nn.Conv2d(r * c, r * c, self.kernel_size, groups=r * c, bias=False,
                                       **spatial, **dd)
            self.pointwise = nn.Conv2d(r * c, n, 1, groups=groups, bias=bias, **dd)
        else:
            self.pointwise = nn.Conv2d(c, n * r, 1, groups=groups, bias=False, **dd)
            self.depthwise = nn.Conv2d(n * r, n, self.kernel_size, groups=n, bias=bias, **spatial, **dd)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: RankArg = "full",
        form: FormArg = "A",
        *,
        svd: ChannelSVD | None = None,
    ) -> "SeparableConv2d":
        """Factor ``conv`` (``nn.Conv2d``, timm ``Conv2dSame``/``StdConv2d``/``StdConv2dSame``/
        ``ScaledStdConv2d(Same)``) at ``rank`` branches per channel.

        ``rank="full"`` (or any int above the exact rank) gives the exact rank
        ``min(N/G, K)`` (Form A) / ``min(C/G, K)`` (Form B). ``form="auto"`` takes Form B only
        where, at this rank, it has no more weight error and no more MACs per output pixel
        (strided layers assume ``stride²`` input pixels per output pixel). ``svd`` reuses a
        :func:`channel_svd` already computed for this conv. Device and dtype follow ``conv``.

        >>> from torch import nn
        >>> conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        >>> sep = SeparableConv2d.from_dense(conv, rank=1, form="B")
        >>> sep.form, sep.rank, sep.pointwise.bias is None
        ('B', 1, True)
        """
        if conv_kind(conv) is None:
            raise FinetuneError(f"cannot decompose a `{type(conv).__name__}`: only nn.Conv2d and "
                                "timm's Conv2dSame/StdConv2d(Same)/ScaledStdConv2d(Same) are supported")
        if form not in ("A", "B", "auto"):
            raise FinetuneError(f"form must be 'A', 'B' or 'auto', got {form!r}")
        weight = effective_weight(conv)
        if svd is not None:
            if form == "auto":
                form = svd.form
            elif svd.form != form:
                raise FinetuneError(f"svd is Form {svd.form} but form={form!r} was asked")
        if form == "auto":
            form = _auto_form(conv, weight, rank)
        if svd is None:
            svd = channel_svd(weight, conv.groups, form)
        r = svd.max_rank if rank == "full" else _check_rank(rank)
        r = min(r, svd.max_rank)
        sep = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, r, form=form, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            same_pad=has_dynamic_same_padding(conv), device=conv.weight.device, dtype=conv.weight.dtype,
        )
        first, second = svd.factors(r)
        dw, pw = (first, second) if form == "A" else (second, first)
        with torch.no_grad():
            sep.depthwise.weight.copy_(dw.to(sep.depthwise.weight))
            sep.pointwise.weight.copy_(pw.to(sep.pointwise.weight))
            if conv.bias is not None:
                last = sep.pointwise if form == "A" else sep.depthwise
                last.bias.copy_(conv.bias.detach())
        return sep

    # ---------------------------------------------------------------- checks
    def to_dense(self) -> torch.Tensor:
        """The dense kernel ``(N, C/G, kh, kw)`` this module computes (float32 maths in the
        module's dtype); the bias is ``self.bias``.

        >>> from torch import nn
        >>> conv = nn.Conv2d(4, 6, 3)
        >>> w = SeparableConv2d.from_dense(conv).to_dense()
        >>> bool(torch.allclose(w, conv.weight, atol=1e-6))
        True
        """
        n, c, g, r = self.out_channels, self.in_channels, self.groups, self.rank
        cg, ng = c // g, n // g
        kh, kw = self.kernel_size
        with torch.no_grad():
            if self.form == "A":
                dw = self.depthwise.weight.reshape(g, r, cg, kh * kw)
                pw = self.pointwise.weight.reshape(g, ng, r, cg)
                w = torch.einsum("gmjc,gjck->gmck", pw, dw)
            else:
                pw = self.pointwise.weight.reshape(n, r, cg)
                dw = self.depthwise.weight.reshape(n, r, kh * kw)
                w = torch.einsum("njc,njk->nck", pw, dw)
        return w.reshape(n, cg, kh, kw)

    @property
    def bias(self) -> torch.Tensor | None:
        """The dense conv's bias (held by the last conv)."""
        return (self.pointwise if self.form == "A" else self.depthwise).bias

    # ---------------------------------------------------------------- forward
    def _repeat_input(self, x: torch.Tensor) -> torch.Tensor:
        # r copies side by side, group-major (g, j, ci) so the grouped 1×1 sees contiguous blocks.
        r, g = self.rank, self.groups
        if r == 1:
            return x
        if g == 1:
            return torch.cat([x] * r, dim=1)
        chunks = x.chunk(g, dim=1)
        return torch.cat([chunk for chunk in chunks for _ in range(r)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "A":
            if self.same_pad:  # pad once, before the r copies
                x = pad_same(x, self.kernel_size, self.stride, self.dilation)
            return self.pointwise(self.depthwise(self._repeat_input(x)))
        x = self.pointwise(x)
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self.depthwise(x)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"rank={self.rank}, form={self.form!r}, stride={self.stride}")
        if self.same_pad:
            s += ", padding='same' (dynamic)"
        elif self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


def _check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise FinetuneError(f"rank must be a positive int or 'full', got {rank!r}")
    return rank


def _auto_form(conv: nn.Conv2d, weight: torch.Tensor, rank: RankArg) -> Form:
    """Form for ``from_dense(form="auto")`` with no spatial sizes known: compare per output pixel."""
    n, c, g = conv.out_channels, conv.in_channels, conv.groups
    k = conv.kernel_size[0] * conv.kernel_size[1]
    in_per_out = conv.stride[0] * conv.stride[1]
    choice = {}
    for form in ("A", "B"):
        svd = channel_svd(weight, g, form)  # type: ignore[arg-type]
        r = svd.max_rank if rank == "full" else min(_check_rank(rank), svd.max_rank)
        cost = separable_macs(form, r, n, c, g, k, in_per_out, 1)  # type: ignore[arg-type]
        choice[form] = (svd.weight_error(r), cost)
    return _pick_form(choice["A"][0], choice["A"][1], choice["B"][0], choice["B"][1])
