"""Build timm models with the right weights (:mod:`finetune.models.weights`) and data config.

Run directories (trained, converted or saved models) are loaded by :func:`finetune.rundir.load_model`,
which calls :func:`create_model` for a timm name.

>>> model, data_config = create_model("tf_efficientnet_lite0", weights="offline", num_classes=10)
>>> data_config["mean"], model.num_classes
((0.5, 0.5, 0.5), 10)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import timm
import torch

from finetune.errors import FinetuneError, one_line
from finetune.models.weights import check_model_name, resolve_weights

#: The families this toolkit is built and tested for (any timm CNN loads, though).
FAMILY_PATTERNS = ("mobilenet*", "efficientnet*", "tf_efficientnet*")


def family_models() -> list[str]:
    """All timm names in the MobileNet / EfficientNet families.

    >>> "mobilenetv2_100" in family_models()
    True
    """
    return sorted(set(timm.list_models(list(FAMILY_PATTERNS))))


def resolve_data_config(model: torch.nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's data config for ``model`` (mean, std, input size, interpolation, crop_pct)."""
    config = timm.data.resolve_data_config({}, model=model)
    if img_size is not None:
        config["input_size"] = (3, int(img_size), int(img_size))
    return dict(config)


def create_model(
    name: str,
    weights: str | os.PathLike = "auto",
    num_classes: int | None = None,
    img_size: int | None = None,
    **timm_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Create a timm model with weights from the hub, a local file, the offline packages or nothing.

    Args:
        name: a timm model name (run directories: :func:`finetune.rundir.load_model`).
        weights: ``auto`` (offline if shipped, else hub), ``offline``, ``hub``, ``none`` or a path
            to a ``.safetensors`` / ``.pth`` file.
        num_classes: size of a new classification head; ``None`` keeps the pretrained head
            (1000 ImageNet classes), as does ``1000``.
        img_size: input size for the returned data config (the model itself accepts any size).
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        ``(model, data_config)``; the model is in eval mode on the CPU.

    >>> model, cfg = create_model("mobilenetv2_100", weights="none", num_classes=3)
    >>> cfg["input_size"], model.num_classes
    ((3, 224, 224), 3)
    """
    check_model_name(name)
    plan = resolve_weights(name, weights)
    kwargs = dict(plan.create_kwargs())
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    kwargs.update(timm_kwargs)
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as error:  # noqa: BLE001 -- a repository or folder timm cannot read: one line
        if plan.source not in ("hf-hub", "local-dir"):
            raise
        raise FinetuneError(f"could not load `{name}` ({type(error).__name__}: {one_line(error, 160)}); check the "
                            "name, the network (hf-hub:) or the folder's config.json and weights") from None
    # a new head when the class count differs from the weights' (1000 for ImageNet; a model folder's own)
    if num_classes is not None and plan.pretrained and model.num_classes != model.pretrained_cfg.get("num_classes",
                                                                                                    1000):
        _init_fresh_head(model)
    model.eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "weights_source": plan.description}
    return model, resolve_data_config(model, img_size)


def _init_fresh_head(model: torch.nn.Module) -> None:
    """Small-normal init for a new head on pretrained features.

    timm's EfficientNet/MobileNet init draws the classifier from U(±1/sqrt(num_classes)): with 10
    classes and 1280 pooled features that gives initial logits of magnitude ~10 and a first loss
    of ~15, which wrecks the first fine-tuning steps. std=0.01 (as in MAE/DeiT fine-tuning)
    starts at the uniform prediction.
    """
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)



#: Preprocessing :func:`finetune.rundir.save_run` records for a model that is not a timm model (timm models use
#: their own ``pretrained_cfg``): ImageNet mean/std, 224 px, bilinear resize of the whole image.
DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224), "interpolation": "bilinear", "mean": timm.data.IMAGENET_DEFAULT_MEAN,
    "std": timm.data.IMAGENET_DEFAULT_STD, "crop_pct": 1.0, "crop_mode": "center",
}


def default_data_config(model: torch.nn.Module | None = None, input_size: int | Sequence[int] | None = None,
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The data config to record for ``model``: timm's for a timm model, else :data:`DEFAULT_DATA_CONFIG`;
    then ``overrides`` (any of its keys) and ``input_size`` (an int, or ``(3, H, W)``).

    >>> cfg = default_data_config(torch.nn.Conv2d(3, 8, 3), input_size=64, overrides={"mean": (0.5,) * 3})
    >>> cfg["input_size"], cfg["mean"], cfg["crop_pct"]
    ((3, 64, 64), (0.5, 0.5, 0.5), 1.0)
    """
    if isinstance(getattr(model, "pretrained_cfg", None), dict) and model.pretrained_cfg.get("architecture"):
        config = dict(timm.data.resolve_data_config({}, model=model))
    else:
        config = dict(DEFAULT_DATA_CONFIG)
    config.update(dict(overrides or {}))
    if input_size is not None:
        config["input_size"] = input_size
    size = config["input_size"]
    if isinstance(size, int) and not isinstance(size, bool):
        size = (3, size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise FinetuneError(f"input_size `{config['input_size']}` must be a pixel count (e.g. 224) or (3, H, W)")
    config["input_size"] = tuple(size)
    for key in ("mean", "std"):
        value = config.get(key)
        if not isinstance(value, (tuple, list)) or len(value) != size[0]:
            raise FinetuneError(f"data_config {key} `{value}` must hold one number per channel ({size[0]})")
        config[key] = tuple(float(v) for v in value)
    return config
