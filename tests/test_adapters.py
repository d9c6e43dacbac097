"""Tests for finetune.adapters: LoRA through peft on timm MobileNetV2 / EfficientNet-Lite0.

Real ImageNet weights (offline packages), 64×64 digit images, batch 4, one torch thread. One
module-scoped fixture per architecture wraps a model and trains it for a few steps; the tests
read from it (merging works on a deep copy, since merge_and_unload consumes the model).
"""

from __future__ import annotations

import copy
import doctest
import os
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import save_file
from timm.layers import Conv2dSame
from torch import nn

import finetune.adapters as adapters_module
from finetune.adapters import (
    apply_lora,
    describe_trainable,
    load_adapter,
    lora_target_modules,
    merge_lora,
    parameter_counts,
    save_adapter,
)
from finetune.errors import FinetuneError
from finetune.rundir import load_model

# peft warns (rather than fails) when it tries the Hugging Face Hub: make that an error here
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error::UserWarning:peft")]

ARCHS = ["mobilenetv2_100", "tf_efficientnet_lite0"]
PREFIX = "base_model.model."
STEPS = 4  # B=0 at init: B moves at step 1 (2 behind a zero-init BN), A one step after B


def fresh_base(arch: str) -> nn.Module:
    return load_model(arch, weights="offline", num_classes=10)[0]


def digit_batch(data_config: dict, n: int = 4, offset: int = 0) -> torch.Tensor:
    """``n`` sklearn digits, upsampled to 64×64 RGB and normalised like the model expects."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[offset:offset + n], dtype=torch.float32) / 16.0
    images = F.interpolate(images[:, None], size=(64, 64), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


@pytest.fixture(scope="module", params=ARCHS)
def trained(request, one_thread):
    """A LoRA model (r=8) after a few AdamW steps on random labels, plus what it started from."""
    arch = request.param
    torch.manual_seed(0)
    base, data_config = load_model(arch, weights="offline", num_classes=10)
    x, x_test = digit_batch(data_config), digit_batch(data_config, offset=100)
    labels = torch.randint(0, 10, (4,))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_logits = base(x_test)
    targets = lora_target_modules(base)
    peft_model = apply_lora(base, r=8)
    peft_model.eval()
    with torch.no_grad():
        initial_logits = peft_model(x_test)
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable_at_start = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    counts = parameter_counts(peft_model)

    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = F.cross_entropy(peft_model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(x_test)
    return SimpleNamespace(arch=arch, model=peft_model, targets=targets, base_state=base_state,
                           base_logits=base_logits, initial_logits=initial_logits, initial=initial,
                           trainable_at_start=trainable_at_start, counts=counts, x=x_test, logits=logits,
                           losses=losses)


# --------------------------------------------------------------------------------------------
# Targets, trainable parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_targets_are_exactly_the_dense_pointwise_convs(arch):
    model = fresh_base(arch)
    modules = dict(model.named_modules())
    targets = lora_target_modules(model)
    dense_1x1 = [n for n, m in modules.items()
                 if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1)]
    # ... where a rank-8 adapter is at most a quarter of the layer: r·(in+out) ≤ in·out / 4
    efficient = [n for n in dense_1x1 if 8 * (modules[n].in_channels + modules[n].out_channels)
                 <= modules[n].in_channels * modules[n].out_channels / 4]
    depthwise = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    kxk = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert depthwise and kxk and "conv_head" in dense_1x1
    assert set(targets) == set(efficient), "auto targets = the groups==1 1×1 convs where LoRA pays"
    assert len(efficient) >= len(dense_1x1) // 2 and len(efficient) < len(dense_1x1)
    assert not set(targets) & (set(depthwise) | set(kxk))
    assert "classifier" not in targets
    assert targets == [n for n in modules if n in set(targets)], "model order"


@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_targets_names_and_regexes(arch):
    model = fresh_base(arch)
    assert lora_target_modules(model, ["conv_head"]) == ["conv_head"]
    pwl = lora_target_modules(model, [r"blocks\..*\.conv_pwl", "conv_head"])
    assert pwl[-1] == "conv_head" and all(n.endswith("conv_pwl") for n in pwl[:-1]) and len(pwl) > 10
    if arch == "mobilenetv2_100":  # a dense 3×3 nn.Conv2d may be named explicitly (lite0's is a Conv2dSame)
        assert lora_target_modules(model, "conv_stem") == ["conv_stem"]


class TinyNet(nn.Module):
    """A 1×1 and a 3×3 Conv2dSame (timm's dynamic 'same' padding), a hidden Linear, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.pw = Conv2dSame(16, 16, 1, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.same = Conv2dSame(16, 8, 3, stride=2)
        self.hidden = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        x = self.same(self.bn(self.pw(self.stem(x)))).mean((2, 3))
        return self.fc(torch.relu(self.hidden(x)))


def test_conv2d_same_1x1_and_hidden_linear_without_pretrained_cfg():
    torch.manual_seed(0)
    model = TinyNet().eval()
    assert lora_target_modules(model, r=1) == ["pw", "hidden"]  # head found via get_classifier()
    x = torch.randn(2, 3, 13, 13)  # odd size: 'same' padding is uneven for the 3×3 conv
    with torch.no_grad():
        before = model(x)
    peft_model = apply_lora(model, r=1)
    with torch.no_grad():
        assert torch.equal(peft_model(x), before)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
        adapted = peft_model(x)
    assert not torch.equal(adapted, before)
    merged = merge_lora(peft_model)
    assert list(merged.state_dict()) == list(TinyNet().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)


def test_trainable_fraction_and_description(trained):
    trainable, total = trained.counts
    base_total = sum(v.numel() for k, v in trained.base_state.items() if k.endswith(("weight", "bias")))
    fraction = trainable / base_total
    message = f"{trained.arch}: trainable {trainable:,} of {base_total:,} base parameters = {fraction:.2%}"
    print(message)
    assert 0 < fraction <= 0.10, message
    assert total > base_total  # peft counts LoRA weights and the frozen originals of head / BN too
    assert describe_trainable(trained.model) == (
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%)"
    )


def test_head_bn_and_lora_are_exactly_the_trainable_params(trained):
    peft_model = trained.model
    modules = dict(peft_model.named_modules())
    bns = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d) and ".modules_to_save." in n]
    assert {n.removeprefix(PREFIX).split(".modules_to_save.")[0] for n in bns} == {
        k.rsplit(".", 1)[0] for k in trained.base_state if k.endswith("running_var")
    }, "every BN has a trainable copy"
    assert isinstance(modules[PREFIX + "classifier.modules_to_save.default"], nn.Linear)
    expected = {n for n, _ in peft_model.named_parameters() if is_adapter_param(n)}
    assert trained.trainable_at_start == expected
    assert any(".classifier.modules_to_save." in n for n in expected)
    lora = {n for n in expected if ".lora_" in n}
    assert {n.removeprefix(PREFIX).split(".lora_")[0] for n in lora} == set(trained.targets)


# --------------------------------------------------------------------------------------------
# Behaviour: identity at init, training moves only the adapter
# --------------------------------------------------------------------------------------------


def test_fresh_lora_computes_the_base_model(trained):
    assert torch.equal(trained.initial_logits, trained.base_logits)  # B = 0 exactly


def test_training_moves_only_the_adapter(trained):
    assert all(map(torch.isfinite, map(torch.tensor, trained.losses)))
    peft_model = trained.model
    params = dict(peft_model.named_parameters())
    state = peft_model.state_dict()
    frozen_checked = 0
    for key, before in trained.base_state.items():
        # LoRA layers keep the base weight under .base_layer, wrapped BN/head under .original_module
        name = key.rsplit(".", 1)
        candidates = [PREFIX + key, f"{PREFIX}{name[0]}.base_layer.{name[1]}",
                      f"{PREFIX}{name[0]}.original_module.{name[1]}"]
        now = next(state[c] for c in candidates if c in state)
        assert torch.equal(now, before), f"{trained.arch}: base tensor {key} changed"
        frozen_checked += 1
    assert frozen_checked == len(trained.base_state)
    unchanged = [n for n, p in params.items() if is_adapter_param(n) and torch.equal(p, trained.initial[n])]
    assert not unchanged, f"{trained.arch}: adapter params that did not train: {unchanged[:5]}"
    assert not torch.equal(trained.logits, trained.base_logits)


# --------------------------------------------------------------------------------------------
# Save / load, merge
# --------------------------------------------------------------------------------------------


def test_save_and_load_adapter(trained, tmp_path):
    folder = save_adapter(trained.model, tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(folder))
    merged = merge_lora(copy.deepcopy(trained.model))
    save_file(merged.state_dict(), tmp_path / "full.safetensors")
    adapter_size = (folder / "adapter_model.safetensors").stat().st_size
    full_size = (tmp_path / "full.safetensors").stat().st_size
    message = f"{trained.arch}: adapter {adapter_size:,} B vs full {full_size:,} B = {adapter_size / full_size:.2%}"
    print(message)
    # At r=8 the file holds LoRA (mobilenetv2_100: 6.5% of the model's numbers), every BN's
    # weight, bias and running stats (3.0%) and the head (0.6%): 10.5% of the bytes for
    # mobilenetv2_100, 8.4% for tf_efficientnet_lite0. Early MobileNetV2 layers are so thin
    # (e.g. 16→96) that r·(in+out) is ~half of in·out.
    assert adapter_size <= 0.10 * full_size, message

    loaded = load_adapter(fresh_base(trained.arch), folder)
    assert isinstance(loaded, PeftModel)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference by default"
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(trained.x), trained.logits)
    trainable = load_adapter(fresh_base(trained.arch), folder, is_trainable=True)
    assert parameter_counts(trainable) == trained.counts


def test_merge_gives_a_plain_timm_model(trained):
    merged = merge_lora(copy.deepcopy(trained.model))
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(trained.x)
    torch.testing.assert_close(merged_logits, trained.logits, atol=1e-5, rtol=1e-5)
    assert not any(".lora_" in n or "modules_to_save" in n or "base_layer" in n for n, _ in merged.named_modules())
    assert all(p.requires_grad for p in merged.parameters())

    reference = timm.create_model(trained.arch, num_classes=10)
    assert list(merged.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(merged.state_dict(), strict=True)
    reference.eval()
    with torch.no_grad():
        assert torch.equal(reference(trained.x), merged_logits)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("targets", "needle"),
    [
        (["blocks.99.0.conv_pw"], "matches no module"),
        ([r"blocks\.1\.0\.conv_dw"], "depthwise"),
        ([r".*conv_(pw|dw)"], "depthwise"),
        (["bn1"], "BatchNormAct2d"),
        (["classifier"], "classifier head"),
        (["blocks.("], "not a valid regex"),
        ([], "targets is empty"),
    ],
)
def test_bad_targets_raise_one_line_errors(arch, targets, needle):
    model = fresh_base(arch)
    with pytest.raises(FinetuneError, match=needle) as info:
        apply_lora(model, targets=targets)
    assert "\n" not in str(info.value)


def test_conv2d_same_kxk_is_rejected_and_bad_rank():
    model = fresh_base("tf_efficientnet_lite0")  # conv_stem is a 3×3 stride-2 Conv2dSame
    with pytest.raises(FinetuneError, match="Conv2dSame"):
        lora_target_modules(model, ["conv_stem"])
    with pytest.raises(FinetuneError, match="rank"):
        apply_lora(model, r=0)


def test_load_adapter_errors(tmp_path):
    model = fresh_base("mobilenetv2_100")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="holds no LoRA adapter"):
        load_adapter(model, tmp_path / "empty")
    with pytest.raises(FinetuneError, match="holds no LoRA adapter"):
        load_adapter(model, tmp_path / "missing")
    folder = save_adapter(apply_lora(fresh_base("mobilenetv2_100"), r=2), tmp_path / "mnv2")
    with pytest.raises(FinetuneError, match="trained on `mobilenetv2_100`, not `tf_efficientnet_lite0`"):
        load_adapter(fresh_base("tf_efficientnet_lite0"), folder)
    five_classes = load_model("mobilenetv2_100", weights="none", num_classes=5)[0]
    with pytest.raises(FinetuneError, match=r"`classifier\.(weight|bias)` of shape \(10,") as info:
        load_adapter(five_classes, folder)
    assert "\n" not in str(info.value)
    with pytest.raises(FinetuneError, match="needs a LoRA model"):
        merge_lora(model)
    with pytest.raises(FinetuneError, match="already has LoRA"):
        load_adapter(apply_lora(model, r=2), folder)


def test_module_doctests():
    result = doctest.testmod(adapters_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
