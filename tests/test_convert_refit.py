"""Tests for finetune.convert.refit: per-layer output errors and the least-squares refit.

Real images: scikit-learn's handwritten digits (8×8 grey) upsampled to 32×32 RGB, split into
calibration and held-out sets. Models are tiny (a 4-stage timm ResNet with 8–16 channels and a
hand-made net with grouped, strided, dilated, reflect-padded and TF-'SAME' convs) and torch runs
on one thread: on 2 shared cores oversubscribed threads are 10–50× slower.
"""

from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from helpers import randomize_bn, rel_err
from finetune.convert import SeparableConv2d, convert_to_separable, reestimate_batchnorm
from finetune.convert import refit as refit_module
from finetune.convert.measure import layer_output_errors
from finetune.convert.refit import refit_pointwise
from finetune.errors import FinetuneError


# One intra-op thread: these tests run many tiny ops, where 2 threads on 2 shared cores are
# many times slower (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def digits() -> tuple[list[torch.Tensor], torch.Tensor]:
    """(calibration batches: 4 × 64 images, held-out: 256 other images), 3×32×32, normalised."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - 0.3) / 0.4
    return list(images[:256].split(64)), images[1000:1256]


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 16), stem_width=8,
                   zero_init_last=False, num_classes=10)
    return randomize_bn(model).eval()


def odd_net() -> nn.Module:
    """Grouped convs (with bias), a conv followed directly by an in-place activation, stride +
    dilation + reflect padding, and timm's dynamic-'SAME' Conv2dSame. Leaky activations: a
    dead ReLU channel would make some refit weights unidentifiable (see the test below)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),                                   # stem: stays dense
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.LeakyReLU(0.1, inplace=True),  # grouped, bias
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.LeakyReLU(0.1),
        nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"), nn.LeakyReLU(0.1),
        Conv2dSame(16, 16, 3, stride=2), nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return randomize_bn(model).eval()


def last_conv(sep: SeparableConv2d) -> nn.Conv2d:
    return sep.pointwise if sep.form == "A" else sep.depthwise


# ------------------------------------------------------------------------------------------
# layer_output_errors
# ------------------------------------------------------------------------------------------

def test_layer_output_errors_zero_at_full_rank_positive_at_rank_1(digits):
    batches, _ = digits
    teacher = small_resnet()
    exact = convert_to_separable(teacher, rank="full")
    errors = layer_output_errors(teacher, exact, batches)
    assert list(errors) == [e["name"] for e in exact.separable_plan] and len(errors) == 8
    assert max(errors.values()) < 1e-5
    assert max(layer_output_errors(teacher, exact, batches, feed="student").values()) < 1e-5

    lossy = convert_to_separable(teacher, rank=1)
    isolated = layer_output_errors(teacher, lossy, [(x, torch.zeros(len(x))) for x in batches])
    assert all(0.1 < e < 2.0 for e in isolated.values()), isolated
    # the first converted layer sees the same input in both models: both variants agree there
    in_network = layer_output_errors(teacher, lossy, batches, feed="student")
    first = "layer1.0.conv1"
    assert in_network[first] == pytest.approx(isolated[first], rel=1e-6)


def test_layer_output_errors_feeds_the_teachers_input(digits):
    """The default variant runs the student layer on the teacher's input to that layer: check
    one deep layer against a hand-made computation."""
    batches, _ = digits
    teacher = small_resnet()
    student = convert_to_separable(teacher, rank=2)
    name = "layer3.0.conv2"
    got = layer_output_errors(teacher, student, batches, names=[name])
    sq_err = sq_ref = 0.0
    seen = {}
    handle = teacher.get_submodule(name).register_forward_hook(
        lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            for x in batches:
                teacher(x)
                y_s = student.get_submodule(name)(seen["x"])
                sq_err += float((y_s - seen["y"]).double().pow(2).sum())
                sq_ref += float(seen["y"].double().pow(2).sum())
    finally:
        handle.remove()
    assert got[name] == pytest.approx(math.sqrt(sq_err / sq_ref), rel=1e-6)
    # ... which differs from the in-network error (drift from the earlier lossy layers)
    in_network = layer_output_errors(teacher, student, batches, names=[name], feed="student")
    assert abs(in_network[name] - got[name]) > 1e-3


# ------------------------------------------------------------------------------------------
# refit_pointwise
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 2])
def test_refit_reduces_layer_errors_and_held_out_logit_error(digits, rank):
    batches, held_out = digits
    teacher = small_resnet()
    student = convert_to_separable(teacher, rank=rank)
    refitted = copy.deepcopy(student)
    result = refit_pointwise(teacher, refitted, batches)

    assert list(result) == [e["name"] for e in student.separable_plan]  # forward order here
    for name, (before, after) in result.items():
        assert after < before, (name, before, after)
    # the first layer's "before" is its SVD error; later ones include the compounded drift
    assert result["layer1.0.conv1"][0] == pytest.approx(
        layer_output_errors(teacher, student, batches, names=["layer1.0.conv1"])["layer1.0.conv1"], rel=1e-6)
    # "after" is what layer_output_errors(feed="student") measures on the refitted model
    after = layer_output_errors(teacher, refitted, batches, feed="student")
    assert all(after[n] == pytest.approx(result[n][1], rel=1e-6) for n in result)

    with torch.no_grad():
        target = teacher(held_out)
        err_svd = rel_err(student(held_out), target)
        err_refit = rel_err(refitted(held_out), target)
    print(f"rank {rank}: held-out logit relative error {err_svd:.3f} -> {err_refit:.3f}")
    assert err_refit < 0.6 * err_svd
    # held-out per-layer errors improve too, not only the calibration ones
    held_before = layer_output_errors(teacher, student, [held_out], feed="student")
    held_after = layer_output_errors(teacher, refitted, [held_out], feed="student")
    assert all(held_after[n] < held_before[n] for n in held_before)


def test_refit_is_a_no_op_at_full_rank(digits):
    batches, held_out = digits
    teacher = small_resnet()
    exact = convert_to_separable(teacher, rank="full")
    refitted = copy.deepcopy(exact)
    result = refit_pointwise(teacher, refitted, batches)
    assert max(after for _, after in result.values()) < 1e-5
    for name in result:
        w0 = last_conv(exact.get_submodule(name)).weight
        w1 = last_conv(refitted.get_submodule(name)).weight
        assert rel_err(w1, w0) < 1e-3, name
    with torch.no_grad():
        assert rel_err(refitted(held_out), teacher(held_out)) < 1e-5


@pytest.mark.parametrize("form", ["A", "B"])
def test_refit_recovers_a_realisable_last_conv(form):
    """Teacher = an exact (full-rank) separable net; student = the same net with the last conv
    of every separable layer scrambled. Least squares must find the teacher's weights back:
    this pins the feature layout for groups, Form B's unfolding (stride, dilation, reflect
    padding, dynamic 'SAME' padding) and the bias. Noise images, not digits: upsampled digits
    are locally almost linear, so their 3×3 patches are rank-deficient and the weights would
    be matched in output but not identifiable."""
    noise = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    batches, held_out = list(noise[:32].split(16)), noise[32:]
    teacher = convert_to_separable(odd_net(), rank="full", form=form)
    assert [e["groups"] for e in teacher.separable_plan] == [2, 4, 1, 1]
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for entry in student.separable_plan:
            conv = last_conv(student.get_submodule(entry["name"]))
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
            if conv.bias is not None:
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    result = refit_pointwise(teacher, student, batches, ridge=0.0)
    assert all(before > 0.1 and after < 1e-4 for before, after in result.values()), result
    for entry in teacher.separable_plan:
        want, got = last_conv(teacher.get_submodule(entry["name"])), last_conv(student.get_submodule(entry["name"]))
        assert rel_err(got.weight, want.weight) < 1e-3, entry["name"]
        if want.bias is not None:
            assert rel_err(got.bias, want.bias) < 1e-3, entry["name"]
    with torch.no_grad():
        assert rel_err(student(held_out), teacher(held_out)) < 1e-4


def test_refit_keeps_svd_weights_where_the_data_say_nothing():
    """An input channel that is always zero on the calibration images: its pointwise columns
    stay at their SVD values (the ridge pulls towards them), so held-out images where that
    channel is active are not broken; the other columns are refitted."""
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=True)).eval()
    student = convert_to_separable(teacher, rank=1, form="A", min_in_channels=1)
    calib = torch.randn(8, 6, 12, 12)
    calib[:, 0] = 0.0
    w0 = student[0].pointwise.weight.detach().clone()
    result = refit_pointwise(teacher, student, [calib])
    w1 = student[0].pointwise.weight.detach()
    assert result["0"][1] < result["0"][0]
    assert torch.equal(w1[:, 0], w0[:, 0])          # rank 1: column c ↔ input channel c
    assert not torch.allclose(w1[:, 1:], w0[:, 1:])


@pytest.mark.parametrize("form", ["A", "B"])
def test_refit_grouped_and_form_b_at_rank_1(digits, form):
    batches, held_out = digits
    teacher = odd_net()
    student = convert_to_separable(teacher, rank=1, form=form)
    assert {e["form"] for e in student.separable_plan} == {form}
    refitted = copy.deepcopy(student)
    result = refit_pointwise(teacher, refitted, batches)
    assert len(result) == 4
    assert all(after < before for before, after in result.values()), result
    with torch.no_grad():
        target = teacher(held_out)
        assert rel_err(refitted(held_out), target) < rel_err(student(held_out), target)


def test_refit_is_deterministic_and_subsamples(digits):
    batches, held_out = digits
    teacher = small_resnet()
    student = convert_to_separable(teacher, rank=1)
    runs = []
    for _ in range(2):
        refitted = copy.deepcopy(student)
        result = refit_pointwise(teacher, refitted, iter(batches), max_samples=3000)  # one-shot iterator
        runs.append((result, refitted))
    assert runs[0][0] == runs[1][0]
    states = [run[1].state_dict() for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))
    # layer1 has 256·16·16 = 65536 positions: 3000 of them still give a good fit
    full = copy.deepcopy(student)
    full_result = refit_pointwise(teacher, full, batches)
    for name, (before, after) in runs[0][0].items():
        assert after < before
        assert after < full_result[name][1] * 1.25 + 0.02, name
    with torch.no_grad():
        target = teacher(held_out)
        assert rel_err(runs[0][1](held_out), target) < 0.6 * rel_err(student(held_out), target)


def test_refit_restores_modes_and_leaves_the_teacher_alone(digits):
    batches, _ = digits
    teacher = small_resnet()
    student = convert_to_separable(teacher, rank=1)
    teacher.train()
    student.train()
    student.layer2.eval()
    t_state = copy.deepcopy(teacher.state_dict())
    bn_before = student.layer1[0].bn1.running_mean.clone()
    refit_pointwise(teacher, student, batches[:1], names=["layer1.0.conv1", "layer2.0.conv1"])
    assert teacher.training and all(m.training for m in teacher.modules())
    assert student.training and not student.layer2.training and student.layer1.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert torch.equal(student.layer1[0].bn1.running_mean, bn_before)  # ran in eval mode


def test_refit_only_touches_named_layers(digits):
    batches, _ = digits
    teacher = small_resnet()
    student = convert_to_separable(teacher, rank=1)
    before = copy.deepcopy(student.state_dict())
    result = refit_pointwise(teacher, student, batches[:2], names=["layer2.0.conv2"])
    assert list(result) == ["layer2.0.conv2"]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"layer2.0.conv2.pointwise.weight"} or changed == {"layer2.0.conv2.depthwise.weight"}


def test_refit_warns_when_student_bn_was_reestimated(digits):
    batches, _ = digits
    teacher = small_resnet()
    student = reestimate_batchnorm(convert_to_separable(teacher, rank=1), batches)
    with pytest.warns(UserWarning, match="before reestimate_batchnorm"):
        refit_pointwise(teacher, student, batches[:1], names=["layer1.0.conv1"])


def test_bad_inputs_raise(digits):
    batches, _ = digits
    teacher = small_resnet()
    student = convert_to_separable(teacher, rank=1)
    with pytest.raises(FinetuneError, match="no calibration batches"):
        refit_pointwise(teacher, student, [])
    with pytest.raises(FinetuneError, match="no module `nope`"):
        layer_output_errors(teacher, student, batches[:1], names=["nope"])
    with pytest.raises(FinetuneError, match="not a SeparableConv2d"):
        refit_pointwise(teacher, student, batches[:1], names=["conv1"])
    with pytest.raises(FinetuneError, match="ridge"):
        refit_pointwise(teacher, student, batches[:1], ridge=-1.0)
    with pytest.raises(FinetuneError, match="max_samples"):
        refit_pointwise(teacher, student, batches[:1], max_samples=0)
    with pytest.raises(FinetuneError, match="feed"):
        layer_output_errors(teacher, student, batches[:1], feed="both")  # type: ignore[arg-type]
    assert layer_output_errors(teacher, teacher, batches[:1]) == {}  # nothing converted: nothing to report


def test_docstring_examples():
    result = doctest.testmod(refit_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
