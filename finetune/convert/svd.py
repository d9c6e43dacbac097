"""Per-channel SVD of a dense k×k kernel, and the MAC / parameter cost model of its separable forms.

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

The cost model counts multiply-accumulates per image as ``torch.utils.flop_counter`` does for
convolutions (bias ignored), so a budget planned with it is met when measured with
``FlopCounterMode``.

>>> import torch
>>> svd = channel_svd(torch.randn(16, 8, 3, 3), form="A")
>>> svd.max_rank, svd.weight_error(svd.max_rank) < 1e-7
(9, True)
>>> separable_macs("A", 1, 16, 8, 1, 9, 100, 100) / dense_macs(16, 8, 1, 9, 100)   # r·(1/N + 1/K)
0.1736111111111111
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Union

import torch

from finetune.errors import FinetuneError

Form = Literal["A", "B"]
FormArg = Literal["A", "B", "auto"]
RankArg = Union[int, Literal["full"]]

__all__ = [
    "ChannelSVD",
    "Form",
    "FormArg",
    "RankArg",
    "channel_svd",
    "dense_macs",
    "dense_params",
    "pick_form",
    "separable_macs",
    "separable_params",
]


# --------------------------------------------------------------------------------------------
# Cost model (multiply-accumulates per image, and parameters)
# --------------------------------------------------------------------------------------------

def dense_macs(n: int, c: int, groups: int, k: int, out_hw: int) -> int:
    """MACs of a dense conv: ``N · C/G · K`` per output pixel.

    >>> dense_macs(16, 8, 1, 9, 100)          # 16 outputs, 8 inputs, 3×3 kernel, 10×10 output
    115200
    """
    return n * (c // groups) * k * out_hw


def separable_macs(form: Form, rank: int, n: int, c: int, groups: int, k: int,
                   in_hw: int, out_hw: int) -> int:
    """MACs of the separable module. Form A: depthwise ``r·C·K`` + pointwise ``N·r·C/G`` per
    output pixel; Form B: pointwise ``N·r·C/G`` per *input* pixel + grouped k×k ``N·r·K`` per
    output pixel.

    >>> separable_macs("A", 1, 16, 8, 1, 9, 100, 100), separable_macs("B", 1, 16, 8, 1, 9, 400, 100)
    (20000, 65600)
    """
    cg = c // groups
    if form == "A":
        return rank * c * k * out_hw + n * rank * cg * out_hw
    return n * rank * cg * in_hw + n * rank * k * out_hw


def dense_params(n: int, c: int, groups: int, k: int, bias: bool) -> int:
    """Parameters of a dense conv.

    >>> dense_params(16, 8, 1, 9, bias=True)
    1168
    """
    return n * (c // groups) * k + (n if bias else 0)


def separable_params(form: Form, rank: int, n: int, c: int, groups: int, k: int, bias: bool) -> int:
    """Parameters of the separable module (same bias as the dense conv).

    >>> separable_params("A", 1, 16, 8, 1, 9, bias=True), separable_params("B", 1, 16, 8, 1, 9, bias=True)
    (216, 288)
    """
    cg = c // groups
    spatial = rank * c * k if form == "A" else n * rank * k
    return spatial + n * rank * cg + (n if bias else 0)


def pick_form(err_a: float, cost_a: float, err_b: float, cost_b: float) -> Form:
    """Form B only when it is at least as good on both error and cost and better on one;
    otherwise the default Form A (the cheaper one on strided layers, and the paper's).

    >>> pick_form(0.1, 100, 0.1, 100), pick_form(0.1, 100, 0.05, 100), pick_form(0.1, 100, 0.05, 120)
    ('A', 'B', 'A')
    """
    tol = 1e-12
    b_no_worse = err_b <= err_a + tol and cost_b <= cost_a
    b_better = err_b < err_a - tol or cost_b < cost_a
    return "B" if b_no_worse and b_better else "A"


# --------------------------------------------------------------------------------------------
# Per-channel SVD
# --------------------------------------------------------------------------------------------

@dataclass
class ChannelSVD:
    """Per-channel SVDs of one dense kernel in one form (float64, CPU).

    ``u``: ``(B, M, m)``, ``s``: ``(B, m)``, ``vh``: ``(B, m, K)`` with ``B`` matrices (``C`` input
    channels in Form A, ``N`` output channels in Form B), ``M = N/G`` (A) or ``C/G`` (B) and
    ``m = min(M, K)`` the rank at which the decomposition is exact.

    >>> svd = channel_svd(torch.randn(6, 4, 3, 3), form="B")
    >>> pointwise, spatial = svd.factors(2)             # Form B: the 1×1 first
    >>> tuple(pointwise.shape), tuple(spatial.shape), len(svd.dropped_energy())
    ((12, 4, 1, 1), (6, 2, 3, 3), 5)
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
