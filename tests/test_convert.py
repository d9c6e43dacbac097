"""Tests for finetune.convert: SVD-initialised depthwise-separable conversion.

All shapes are tiny (ResNet-18 at 64 px, convs with ≤ 16 channels) and torch runs on one
thread here: on 2 shared cores the OpenMP barriers made a 64 px ResNet-18 forward 50× slower
with 2 threads than with 1.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d, StdConv2dSame
from timm.layers.padding import pad_same as timm_pad_same
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import randomize_bn, rel_err
import finetune.convert.layers as convert_layers
from finetune.convert import (
    ConversionReport,
    LayerGeometry,
    SeparableConv2d,
    allocate_macs,
    apply_plan,
    channel_svd,
    convert_to_separable,
    count_macs,
    energy_rank,
    reestimate_batchnorm,
)
from finetune.errors import FinetuneError


# One intra-op thread: these tests run many tiny ops, where 2 threads on 2 shared cores are
# many times slower (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- layer exactness

CONV_CASES = {
    "plain": dict(kernel_size=3, padding=1),
    "stride2-nobias": dict(kernel_size=3, stride=2, padding=1, bias=False),
    "rect-kernel-stride21": dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    "valid": dict(kernel_size=3, padding="valid"),
    "same-dil2-reflect": dict(kernel_size=3, padding="same", dilation=2, padding_mode="reflect"),
    "same-even-kernel": dict(kernel_size=4, padding="same"),
    "groups4-circular-dil2-s2": dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=4,
                                     padding_mode="circular"),
    "groups2-replicate": dict(kernel_size=3, padding=1, groups=2, padding_mode="replicate"),
    "k5-s3-groups2": dict(kernel_size=5, stride=3, groups=2),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_full_rank_is_exact(case: str, form: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **CONV_CASES[case])
    sep = SeparableConv2d.from_dense(conv, "full", form)
    n, cg, kh, kw = conv.weight.shape
    k, ng = kh * kw, n // conv.groups
    assert sep.rank == (min(ng, k) if form == "A" else min(cg, k))
    x = torch.randn(2, 8, 11, 13)
    assert rel_err(sep(x), conv(x)) < 1e-5
    assert rel_err(sep.to_dense(), conv.weight) < 1e-6
    if conv.bias is None:
        assert sep.bias is None
    else:
        assert torch.equal(sep.bias, conv.bias)


@pytest.mark.parametrize("form", ["A", "B"])
def test_keeps_dtype_and_is_exact_in_float64(form: str) -> None:
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, dtype=torch.float64)
    sep = SeparableConv2d.from_dense(conv, 100, form)  # above the exact rank: clipped to it
    assert sep.rank == 9 if form == "A" else sep.rank == 6
    assert all(p.dtype == torch.float64 for p in sep.parameters())
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    assert rel_err(sep(x), conv(x)) < 1e-12


def test_keeps_low_precision_dtype() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, dtype=torch.bfloat16)
    sep = SeparableConv2d.from_dense(conv, "full")
    assert {p.dtype for p in sep.parameters()} == {torch.bfloat16}
    x = torch.randn(1, 8, 6, 6, dtype=torch.bfloat16)
    assert rel_err(sep(x).float(), conv(x).float()) < 2e-2  # bf16 has ~3 significant digits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", ["A", "B"])
def test_cuda_device_is_kept(form: str) -> None:
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2).cuda()
    sep = SeparableConv2d.from_dense(conv, "full", form)
    assert all(p.is_cuda for p in sep.parameters())
    x = torch.randn(2, 8, 9, 9, device="cuda")
    assert rel_err(sep(x), conv(x)) < 1e-5
    net = convert_to_separable(nn.Sequential(conv, nn.BatchNorm2d(12)).cuda(), rank=2, form=form,
                               example_input=x)
    assert net.conversion_report.macs_after < net.conversion_report.macs_before
    reestimate_batchnorm(net, [x])


def test_root_conv_is_replaced() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    sep = convert_to_separable(conv, rank="full")
    assert isinstance(sep, SeparableConv2d) and sep.separable_plan[0]["name"] == ""
    fresh = apply_plan(nn.Conv2d(8, 8, 3, padding=1), sep.separable_plan)
    fresh.load_state_dict(sep.state_dict())
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(fresh(x), sep(x)) and rel_err(sep(x), conv(x)) < 1e-5


def test_channels_last_input_stays_channels_last() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    sep = SeparableConv2d.from_dense(conv, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    assert sep(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("form", ["A", "B"])
def test_error_decreases_with_rank(form: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1, groups=2)
    x = torch.randn(2, 12, 10, 10)
    svd = channel_svd(conv.weight, conv.groups, form)  # type: ignore[arg-type]
    out_errs, w_errs = [], []
    for r in range(1, svd.max_rank + 1):
        sep = SeparableConv2d.from_dense(conv, r, form, svd=svd)
        w_err = rel_err(sep.to_dense(), conv.weight)
        assert w_err == pytest.approx(svd.weight_error(r), abs=1e-6)  # the policies' error model
        w_errs.append(w_err)
        out_errs.append(rel_err(sep(x), conv(x)))
    assert all(a > b for a, b in zip(w_errs, w_errs[1:]))
    assert all(a > b for a, b in zip(out_errs, out_errs[1:]))
    assert w_errs[-1] < 1e-6 and out_errs[-1] < 1e-5


# ---------------------------------------------------------------------------- timm conv types

def test_pad_same_is_timms() -> None:
    assert convert_layers.pad_same is timm_pad_same  # SeparableConv2d pads with timm's own function
    torch.manual_seed(0)
    for size in [(7, 7), (8, 9), (11, 4)]:
        x = torch.randn(1, 2, *size)
        for k, s, d in [((3, 3), (2, 2), (1, 1)), ((4, 5), (1, 2), (2, 1)), ((1, 1), (3, 3), (1, 1))]:
            conv = Conv2dSame(2, 4, k, stride=s, dilation=d)
            for form in ("A", "B"):
                sep = SeparableConv2d.from_dense(conv, "full", form)
                assert sep.same_pad and rel_err(sep(x), conv(x)) < 1e-5


@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2), dict(kernel_size=4, stride=1),
                                    dict(kernel_size=3, stride=2, dilation=2, groups=2)])
def test_conv2d_same_keeps_dynamic_padding(form: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(8, 12, **kwargs)
    sep = SeparableConv2d.from_dense(conv, "full", form)
    assert sep.same_pad
    for size in [(11, 13), (10, 10), (7, 8)]:  # padding depends on the input size
        x = torch.randn(1, 8, *size)
        assert rel_err(sep(x), conv(x)) < 1e-5


@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("make", [
    lambda: StdConv2d(8, 12, 3, padding=1),
    lambda: StdConv2dSame(8, 12, 3, stride=2),  # dynamic SAME + standardisation
    lambda: ScaledStdConv2d(8, 12, 3, padding=1),
])
def test_std_conv_decomposes_the_standardised_weight(form: str, make) -> None:
    torch.manual_seed(0)
    conv = make()
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)  # far from standardised, so a raw-weight SVD would fail
        if hasattr(conv, "gain"):
            conv.gain.uniform_(0.5, 2.0)
    sep = SeparableConv2d.from_dense(conv, "full", form)
    x = torch.randn(2, 8, 9, 11)
    assert rel_err(sep(x), conv(x)) < 1e-5


def test_model_with_timm_convs_converts_and_reloads() -> None:
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(Conv2dSame(8, 16, 3, stride=2), nn.ReLU(), StdConv2dSame(16, 16, 3, stride=2),
                             nn.ReLU(), StdConv2d(16, 8, 3, padding=1)).eval()

    model = build()
    x = torch.randn(1, 8, 13, 15)
    sep = convert_to_separable(model, rank="full", example_input=x)
    assert [type(m) for m in sep] == [SeparableConv2d, nn.ReLU, SeparableConv2d, nn.ReLU, SeparableConv2d]
    assert rel_err(sep(x), model(x)) < 1e-5
    fresh = apply_plan(build(), sep.separable_plan)
    fresh.load_state_dict(sep.state_dict())
    assert fresh[0].same_pad and fresh[2].same_pad and not fresh[4].same_pad
    assert torch.equal(fresh(x), sep(x))


# ---------------------------------------------------------------------------- policies

def _kernel_with_singular_values(sigmas: list[float], n: int = 8, c: int = 6, seed: int = 0) -> torch.Tensor:
    """(N, C, 3, 3) whose every input-channel slice W[:, c] (N × 9) has singular values ``sigmas``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(n, c, 9, dtype=torch.float64)
    for ci in range(c):
        u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
        m = len(sigmas)
        w[:, ci] = u[:, :m] @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v[:, :m].T
    return w.reshape(n, c, 3, 3).float()


def test_energy_policy_picks_the_rank_from_known_singular_values() -> None:
    sigmas = [4.0, 2.0, 1.0, 0.5, 0.25]  # energy fractions 16, 20, 21, 21.25, 21.3125 of 21.3125
    w = _kernel_with_singular_values(sigmas)
    total = sum(s * s for s in sigmas)
    svd = channel_svd(w, form="A")
    assert torch.allclose(svd.s[:, :5], torch.tensor(sigmas, dtype=torch.float64).expand(6, 5), atol=1e-5)
    assert energy_rank(svd, 0.5) == 1
    assert energy_rank(svd, 16 / total) == 1
    assert energy_rank(svd, 16 / total + 1e-4) == 2
    assert energy_rank(svd, 20 / total) == 2
    assert energy_rank(svd, 0.98) == 3  # 21 / 21.3125 = 0.985
    assert energy_rank(svd, 0.99) == 4
    assert energy_rank(svd, 1.0) == 5

    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    net = nn.Sequential(conv)
    sep = convert_to_separable(net, energy=0.95, form="A")  # 20/21.3 = 0.938 < 0.95 ≤ 0.985
    assert sep.separable_plan[0]["rank"] == 3
    layer = sep.conversion_report.layers[0]
    assert layer.energy_kept == pytest.approx(21 / total, abs=1e-6)


def test_rank_policy_clips_and_auto_form_prefers_cheaper_exact() -> None:
    # N=4, C=32, K=9: Form A exact at 4 costs 4·32·9+4·4·32; Form B exact at 9 costs 4·9·32+4·9·9 (less).
    net = nn.Sequential(nn.Conv2d(32, 4, 3, padding=1))
    sep = convert_to_separable(net, rank="full", form="auto")
    assert sep.separable_plan[0]["form"] == "B" and sep.separable_plan[0]["rank"] == 9
    # stride 2, N = C: Form B's pointwise runs on 4× the pixels, so at equal rank A wins
    net = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1))
    sep = convert_to_separable(net, rank=2, form="auto", example_input=torch.randn(1, 16, 16, 16))
    assert sep.separable_plan[0] == {"name": "0", "form": "A", "rank": 2, "in_channels": 16,
                                     "out_channels": 16, "kernel_size": [3, 3], "groups": 1}


def test_allocate_macs_meets_budget_and_improves_with_budget() -> None:
    torch.manual_seed(0)
    layers = []
    for i, (n, c, s) in enumerate([(8, 8, 1), (16, 8, 2), (16, 16, 1)]):
        geom = LayerGeometry(f"l{i}", n, c, 1, 9, (s, s), False, calls=[(64 * s * s, 64)])
        svds = {f: channel_svd(torch.randn(n, c, 3, 3), form=f) for f in ("A", "B")}
        layers.append((geom, svds))
    dense = sum(g.dense_cost() for g, _ in layers)
    last_err = math.inf
    for fraction in [0.2, 0.4, 0.6, 0.8, 1.0]:
        plan = allocate_macs(layers, fraction * dense)
        spent = sum(g.dense_cost() if plan[g.name] is None else g.cost(*plan[g.name]) for g, _ in layers)
        err = sum(0.0 if plan[g.name] is None else float(s[plan[g.name][0]].dropped_energy()[plan[g.name][1]])
                  for g, s in layers)
        assert spent <= fraction * dense
        assert err <= last_err + 1e-12
        last_err = err
    assert last_err == 0.0  # the whole budget: everything exact (dense is cheapest exact here)
    with pytest.raises(FinetuneError, match="cannot be met"):
        allocate_macs(layers, 0.01 * dense)


def test_policy_arguments_are_checked(resnet18: nn.Module) -> None:
    with pytest.raises(FinetuneError, match="exactly one"):
        convert_to_separable(resnet18)
    with pytest.raises(FinetuneError, match="exactly one"):
        convert_to_separable(resnet18, rank=1, energy=0.9)
    with pytest.raises(FinetuneError, match="rank"):
        convert_to_separable(resnet18, rank=0)
    with pytest.raises(FinetuneError, match="energy"):
        convert_to_separable(resnet18, energy=1.5)
    with pytest.raises(FinetuneError, match="example_input"):
        convert_to_separable(nn.Sequential(nn.Conv2d(8, 8, 3)), macs=0.5)


# ---------------------------------------------------------------------------- whole models

def test_resnet18_full_rank_gives_the_same_logits(resnet18: nn.Module, x64: torch.Tensor) -> None:
    sep = convert_to_separable(resnet18, rank="full", example_input=x64[:1])
    report = sep.conversion_report
    assert len(report.converted) == 16  # every 3×3 conv; the 7×7 RGB stem and 1×1 downsamples stay
    assert ("conv1", "3 input channels < min_in_channels=5 (pass min_in_channels=3 to convert it)") in report.skipped
    with torch.no_grad():
        ref, out = resnet18(x64), sep(x64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert rel_err(out, ref) < 1e-5


def test_resnet18_macs_budget_is_met(resnet18: nn.Module, x64: torch.Tensor) -> None:
    x = x64[:1]
    before = count_macs(resnet18, x)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            resnet18(x)
    assert before == counter.get_total_flops() // 2
    for budget in (0.4, 0.7):
        sep = convert_to_separable(resnet18, macs=budget, example_input=x)
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                sep(x)
        after = counter.get_total_flops() // 2
        assert after <= budget * before
        assert after >= (budget - 0.05) * before  # the budget is used, not wasted
        report = sep.conversion_report
        assert report.macs_before == before and report.macs_after == after
        # per-layer analytic MACs add up to the measured total
        fixed = before - sum(layer.macs_before for layer in report.layers)
        assert fixed + sum(layer.macs_after for layer in report.layers) == after
    with pytest.raises(FinetuneError, match="cannot be met"):
        convert_to_separable(resnet18, macs=0.05, example_input=x)


def test_report_table_and_json(resnet18: nn.Module, x64: torch.Tensor) -> None:
    sep = convert_to_separable(resnet18, rank=2, example_input=x64[:1])
    report = sep.conversion_report
    assert isinstance(report, ConversionReport)
    text = str(report)
    assert "layer4.1.conv2" in text and "policy rank=2" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["macs_ratio"] == pytest.approx(report.macs_after / report.macs_before)
    layer = report.layers[0]
    assert layer.name == "layer1.0.conv1" and layer.rank == 2 and layer.shape == (64, 64, 3, 3)
    assert layer.params_after < layer.params_before and layer.macs_after < layer.macs_before
    assert 0.0 < layer.weight_error < 1.0
    assert report.params_after == sum(p.numel() for p in sep.parameters())


def test_mobilenetv2_has_nothing_worth_converting() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="nothing worth converting"):
        out = convert_to_separable(model, rank=1, example_input=x)
    report = out.conversion_report
    assert report.nothing_converted and out.separable_plan == []
    assert any("conv_stem" in m and "nothing worth converting" in m for m in report.messages)
    assert not any(isinstance(m, SeparableConv2d) for m in out.modules())
    assert report.macs_after == report.macs_before
    sd, sd0 = out.state_dict(), model.state_dict()
    assert sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


def test_include_and_exclude(resnet18: nn.Module) -> None:
    sep = convert_to_separable(resnet18, rank=1, include="layer1.*", exclude=["*.conv2"])
    assert [e["name"] for e in sep.separable_plan] == ["layer1.0.conv1", "layer1.1.conv1"]
    skipped = dict(sep.conversion_report.skipped)
    assert skipped["layer1.0.conv2"] == "matched by exclude"
    assert skipped["layer2.0.conv1"] == "not matched by include"
    sep = convert_to_separable(resnet18, rank=1, include="conv1", min_in_channels=3)
    assert [e["name"] for e in sep.separable_plan] == ["conv1"]  # the stem, when asked


def test_inplace_false_leaves_the_original_untouched(resnet18: nn.Module, x64: torch.Tensor) -> None:
    original = copy.deepcopy(resnet18)
    sep = convert_to_separable(resnet18, rank=1, example_input=x64[:1])
    assert sep is not resnet18
    assert not hasattr(resnet18, "separable_plan") and not hasattr(resnet18, "conversion_report")
    assert not any(isinstance(m, SeparableConv2d) for m in resnet18.modules())
    sd, sd0 = resnet18.state_dict(), original.state_dict()
    assert all(torch.equal(sd[k], sd0[k]) for k in sd0)  # BN running stats included
    assert resnet18.training == original.training

    net = nn.Sequential(nn.Conv2d(8, 8, 3)).train()
    same = convert_to_separable(net, rank=1, inplace=True)
    assert same is net and isinstance(net[0], SeparableConv2d) and net.training


def test_shared_conv_is_replaced_everywhere_and_counted_twice() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    x = torch.randn(1, 8, 6, 6)
    sep = convert_to_separable(net, rank="full", form="A", example_input=x)
    assert sep[0] is sep[2] and isinstance(sep[0], SeparableConv2d)
    assert sep.conversion_report.layers[0].macs_before == 2 * 8 * 8 * 9 * 36
    assert rel_err(sep(x), net(x)) < 1e-5


def test_plan_round_trip_through_safetensors(resnet18: nn.Module, x64: torch.Tensor, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    sep = convert_to_separable(resnet18, macs=0.4, example_input=x64[:1])
    forms = {e["form"] for e in sep.separable_plan}
    save_file(sep.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "plan.json").write_text(json.dumps(sep.separable_plan))

    fresh = timm.create_model("resnet18", num_classes=10)
    fresh = apply_plan(fresh, json.loads((tmp_path / "plan.json").read_text()))
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x64), sep(x64))
    assert fresh.separable_plan == sep.separable_plan and forms <= {"A", "B"}

    with pytest.raises(FinetuneError, match="no such module"):
        apply_plan(timm.create_model("resnet18", num_classes=10), [{"name": "nope", "form": "A", "rank": 1}])
    with pytest.raises(FinetuneError, match="in_channels"):
        apply_plan(timm.create_model("resnet18", num_classes=10),
                   [dict(sep.separable_plan[0], in_channels=3)])


def test_grouped_resnext_style_block_is_exact_after_conversion() -> None:
    torch.manual_seed(0)
    net = randomize_bn(nn.Sequential(
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, 1))).eval()
    x = torch.randn(2, 16, 9, 9)
    sep = convert_to_separable(net, rank="full", example_input=x)
    assert [e["name"] for e in sep.separable_plan] == ["3"]
    assert rel_err(sep(x), net(x)) < 1e-5


# ---------------------------------------------------------------------------- BatchNorm re-estimation

def test_reestimate_batchnorm_is_a_cumulative_average_and_restores_state() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.05)
    net = nn.Sequential(bn, nn.Dropout(0.5)).eval()
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)]
    out = reestimate_batchnorm(net, [(b, torch.zeros(4)) for b in batches])
    assert out is net
    expected_mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.05 and not net.training and not bn.training

    before = bn.running_mean.clone()
    with pytest.raises(FinetuneError, match="no batches"):
        reestimate_batchnorm(net, [])
    assert torch.equal(bn.running_mean, before)  # an empty loader changes nothing

    reestimate_batchnorm(net, iter(batches), max_batches=1)
    torch.testing.assert_close(bn.running_mean, batches[0].mean(dim=(0, 2, 3)))


def test_reestimate_batchnorm_on_a_converted_resnet(resnet18: nn.Module, x64: torch.Tensor) -> None:
    sep = convert_to_separable(resnet18, rank=1).train()
    means = {n: m.running_mean.clone() for n, m in sep.named_modules() if isinstance(m, nn.BatchNorm2d)}
    reestimate_batchnorm(sep, [x64, x64.flip(-1)])
    changed = [n for n, m in sep.named_modules()
               if isinstance(m, nn.BatchNorm2d) and not torch.equal(m.running_mean, means[n])]
    assert len(changed) == len(means)
    assert all(m.momentum == 0.1 for m in sep.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in sep.modules())  # flags restored (was train mode)
