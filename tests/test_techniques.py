"""Each fine-tuning technique does what it says: frozen parameters stay put, gradual unfreezing
opens stages from the top, layer-wise decay gives decaying LRs, EMA weights are what is saved,
mixup/cutmix/auto-augment/random erasing change the inputs, lr-find suggests a sane LR, LoRA runs
end to end and a run's recipe.yaml re-runs to the same metrics."""

from __future__ import annotations

import csv
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from finetune import Recipe, fit, load_model, lr_find
from finetune.data import build_transform, scan_folder
from finetune.rundir import RUN_WEIGHTS
from finetune.train.build import build_loss
from finetune.train.checkpoints import find_checkpoint
from finetune.train.optim import body_stage_ids, build_optimizer, build_scheduler, plan_phases, set_trainable

TINY = dict(model="mobilenetv2_100", weights="offline", img_size=32, batch_size=32, seed=0,
            memory_format="contiguous")


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _pretrained_state() -> dict[str, torch.Tensor]:
    model, _ = load_model("mobilenetv2_100", weights="offline", num_classes=10)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_probe_leaves_every_body_parameter_bit_identical(digits_folder, tmp_path):
    result = fit(Recipe(data=str(digits_folder), epochs=1, strategy="probe", out=str(tmp_path / "p"), **TINY),
                 progress=False)
    before, after = _pretrained_state(), load_file(result.run_dir / RUN_WEIGHTS)
    body = [k for k in before if not k.startswith("classifier.")]
    changed_head = not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert changed_head and all(torch.equal(before[k], after[k]) for k in body)


def test_gradual_unfreezes_stages_from_the_top():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=4)
    stages = body_stage_ids(model)
    top = max(stages.values())
    phases = plan_phases(Recipe(data=".", epochs=4, strategy="gradual", weights="none"), top + 1)
    assert [p.trainable for p in phases] == ["head", 3, 6, "all"]
    trainable_stages = []
    for phase in phases:
        set_trainable(model, phase)
        opened = {stages[n] for n, p in model.named_parameters() if p.requires_grad and n in stages}
        trainable_stages.append(opened)
        assert model.classifier.weight.requires_grad
    assert trainable_stages[0] == set()
    assert trainable_stages[1] == {top - 2, top - 1, top}  # the top three stages, nothing below
    assert trainable_stages[2] == set(range(top - 5, top + 1))
    assert trainable_stages[3] == set(range(top + 1))
    # a step in the 3-stage phase leaves the lower stages bit-identical
    set_trainable(model, phases[1])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in stages and stages[n] < top - 2}
    optimizer = build_optimizer(model, phases[1], Recipe(data=".", strategy="gradual", epochs=4))
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_layer_wise_lr_decay_gives_decaying_learning_rates():
    model = timm.create_model("mobilenetv2_100", num_classes=3)
    recipe = Recipe(data=".", strategy="full", epochs=2, lr=1e-3, layer_decay=0.8, warmup_epochs=0)
    phase = plan_phases(recipe)[0]
    optimizer = build_optimizer(model, phase, recipe)
    scheduler = build_scheduler(optimizer, phase, recipe, updates_per_epoch=10)
    scheduler.step_update(1)
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = group["lr"]
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == pytest.approx(lr_of[id(named["conv_head.weight"])] / 0.8, rel=1e-6)
    order = ["conv_stem.weight", "blocks.1.0.conv_pw.weight", "blocks.3.0.conv_pw.weight",
             "blocks.6.0.conv_pw.weight", "conv_head.weight", "classifier.weight"]
    lrs = [lr_of[id(named[n])] for n in order]
    assert lrs == sorted(lrs) and lrs[0] < 0.1 * lrs[-1], lrs
    # without layer decay every body group gets the same LR
    flat = build_optimizer(model, phase, recipe.replace({"optim.layer_decay": None}))
    assert {g["lr"] for g in flat.param_groups} == {1e-3}


def test_ema_weights_are_evaluated_and_saved(digits_folder, tmp_path):
    common = dict(data=str(digits_folder), epochs=3, **TINY)
    raw = fit(Recipe(out=str(tmp_path / "raw"), **common), progress=False)
    ema = fit(Recipe(out=str(tmp_path / "ema"), ema=True, ema_decay=0.9, **common), progress=False)
    raw_last = load_file(find_checkpoint(raw.run_dir) / "model.safetensors")
    ema_raw_last = load_file(find_checkpoint(ema.run_dir) / "model.safetensors")
    ema_last = load_file(find_checkpoint(ema.run_dir) / "ema.safetensors")
    # the raw trajectories are identical (same seed; EMA draws no random numbers) ...
    assert all(torch.equal(raw_last[k], ema_raw_last[k]) for k in raw_last)
    # ... but what was validated and saved differs: the average, not the last step's weights
    assert not torch.equal(raw_last["classifier.weight"], ema_last["classifier.weight"])
    if ema.metrics["best_epoch"] == 3:  # the best epoch is the last: model.safetensors is the final EMA
        best = load_file(ema.run_dir / RUN_WEIGHTS)
        assert all(torch.equal(best[k], ema_last[k]) for k in best)
    assert ema.metrics["top1"] > 0.3  # chance is 0.1
    logged = [float(r["val_top1"]) for r in csv.DictReader((ema.run_dir / "log.csv").open())]
    assert ema.metrics["top1"] == pytest.approx(max(logged))  # the saved best epoch is an EMA evaluation
    assert Recipe.from_yaml(ema.run_dir / "recipe.yaml").strategy.ema is True


def test_mixup_and_cutmix_mix_the_batch_and_soften_targets(digits_folder):
    split = scan_folder(digits_folder, val_fraction=0.2, seed=0)
    loss_fn, mixer = build_loss(Recipe(data=".", mixup=0.4, cutmix=1.0), split, torch.device("cpu"))
    assert mixer is not None
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    mixed, targets = mixer(images.clone(), labels)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
    assert not torch.equal(mixed, images) and (targets.max(1).values < 1).all()
    assert torch.isfinite(loss_fn(mixed, torch.randn(8, 10), targets))
    assert build_loss(Recipe(data="."), split, torch.device("cpu"))[1] is None


@pytest.mark.parametrize("policy, op", [("randaugment", "RandAugment"), ("trivialaugment", "RandAugment"),
                                        ("augmix", "AugMix")])
def test_auto_augment_policies_reach_timm(policy, op):
    recipe = Recipe(data=".", auto_augment=policy)
    config = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    transform = build_transform(config, train=True, auto_augment=recipe.augment.timm_auto_augment)
    assert op in repr(transform)
    if policy == "trivialaugment":  # one op a time at a uniformly drawn magnitude
        assert "num_layers=1" in repr(transform) or "n=1" in repr(transform) or "ops" in repr(transform)


def test_random_erasing_erases(tmp_path):
    from PIL import Image

    config = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    image = Image.new("RGB", (32, 32), (255, 255, 255))  # after normalisation: all ones
    erase = build_transform(config, train=True, scale=(1.0, 1.0), re_prob=1.0)
    keep = build_transform(config, train=True, scale=(1.0, 1.0), re_prob=0.0)
    torch.manual_seed(0)
    assert torch.allclose(keep(image), torch.ones(3, 32, 32))
    assert (erase(image) != 1).float().mean() > 0.01


def test_lr_find_suggests_a_learning_rate_in_range_and_plots(digits_folder, tmp_path):
    recipe = Recipe(data=str(digits_folder), strategy="probe", epochs=1, **TINY)
    result = lr_find(recipe, out=tmp_path / "lr.png", steps=60, start_lr=1e-6, end_lr=10.0)
    assert result.plot.is_file() and result.plot.stat().st_size > 5000
    assert 1e-6 <= result.suggestion <= result.min_loss_lr <= 10.0
    assert min(result.smoothed) < result.smoothed[0]  # the loss did fall somewhere in the sweep
    assert len(result.lrs) < 60  # and the sweep stopped once it diverged at a huge LR
    assert 1e-4 <= result.suggestion <= 1.0, result.suggestion  # a head on pretrained features


def test_lora_run_end_to_end(digits_folder, tmp_path):
    result = fit(Recipe(data=str(digits_folder), epochs=2, lora=True, lr=3e-3, out=str(tmp_path / "lora"), **TINY),
                 progress=False)
    run = result.run_dir
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    adapter_bytes = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes <= 0.10 * (run / RUN_WEIGHTS).stat().st_size
    # model.safetensors is the merged model: plain timm loads it strictly
    plain = timm.create_model("mobilenetv2_100", num_classes=10)
    plain.load_state_dict(load_file(run / RUN_WEIGHTS))
    before = _pretrained_state()
    after = load_file(run / RUN_WEIGHTS)
    depthwise = [k for k in before if k.endswith("conv_dw.weight")]
    assert depthwise and all(torch.equal(before[k], after[k]) for k in depthwise), "depthwise convs stay frozen"
    assert json.loads((run / "model.json").read_text())["strategy"] == "lora"
    assert result.metrics["top1"] > 0.3


def test_recipe_written_by_fit_reruns_to_the_same_metrics(digits_folder, tmp_path):
    first = fit(Recipe(data=str(digits_folder), epochs=2, out=str(tmp_path / "a"), **TINY), progress=False)
    again = Recipe.from_yaml(first.run_dir / "recipe.yaml", ["runtime.out=" + str(tmp_path / "b")])
    second = fit(again, progress=False)
    assert second.metrics["top1"] == first.metrics["top1"] and second.metrics["loss"] == first.metrics["loss"]
    a, b = load_file(first.run_dir / RUN_WEIGHTS), load_file(second.run_dir / RUN_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
