"""Tests for ``convert_to_separable(objective="latency")`` and the layer timers in
``finetune.convert.latency``.

The real-timing tests check the property the latency objective guarantees by construction: no
converted layer is slower than its dense conv *in the converter's own measurements* (issue 3,
test item 9). Which layers win depends on the machine, so the veto / force / budget paths are
also driven deterministically by a fake timer. torch runs on one thread (2 shared cores here).
"""

from __future__ import annotations

import doctest
import re
import warnings

import pytest
import timm
import torch
from torch import nn

import finetune.convert.latency as latency_mod
import finetune.convert.latency_policy as latency_policy
from finetune.convert import convert_to_separable
from finetune.convert.latency import LayerTiming, VariantTiming, time_layer_variants, time_modules
from finetune.errors import FinetuneError

VETO = re.compile(r"^(slower than dense|not faster than dense by the \d+% margin): "
                  r"\d+\.\d+ ms vs \d+\.\d+ ms$")


# One intra-op thread: these tests run many tiny ops, where 2 threads on 2 shared cores are
# many times slower (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10).eval()


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def convert(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nothing converted" is checked explicitly
        return convert_to_separable(model, **kwargs)


def check_never_slower(report) -> None:
    """Every layer was timed; converted ones beat dense in the converter's own numbers; layers
    kept dense say why."""
    assert report.objective == "latency"
    for layer in report.layers:
        assert layer.dense_ms is not None and layer.dense_ms > 0, layer.name
        assert layer.candidates_ms and layer.separable_ms in layer.candidates_ms.values(), layer.name
        if layer.form == "dense":
            assert layer.reason, layer.name
        else:
            assert layer.separable_ms <= layer.dense_ms, (layer.name, layer.separable_ms, layer.dense_ms)
            margin = report.latency_setup["margin"]
            assert layer.separable_ms <= (1 - margin) * layer.dense_ms + 1e-12, layer.name
            assert layer.candidates_ms[f"{layer.form}{layer.rank}"] == layer.separable_ms
            assert layer.reason is None


# ------------------------------------------------------------------------------ real timings

def test_latency_rank1_never_slower_than_dense_per_layer(resnet18, x64):
    sep = convert(resnet18, rank=1, objective="latency", example_input=x64)
    report = sep.conversion_report
    assert len(report.layers) == 16
    check_never_slower(report)
    for layer in report.layers:
        assert set(layer.candidates_ms) <= {"A1", "B1"}
        if layer.form == "dense":
            assert VETO.match(layer.reason), layer.reason
        else:
            assert layer.rank == 1
            # rank= with objective="latency" takes the fastest candidate that beat dense
            assert layer.separable_ms == min(layer.candidates_ms.values())
    assert [e["name"] for e in sep.separable_plan] == [layer.name for layer in report.converted]
    assert report.latency_setup == {"device": "cpu", "dtype": "float32", "memory_format": "contiguous",
                                    "batch_size": 1, "threads": 1, "repeats": 7, "margin": 0.05,
                                    "force": False}
    assert any(m.startswith("objective latency:") for m in report.messages)
    assert "ms dense → sep" in str(report)
    assert report.to_dict()["layers"][0]["dense_ms"] == report.layers[0].dense_ms
    assert sep(x64).shape == (1, 10)


def test_latency_macs_meets_budget_with_faster_variants_only(resnet18, x64):
    sep = convert(resnet18, macs=0.4, objective="latency", example_input=x64)
    report = sep.conversion_report
    check_never_slower(report)
    for layer in report.layers:
        assert {"A1", "A2", "A3", "A4", "B1", "B2", "B3", "B4"} <= set(layer.candidates_ms)
    missed = [m for m in report.messages if "cannot be met with variants measured faster than dense" in m]
    if not missed:
        assert report.macs_after <= 0.4 * report.macs_before
    for layer in report.layers:
        if layer.form == "dense":
            assert VETO.match(layer.reason) or layer.reason.startswith("kept dense: the MAC budget"), layer.reason


def test_force_converts_every_layer(resnet18, x64):
    sep = convert(resnet18, rank=1, objective="latency", force=True, example_input=x64)
    report = sep.conversion_report
    assert len(report.converted) == len(report.layers) == 16
    assert all(layer.rank == 1 and layer.dense_ms is not None for layer in report.layers)
    assert all(layer.reason is None or layer.reason.startswith("forced:") for layer in report.layers)
    assert report.latency_setup["force"] is True


def test_channels_last_batch_2_and_include(resnet18, x64):
    sep = convert(resnet18, rank=2, form="A", objective="latency", memory_format="channels_last",
                  latency_batch_size=2, latency_repeats=3, include="layer1.*", example_input=x64)
    report = sep.conversion_report
    assert [layer.name for layer in report.layers] == [f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]
    check_never_slower(report)
    assert all(set(layer.candidates_ms) == {"A2"} for layer in report.layers)
    setup = report.latency_setup
    assert (setup["memory_format"], setup["batch_size"], setup["repeats"]) == ("channels_last", 2, 3)


def test_accuracy_objective_unchanged(resnet18, x64):
    for kwargs in (dict(rank=1), dict(macs=0.4), dict(energy=0.9)):
        default = convert(resnet18, example_input=x64, **kwargs)
        explicit = convert(resnet18, example_input=x64, objective="accuracy", **kwargs)
        assert default.separable_plan == explicit.separable_plan
        assert default.conversion_report.objective == "accuracy"
        assert default.conversion_report.latency_setup is None
        for layer in explicit.conversion_report.layers:
            assert (layer.dense_ms, layer.separable_ms, layer.candidates_ms, layer.reason) == (None,) * 4
        assert "ms dense" not in str(explicit.conversion_report)
        a, b = default.state_dict(), explicit.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the accuracy policy's rank=1 converts everything regardless of speed
    assert len(convert(resnet18, rank=1, example_input=x64).separable_plan) == 16


def test_bad_arguments(resnet18, x64):
    with pytest.raises(FinetuneError, match=r"objective must be one of 'accuracy', 'latency', got 'speed'"):
        convert_to_separable(resnet18, rank=1, objective="speed")
    with pytest.raises(FinetuneError, match=r"memory_format must be one of 'contiguous', 'channels_last'"):
        convert_to_separable(resnet18, rank=1, objective="latency", memory_format="nhwc", example_input=x64)
    with pytest.raises(FinetuneError, match=r"force=True .* objective='latency'"):
        convert_to_separable(resnet18, rank=1, force=True)
    with pytest.raises(FinetuneError, match="latency_batch_size"):
        convert_to_separable(resnet18, rank=1, objective="latency", latency_batch_size=0)
    with pytest.raises(FinetuneError, match="latency_margin"):
        convert_to_separable(resnet18, rank=1, objective="latency", latency_margin=1.5)
    net = nn.Sequential(nn.Conv2d(8, 8, 3))  # no pretrained_cfg: no default input size
    with pytest.raises(FinetuneError, match="objective='latency'.*example_input"):
        convert_to_separable(net, rank=1, objective="latency")


# ------------------------------------------------------------------------------ fake timings

def fake_timer(monkeypatch, seconds_of):
    """Replace the layer timer: dense 1 ms, variant ``(form, rank)`` ``seconds_of(form, rank)`` ms."""
    def fake(dense, variants, input_shapes, **kwargs):
        ms = {key: seconds_of(*key) for key in variants}
        return LayerTiming(dense_s=1e-3,
                           variants={k: VariantTiming(seconds=v * 1e-3, ratio=v) for k, v in ms.items()},
                           shapes=[tuple(s[-3:]) for s in input_shapes])
    monkeypatch.setattr(latency_policy, "time_layer_variants", fake)


def test_every_variant_slower_keeps_every_layer_dense_unless_forced(monkeypatch, resnet18, x64):
    fake_timer(monkeypatch, lambda form, rank: 1.2)
    with pytest.warns(UserWarning, match="no candidate variant was measured faster"):
        sep = convert_to_separable(resnet18, rank=1, objective="latency", example_input=x64)
    report = sep.conversion_report
    assert sep.separable_plan == [] and report.nothing_converted
    assert {layer.reason for layer in report.layers} == {"slower than dense: 1.200 ms vs 1.000 ms"}
    assert any("16 layer(s) kept dense: no candidate variant was measured faster" in m for m in report.messages)
    assert all(isinstance(m, nn.Conv2d) for m in (sep.layer1[0].conv1, sep.layer4[1].conv2))

    forced = convert(resnet18, rank=1, objective="latency", force=True, example_input=x64)
    assert len(forced.separable_plan) == 16
    assert {layer.reason for layer in forced.conversion_report.layers} == {"forced: 1.200 ms vs 1.000 ms dense"}


def test_within_margin_is_not_faster(monkeypatch, resnet18, x64):
    fake_timer(monkeypatch, lambda form, rank: 0.97 if form == "A" else 0.5)
    sep = convert(resnet18, rank=1, form="A", objective="latency", example_input=x64)
    assert sep.separable_plan == []
    assert {layer.reason for layer in sep.conversion_report.layers} == {
        "not faster than dense by the 5% margin: 0.970 ms vs 1.000 ms"}
    # with both forms the faster-than-dense Form B wins everywhere
    sep = convert(resnet18, rank=1, objective="latency", example_input=x64)
    assert {(e["form"], e["rank"]) for e in sep.separable_plan} == {("B", 1)}
    assert len(sep.separable_plan) == 16


def test_macs_budget_uses_only_faster_variants(monkeypatch, resnet18, x64):
    fake_timer(monkeypatch, lambda form, rank: 0.5 if form == "A" and rank <= 2 else 1.5)
    sep = convert(resnet18, macs=0.4, objective="latency", example_input=x64)
    report = sep.conversion_report
    assert report.macs_after <= 0.4 * report.macs_before
    assert {(e["form"]) for e in sep.separable_plan} == {"A"}
    assert all(e["rank"] <= 2 for e in sep.separable_plan)
    check_never_slower(report)


def test_macs_budget_missed_message(monkeypatch, resnet18, x64):
    def fake(dense, variants, input_shapes, **kwargs):
        big = dense.in_channels >= 256  # only layer3/layer4 have faster variants
        v = 0.5 if big else 1.5
        return LayerTiming(dense_s=1e-3, shapes=[],
                           variants={k: VariantTiming(seconds=v * 1e-3, ratio=v) for k in variants})

    monkeypatch.setattr(latency_policy, "time_layer_variants", fake)
    sep = convert(resnet18, macs=0.4, objective="latency", example_input=x64)
    report = sep.conversion_report
    assert any("macs=0.4 cannot be met with variants measured faster than dense" in m for m in report.messages)
    assert report.macs_after > 0.4 * report.macs_before
    for layer in report.layers:
        if layer.name.startswith(("layer1", "layer2")) or layer.name == "layer3.0.conv1":
            assert layer.form == "dense" and layer.reason.startswith("slower than dense"), layer.name
        else:  # the faster-than-dense layers take their cheapest variant (rank 1)
            assert layer.form != "dense" and layer.rank == 1, layer.name
    check_never_slower(report)


# ------------------------------------------------------------------------------ timers

class Twice(nn.Module):
    """The same conv at two sizes, and a conv the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + nn.functional.interpolate(self.conv(x[..., ::2, ::2]), scale_factor=2.0)


def test_shapes_per_call_and_unrun_layers():
    net = Twice()
    x = torch.randn(1, 8, 12, 12)
    sep = convert(net, rank=1, objective="latency", latency_repeats=3, example_input=x)
    layers = {layer.name: layer for layer in sep.conversion_report.layers}
    assert layers["unused"].form == "dense"
    assert layers["unused"].reason == "not run by example_input: its latency could not be measured"
    assert layers["conv"].dense_ms is not None
    forced = convert(net, rank=1, objective="latency", force=True, latency_repeats=3, example_input=x)
    assert {e["name"] for e in forced.separable_plan} == {"conv", "unused"}

    dense = nn.Conv2d(8, 8, 3, padding=1)
    timing = time_layer_variants(dense, {"pw": nn.Conv2d(8, 8, 1)}, [(1, 8, 12, 12), (1, 8, 6, 6), (1, 8, 12, 12)],
                                 repeats=3)
    assert timing.shapes == [(8, 12, 12), (8, 6, 6)]
    assert timing.dense_s > 0 and timing.variants["pw"].seconds > 0


def test_time_modules_interleaves_and_leaves_modules_alone():
    order = []

    class Probe(nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            order.append(self.tag)
            return x

    mods = {"a": Probe("a"), "b": Probe("b"), "c": Probe("c")}
    timing = time_modules(mods, torch.zeros(1), reference="a", repeats=3, warmup=1, min_sample_s=0.0)
    assert timing["a"].ratio == 1.0 and set(timing) == {"a", "b", "c"}
    # warmup round, the one-off reference probe, then rotated rounds: abc, bca, cab
    assert "".join(order) == "abc" + "a" + "abc" + "bca" + "cab"
    with pytest.raises(ValueError):
        time_modules(mods, torch.zeros(1), reference="z")

    conv = nn.Conv2d(8, 8, 3).train()
    time_layer_variants(conv, {}, [(8, 6, 6)], memory_format="channels_last", repeats=1)
    assert conv.training and conv.weight.is_contiguous()


def test_latency_module_doctests():
    result = doctest.testmod(latency_mod)
    assert result.failed == 0 and result.attempted > 0
