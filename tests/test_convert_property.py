"""Property-based exactness of the dense → separable conversion (hypothesis draws the conv)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from finetune.convert import SeparableConv2d
from helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def dense_convs(draw) -> tuple[nn.Conv2d, torch.Tensor]:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 4))
    out_ch = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if kh * kw == 1:
        kw = 3
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    # reflect/circular padding must be smaller than the input; keep it at most 2
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_ch, out_ch, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias, padding_mode=padding_mode).eval()
    size = draw(st.integers(max(kh * dilation[0], kw * dilation[1], 3) + 1, 14))
    x = torch.randn(2, in_ch, size, size + draw(st.integers(0, 3)))
    return conv, x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=dense_convs(), form=st.sampled_from(["A", "B"]))
def test_full_rank_is_exact_for_any_conv(case, form):
    conv, x = case
    sep = SeparableConv2d.from_dense(conv, rank="full", form=form)
    with torch.no_grad():
        expected, got = conv(x), sep(x)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4
    assert rel_err(sep.to_dense(), conv.weight) < 1e-4
