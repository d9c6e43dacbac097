"""The ``preprocessing.json`` sidecar of an export: exactly which input the exported graph expects
(decode, resize, centre crop, mean/std, RGB, NCHW float32) and what its outputs mean, so the
model can be used without this package.

>>> pre = describe_preprocessing({"input_size": (3, 96, 96), "interpolation": "bicubic", "crop_pct": 0.875,
...                               "crop_mode": "center", "mean": (0.5,) * 3, "std": (0.5,) * 3})
>>> pre["resize"]["size"], pre["center_crop"]["size"]
(109, [96, 96])
"""

from __future__ import annotations

import importlib
import math
from datetime import datetime
from typing import Any, Callable

import timm
import torch

from finetune.errors import FinetuneError
from finetune.version import __version__

MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
PREPROCESSING_FILE = "preprocessing.json"
SIDECAR_FORMAT = "finetune-vision/export/1"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_PIL_FILTERS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "box": "BOX",
                "hamming": "HAMMING", "lanczos": "LANCZOS"}


def importable(name: str) -> bool:
    """Whether ``name`` imports (an optional export dependency is installed)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _geometry(data_config: dict[str, Any]) -> dict[str, Any]:
    """Resize and crop of timm's eval transform (``transforms_imagenet_eval``) for ``data_config``."""
    _, height, width = (int(v) for v in data_config["input_size"])
    crop_pct = data_config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT
    crop_mode = data_config.get("crop_mode") or "center"
    interpolation = str(data_config["interpolation"])
    if interpolation not in _PIL_FILTERS:
        raise FinetuneError(f"interpolation `{interpolation}` in the run's data_config is not one of "
                            f"{', '.join(_PIL_FILTERS)}; fix data_config in model.json")
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if crop_mode == "squash":
        resize = {"mode": "exact", "size": [scale[0], scale[1]],
                  "rule": "resize to exactly [height, width] = size (aspect ratio not kept)"}
    elif crop_mode == "center" and scale[0] == scale[1]:
        resize = {"mode": "shorter_side", "size": scale[0],
                  "rule": "scale the shorter side to `size` and the longer one to int(size * longer / shorter) "
                          "(truncated), keeping the aspect ratio; skipped when the shorter side already equals size"}
    else:
        raise FinetuneError(f"crop_mode `{crop_mode}` with input size {height}x{width} cannot be described in "
                            f"{PREPROCESSING_FILE} yet; export a run with crop_mode `center` and a square input size")
    resize.update(interpolation=interpolation, pil_filter=f"PIL.Image.Resampling.{_PIL_FILTERS[interpolation]}",
                  antialias=True, library="PIL Image.resize (antialiased when shrinking; OpenCV's cv2.resize "
                                          "is not and gives slightly different pixels)")
    return {"crop_pct": crop_pct, "crop_mode": crop_mode, "resize": resize,
            "center_crop": {"size": [height, width],
                            "rule": "top = round((H - height) / 2), left = round((W - width) / 2) with Python's "
                                    "round (halves to even), H x W the resized image; pad with 0 first if smaller"}}


def describe_preprocessing(data_config: dict[str, Any]) -> dict[str, Any]:
    """The input a model with this (timm) data config expects, as plain JSON-able data.

    Mirrors ``build_transform(data_config, train=False)`` step by step: decode to RGB, resize,
    centre crop, scale to [0, 1], normalise per channel, CHW.

    >>> spec = describe_preprocessing({"input_size": (3, 96, 96), "interpolation": "bicubic",
    ...                                "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875})
    >>> spec["resize"]["size"], spec["center_crop"]["size"], spec["layout"]
    (109, [96, 96], 'NCHW')
    """
    geometry = _geometry(data_config)
    mean = [float(v) for v in data_config["mean"]]
    std = [float(v) for v in data_config["std"]]
    return {
        "input_size": [int(v) for v in data_config["input_size"]],
        "layout": "NCHW",
        "dtype": "float32",
        "channel_order": "RGB",
        "decode": "8-bit RGB with EXIF orientation applied; greyscale replicated to 3 channels; transparency "
                  "composited on white (finetune.data.images.load_rgb)",
        **geometry,
        "scale": {"divide_by": 255.0, "rule": "x = pixel / 255 as float32, giving [0, 1]"},
        "normalize": {"mean": mean, "std": std, "rule": "x[c] = (x[c] - mean[c]) / std[c], channels in RGB order"},
        "interpolation": geometry["resize"]["interpolation"],
        "mean": mean,
        "std": std,
        "note": "`finetune predict` may decode large JPEGs at reduced scale first (PIL draft mode, keeping at least "
                "twice the input side), which changes pixels negligibly",
    }


def sidecar(meta: dict[str, Any], data_config: dict[str, Any], fmt: str, exporter: str, opset: int | None,
             parity: dict[str, Any], transform: Callable) -> dict[str, Any]:
    _, height, width = (int(v) for v in data_config["input_size"])
    classes = list(meta["classes"])
    return {
        "format": SIDECAR_FORMAT,
        "model_file": MODEL_FILES[fmt],
        "model_format": fmt,
        "architecture": meta["architecture"],
        "input": {"name": INPUT_NAME if fmt == "onnx" else None, "shape": ["batch", 3, height, width],
                  "dtype": "float32", "layout": "NCHW", "channel_order": "RGB",
                  "note": "the batch axis is dynamic; height and width are fixed"},
        "output": {"name": OUTPUT_NAME if fmt == "onnx" else None, "shape": ["batch", len(classes)],
                   "dtype": "float32",
                   "meaning": "logits in the order of `classes`; softmax over axis 1 gives probabilities"},
        "classes": classes,
        "preprocessing": describe_preprocessing(data_config),
        "timm_transform": " ".join(repr(transform).split()),
        "export": {"exporter": exporter, "opset": opset, "parity": parity,
                   "versions": {"finetune-vision": __version__, "torch": torch.__version__,
                                "timm": timm.__version__, **_onnx_versions(fmt)},
                   "created": datetime.now().isoformat(timespec="seconds")},
    }


def _onnx_versions(fmt: str) -> dict[str, str]:
    if fmt != "onnx":
        return {}
    versions = {}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        module = importlib.import_module(name) if importable(name) else None
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions
