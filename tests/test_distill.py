"""Tests for finetune.distill: the distillation loss, its feature hooks and compare_outputs.

Everything is tiny (a 4-stage ResNet with ≤ 16 channels at 32 px, an 8×8 digits CNN) and torch
runs on one thread: on 2 shared cores oversubscribed OpenMP threads are ~50× slower.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from finetune.convert import convert_to_separable, reestimate_batchnorm
from helpers import randomize_bn
from finetune.distill import DistillationLoss, compare_outputs, feature_layers_from_plan
from finetune.errors import FinetuneError


# One intra-op thread: these tests run many tiny ops, where 2 threads on 2 shared cores are
# many times slower (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_resnet(seed: int = 0) -> nn.Module:
    """timm ResNet, one BasicBlock per stage, 8-16 channels; random BN so nothing is hidden
    behind zero-initialised last BNs."""
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(8, 16, 16, 16), stem_width=8,
                   zero_init_last=False)
    randomize_bn(model, seed)
    return model.eval()


class Recording(nn.Module):
    """Logits = flatten(images) @ W; remembers its last input and how often it ran."""

    def __init__(self, features: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.calls = 0
        self.last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last_input = x.detach().clone()
        return self.linear(x.flatten(1))


def hand_kd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·(1/B)·Σ_b Σ_k p_t (log p_t − log p_s), written out."""
    s, t = s.double(), t.double()
    p_t = torch.exp(t / temperature) / torch.exp(t / temperature).sum(-1, keepdim=True)
    p_s = torch.exp(s / temperature) / torch.exp(s / temperature).sum(-1, keepdim=True)
    return temperature ** 2 * (p_t * (p_t.log() - p_s.log())).sum() / s.shape[0]


def hand_ce(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s = s.double()
    log_p = s - s.exp().sum(-1, keepdim=True).log()
    return -log_p[torch.arange(len(y)), y].mean()


def num(t: torch.Tensor) -> float:
    return float(t.detach())


def no_hooks(*models: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for model in models for m in model.modules())


# --------------------------------------------------------------------------------------------
# Loss terms against hand-computed values
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.9, 4.0), (0.0, 1.0), (1.0, 3.0)])
def test_loss_terms_match_hand_computed(alpha: float, temperature: float) -> None:
    torch.manual_seed(1)
    teacher = nn.Flatten()                       # teacher logits = the "images" themselves
    images = torch.randn(5, 4) * 3
    student_logits = (torch.randn(5, 4) * 2).requires_grad_()
    labels = torch.tensor([0, 3, 1, 2, 3])
    crit = DistillationLoss(teacher, nn.Identity(), alpha=alpha, temperature=temperature)
    out = crit(images, student_logits, labels)
    out_d = {k: v.detach() for k, v in out.items()}
    kd, ce = hand_kd(student_logits.detach(), images, temperature), hand_ce(student_logits.detach(), labels)
    assert num(out_d["kd_loss"]) == pytest.approx(float(kd), rel=1e-5, abs=1e-7)
    assert num(out_d["task_loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert num(out_d["feature_loss"]) == 0.0
    assert num(out_d["loss"]) == pytest.approx(float(alpha * kd + (1 - alpha) * ce), rel=1e-5, abs=1e-7)
    out["loss"].backward()
    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0


def test_kd_value_on_a_two_class_example() -> None:
    # t = (0, log 3) -> p_t = (1/4, 3/4); s = (0, 0) -> p_s = (1/2, 1/2); T = 1
    teacher = nn.Flatten()
    t = torch.tensor([[0.0, float(torch.tensor(3.0).log())]])
    out = DistillationLoss(teacher, nn.Identity(), alpha=1.0, temperature=1.0)(t, torch.zeros(1, 2))
    expected = 0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))
    assert num(out["kd_loss"]) == pytest.approx(float(expected), rel=1e-6)
    # T = 2 on the same logits multiplies KL(T=2) by 4
    out2 = DistillationLoss(teacher, nn.Identity(), alpha=1.0, temperature=2.0)(t, torch.zeros(1, 2))
    assert num(out2["kd_loss"]) == pytest.approx(float(hand_kd(torch.zeros(1, 2), t, 2.0)), rel=1e-6)


def test_label_free_path_drops_task_term_and_weights_kd_by_one() -> None:
    torch.manual_seed(2)
    images, student_logits = torch.randn(6, 5), torch.randn(6, 5)
    crit = DistillationLoss(nn.Flatten(), nn.Identity(), alpha=0.3, temperature=2.0)
    out = crit(images, student_logits)
    assert out["task_loss"] is None
    kd = hand_kd(student_logits, images, 2.0)
    assert num(out["kd_loss"]) == pytest.approx(float(kd), rel=1e-5)
    assert num(out["loss"]) == pytest.approx(float(kd), rel=1e-5)      # weight 1, not alpha=0.3
    with_labels = crit(images, student_logits, torch.zeros(6, dtype=torch.long))
    assert num(with_labels["loss"]) != pytest.approx(num(out["loss"]))


def test_bad_arguments_say_what_was_wrong() -> None:
    t, s = nn.Flatten(), nn.Identity()
    with pytest.raises(FinetuneError, match="alpha"):
        DistillationLoss(t, s, alpha=1.5)
    with pytest.raises(FinetuneError, match="temperature"):
        DistillationLoss(t, s, temperature=0)
    with pytest.raises(FinetuneError, match="beta"):
        DistillationLoss(t, s, beta=-1)
    with pytest.raises(FinetuneError, match="same module"):
        DistillationLoss(t, t)
    with pytest.raises(FinetuneError, match="student_mean_std"):
        DistillationLoss(t, s, teacher_mean_std=((0.5,), (0.2,)))
    with pytest.raises(FinetuneError, match="separable_plan"):
        DistillationLoss(t, s, beta=1.0)                 # beta > 0 needs layers; no plan to read
    with pytest.raises(FinetuneError, match="does not exist in the teacher"):
        DistillationLoss(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)), feature_layers=["7"])


# --------------------------------------------------------------------------------------------
# Teacher: frozen, eval, recomputed on the same view, re-normalised
# --------------------------------------------------------------------------------------------

def test_teacher_frozen_and_stays_in_eval_mode() -> None:
    teacher = tiny_resnet(0).train()
    student = convert_to_separable(teacher, rank=1)
    bn_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    crit = DistillationLoss(teacher, student, alpha=0.5, beta=0.5)
    assert not any(m.training for m in teacher.modules())
    crit.train()
    student.train()
    assert crit.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 3, 32, 32)
    out = crit(x, student(x), torch.tensor([0, 1, 2, 3]))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # teacher.train() behind the loss's back is undone at the next call; BN stats never move
    teacher.train()
    crit(x, student(x))
    assert not any(m.training for m in teacher.modules())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in bn_before.items())
    crit.close()


def test_teacher_recomputed_every_call_on_the_given_images() -> None:
    torch.manual_seed(3)
    teacher = Recording()
    crit = DistillationLoss(teacher, nn.Identity(), alpha=1.0, temperature=1.0)
    logits = torch.randn(2, 3)
    a, b = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    kd_a = num(crit(a, logits)["kd_loss"])
    assert torch.equal(teacher.last_input, a)
    kd_b = num(crit(b, logits)["kd_loss"])
    assert torch.equal(teacher.last_input, b)
    assert teacher.calls == 2 and kd_a != pytest.approx(kd_b)
    with torch.no_grad():
        assert kd_b == pytest.approx(float(hand_kd(logits, teacher.linear(b.flatten(1)), 1.0)), rel=1e-5)
    # the same view again: the teacher runs again (no cache), same value
    assert num(crit(a, logits)["kd_loss"]) == pytest.approx(kd_a, rel=1e-6)
    assert teacher.calls == 3


def test_teacher_input_renormalised_between_different_mean_std() -> None:
    torch.manual_seed(4)
    teacher = Recording()
    s_mean, s_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    t_mean, t_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    crit = DistillationLoss(teacher, nn.Identity(), teacher_mean_std=(t_mean, t_std),
                            student_mean_std=(s_mean, s_std))
    pixels = torch.rand(2, 3, 2, 2)
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    images = (pixels - view(s_mean)) / view(s_std)              # what the student saw
    crit(images, torch.randn(2, 3))
    expected = (pixels - view(t_mean)) / view(t_std)            # what the teacher expects
    assert torch.allclose(teacher.last_input, expected, atol=1e-5)
    assert torch.allclose(crit.teacher_input(images), expected, atol=1e-5)
    # the same statistics on both sides: images pass through untouched
    same = DistillationLoss(teacher, nn.Identity(), teacher_mean_std=(t_mean, t_std),
                            student_mean_std=(t_mean, t_std))
    assert same.teacher_input(images) is images
    same(images, torch.randn(2, 3))
    assert torch.equal(teacher.last_input, images)
    # buffers follow .to(): the loss module carries the statistics with the teacher
    assert {"teacher_mean", "student_std"} <= {n for n, _ in crit.named_buffers()}
    assert "teacher_mean" not in crit.state_dict()


# --------------------------------------------------------------------------------------------
# Feature matching through hooks
# --------------------------------------------------------------------------------------------

def test_feature_loss_is_normalised_mse_per_layer_and_scale_free() -> None:
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.add_(0.3 * torch.randn_like(student[0].weight))
    x = torch.randn(8, 4)

    def expected(t_model: nn.Module, s_model: nn.Module) -> float:
        with torch.no_grad():
            t0, s0 = t_model[0](x), s_model[0](x)
            t2, s2 = t_model(x), s_model(x)
        return float(F.mse_loss(s0, t0) / t0.pow(2).mean() + F.mse_loss(s2, t2) / t2.pow(2).mean())

    with DistillationLoss(teacher, student, beta=2.0, alpha=1.0, feature_layers=["0", "2"]) as crit:
        out = crit(x, student(x))
        assert num(out["feature_loss"]) == pytest.approx(expected(teacher, student), rel=1e-5)
        assert num(out["loss"]) == pytest.approx(num(out["kd_loss"]) + 2.0 * num(out["feature_loss"]),
                                                   rel=1e-5)
        # the feature term reaches the student's parameters
        out["feature_loss"].backward()
        assert student[0].weight.grad is not None and student[0].weight.grad.abs().sum() > 0

        def layer0() -> float:
            with torch.no_grad():
                return float(F.mse_loss(student[0](x), teacher[0](x)) / teacher[0](x).pow(2).mean())

        layer0_1 = layer0()
        # scaling layer "0" by 10 in both models leaves its normalised term unchanged
        for m in (teacher, student):
            with torch.no_grad():
                m[0].weight.mul_(10)
                m[0].bias.mul_(10)
        out10 = crit(x, student(x))
        assert layer0() == pytest.approx(layer0_1, rel=1e-4)
        assert num(out10["feature_loss"]) == pytest.approx(expected(teacher, student), rel=1e-5)


def test_full_rank_student_matches_and_rank1_does_not() -> None:
    teacher = tiny_resnet(0)
    x = torch.randn(2, 3, 32, 32)
    exact = convert_to_separable(teacher, rank="full").eval()
    layers = feature_layers_from_plan(exact)
    assert layers == [e["name"] for e in exact.separable_plan] and len(layers) == 8
    with DistillationLoss(teacher, exact, alpha=1.0, beta=1.0) as crit:
        assert crit.feature_layers == layers            # default: the converted layers
        out = crit(x, exact(x))
    assert num(out["feature_loss"]) < 1e-8
    assert num(out["kd_loss"]) < 1e-5    # float32 KL noise

    rank1 = convert_to_separable(teacher, rank=1).eval()
    with DistillationLoss(teacher, rank1, alpha=1.0, beta=1.0) as crit:
        out1 = crit(x, rank1(x))
    assert num(out1["feature_loss"]) > 0.05 * len(layers)
    assert num(out1["kd_loss"]) > 1e-3
    assert num(out1["loss"]) == pytest.approx(num(out1["kd_loss"]) + num(out1["feature_loss"]), rel=1e-5)


def test_hooks_registered_once_and_removed_on_close() -> None:
    teacher = tiny_resnet(1)
    student = convert_to_separable(teacher, rank=1)
    assert no_hooks(teacher, student)
    crit = DistillationLoss(teacher, student, beta=1.0)
    n = len(crit.feature_layers)
    for model in (teacher, student):
        assert sum(len(m._forward_hooks) for m in model.modules()) == n
        assert len(model._forward_pre_hooks) == 1
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):                                   # calls add no hooks
        crit(x, student(x))
    assert sum(len(m._forward_hooks) for m in student.modules()) == n
    crit.close()
    crit.close()                                         # idempotent
    assert no_hooks(teacher, student)
    with pytest.raises(FinetuneError, match="closed"):
        crit(x, student(x))
    with DistillationLoss(teacher, student, beta=1.0):
        assert not no_hooks(teacher, student)
    assert no_hooks(teacher, student)


def test_feature_records_do_not_outlive_a_call() -> None:
    teacher = tiny_resnet(2)
    student = convert_to_separable(teacher, rank=1)
    x = torch.randn(2, 3, 32, 32)
    with DistillationLoss(teacher, student, beta=1.0) as crit:
        logits = student(x)
        crit(x, logits)
        assert all(not v for v in crit._student_rec.outputs.values())
        assert all(not v for v in crit._teacher_rec.outputs.values())
        with pytest.raises(FinetuneError, match="call student"):
            crit(x, logits)                              # no fresh student forward: say so
        for _ in range(3):                               # eval-only forwards do not pile up
            with torch.no_grad():
                student(x)
        assert all(len(v) == 1 for v in crit._student_rec.outputs.values())
        snapshot = copy.deepcopy(student)               # e.g. a "best model" copy: carries hook copies
        with torch.no_grad():
            snapshot(x)
        assert all(len(v) == 1 for v in crit._student_rec.outputs.values())
    with torch.no_grad():
        snapshot(x)                                      # after close: the copies' hooks are inert
    assert all(not v for v in crit._student_rec.outputs.values())


# --------------------------------------------------------------------------------------------
# A real training signal
# --------------------------------------------------------------------------------------------

def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_distilling_rank1_student_on_digits_reduces_loss_and_recovers_accuracy() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    labels = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images), generator=g)
    train, test = perm[:1200], perm[1200:]

    torch.manual_seed(0)
    teacher = digits_cnn()
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        idx = train[torch.randint(len(train), (64,), generator=g)]
        loss = F.cross_entropy(teacher(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()

    student = convert_to_separable(teacher, rank=1)
    assert [e["name"] for e in student.separable_plan] == ["3", "7"]
    student = reestimate_batchnorm(student, [images[train[i:i + 100]] for i in range(0, 600, 100)])
    before = compare_outputs(teacher, student, [(images[test], labels[test])])
    assert before["teacher_acc"] > 0.9

    crit = DistillationLoss(teacher, student, alpha=1.0, temperature=2.0, beta=0.5)
    held_out = images[test[:200]]

    def eval_loss() -> float:
        student.eval()
        with torch.no_grad():
            return float(crit(held_out, student(held_out))["loss"])

    loss_before = eval_loss()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)   # low LR from the SVD start
    train_losses = []
    for _ in range(60):
        student.train()
        idx = train[torch.randint(len(train), (64,), generator=g)]
        view = images[idx] + 0.1 * torch.randn(images[idx].shape, generator=g)   # augmented view
        out = crit(view, student(view))                   # unlabeled: pure distillation
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        train_losses.append(num(out["loss"]))
    loss_after = eval_loss()
    crit.close()
    after = compare_outputs(teacher, student, [(images[test], labels[test])])

    # thresholds leave ~2x margin over seeds 0-6 (held-out loss ratio 0.17-0.35, train-loss ratio
    # ~0.22, KL ratio 0.09-0.25, agreement and accuracy +0.14..+0.29)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert sum(train_losses[-5:]) < 0.4 * sum(train_losses[:5]), train_losses
    assert after["kl"] < 0.5 * before["kl"], (before, after)
    assert after["agreement"] > before["agreement"] + 0.08, (before, after)
    assert after["student_acc"] > before["student_acc"] + 0.08, (before, after)
    assert after["teacher_acc"] == before["teacher_acc"]    # the teacher never moved


# --------------------------------------------------------------------------------------------
# compare_outputs
# --------------------------------------------------------------------------------------------

def test_compare_outputs_side_by_side_numbers() -> None:
    teacher = tiny_resnet(3)
    batches = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])), torch.randn(2, 3, 32, 32)]
    same = compare_outputs(teacher, copy.deepcopy(teacher), batches)
    assert same["n"] == 5 and same["agreement"] == 1.0
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["max_abs_diff"] == 0.0
    assert same["teacher_acc"] == same["student_acc"]   # over the 3 labelled images

    student = convert_to_separable(teacher, rank=1).train()
    teacher.train()
    stats = compare_outputs(teacher, student, batches)
    assert teacher.training and student.training         # modes restored
    with torch.no_grad():
        t = torch.cat([teacher.eval()(b[0] if isinstance(b, tuple) else b) for b in batches])
        s = torch.cat([student.eval()(b[0] if isinstance(b, tuple) else b) for b in batches])
    assert stats["agreement"] == pytest.approx(float((t.argmax(1) == s.argmax(1)).float().mean()))
    assert stats["max_abs_diff"] == pytest.approx(float((t - s).abs().max()), rel=1e-5)
    assert stats["mean_abs_diff"] == pytest.approx(float((t - s).abs().mean()), rel=1e-5)
    assert stats["kl"] == pytest.approx(float(hand_kd(s, t, 1.0)), rel=1e-4)
    assert stats["kl"] > 0

    unlabeled = compare_outputs(teacher, student, [torch.randn(2, 3, 32, 32)])
    assert unlabeled["teacher_acc"] is None and unlabeled["student_acc"] is None
