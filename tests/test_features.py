"""Frozen-feature cache: the first cached head epoch equals the uncached one, later epochs run no
backbone, features are reused across runs and invalidated when model, weights, transform or data change."""

from __future__ import annotations

import csv
import os

import pytest
import timm
import torch

from finetune import Recipe, fit
from finetune.data import ImageDataset, build_transform, scan_folder
from finetune.train.features import FeatureCache, HeadOnly, cache_unusable_reason

TINY = dict(model="mobilenetv2_100", weights="offline", img_size=32, batch_size=32, seed=0,
            memory_format="contiguous", strategy="probe")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def _log(run_dir):
    return list(csv.DictReader((run_dir / "log.csv").open()))


def test_first_cached_epoch_matches_recomputing_and_later_epochs_are_cheap(digits_folder, tmp_path):
    cached = fit(Recipe(data=str(digits_folder), epochs=3, out=str(tmp_path / "c"), **TINY), progress=False)
    plain = fit(Recipe(data=str(digits_folder), epochs=3, out=str(tmp_path / "p"), feature_cache=False, **TINY),
                progress=False)
    a, b = _log(cached.run_dir), _log(plain.run_dir)
    # epoch 1: the same images, augmentations and order, so the same losses (float noise from batching aside)
    assert float(a[0]["train_loss"]) == pytest.approx(float(b[0]["train_loss"]), rel=1e-4)
    assert float(a[0]["val_loss"]) == pytest.approx(float(b[0]["val_loss"]), rel=1e-4)
    # epochs 2-3 reuse the features: far more images per second than recomputing the backbone
    for row_cached, row_plain in zip(a[1:], b[1:]):
        assert float(row_cached["train_images_per_s"]) > 5 * float(row_plain["train_images_per_s"])
    assert cached.metrics["top1"] > 0.3
    # the saved model is the whole network, its head trained on the features
    logits = cached.model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)


def _datasets(folder):
    split = scan_folder(folder, val_fraction=0.2, seed=0)
    config = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    return (ImageDataset(split.train, build_transform(config, train=True)),
            ImageDataset(split.val, build_transform(config, train=False)))


def _cache_for(model, train, val, **kw):
    return FeatureCache(model, train, val, seed=0, views=kw.pop("views", 1), batch_size=64,
                        memory_format=torch.contiguous_format, device=torch.device("cpu"), description="t", **kw)


def test_features_are_reused_and_invalidated(digits_folder, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", num_classes=10).eval()
    train, val = _datasets(digits_folder)
    first = _cache_for(model, train, val, views=2)
    f1 = first.train_features(first.view_of(1))
    assert first.view_of(3) == first.view_of(1) and first.view_of(2) != first.view_of(1)
    first.val_features()
    assert first.computed == len(train) + len(val)
    again = _cache_for(model, train, val, views=2)  # same model, weights, transform, data: from disk
    assert torch.equal(again.train_features(1), f1) and again.computed == 0
    # the head only: changing it does not invalidate (it is what trains)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert _cache_for(model, train, val).key == first.key
    with torch.no_grad():  # a backbone weight: new key
        model.conv_stem.weight.mul_(1.01)
    assert _cache_for(model, train, val).key != first.key
    changed = _cache_for(model, train, val).key
    train.transform = build_transform(dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5,) * 3,
                                           std=(0.5,) * 3, crop_pct=1.0), train=True)
    assert _cache_for(model, train, val).key != changed
    changed = _cache_for(model, train, val).key
    os.utime(train.paths[0], ns=(1, 1))  # a data file changed on disk
    assert _cache_for(model, train, val).key != changed


def test_head_only_on_features_equals_the_model():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5, drop_rate=0.3).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(HeadOnly(model).eval()(features), model(x))


def test_reasons_the_cache_is_not_used():
    model = timm.create_model("mobilenetv2_050", num_classes=3)
    ok = dict(freeze_bn=True, mixes=False, distills=False, lora=False)
    assert cache_unusable_reason(model, **ok) is None
    assert "bn=train" in cache_unusable_reason(model, **{**ok, "freeze_bn": False})
    assert "mixup" in cache_unusable_reason(model, **{**ok, "mixes": True})
    assert "LoRA" in cache_unusable_reason(model, **{**ok, "lora": True})
    assert "forward_features" in cache_unusable_reason(torch.nn.Linear(2, 2), **ok)
