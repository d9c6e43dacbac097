"""The sections of a recipe: one small dataclass per concern, checked on construction.

Each section (``model``, ``data``, ``augment``, ``optim``, ``strategy``, ``lora``, ``distill``,
``convert``, ``runtime``) carries its help text in the fields' ``metadata`` (peft's style), so
``finetune train --help`` is generated from this file (:func:`field_specs`) and cannot drift from
it. Values from YAML and the command line are coerced to the field's type and checked in
``__post_init__``; a bad one raises :class:`~finetune.errors.FinetuneError` naming the dotted key,
the value and the fix.

>>> OptimConfig(lr="3e-4", epochs="3").lr
0.0003
>>> StrategyConfig(name="fulll")
Traceback (most recent call last):
...
finetune.errors.FinetuneError: strategy.name: `fulll` is not valid; did you mean `full`? choose one of auto, probe, full, finetune, gradual
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from finetune.config.choices import (AUTO_AUGMENT, BN_MODES, CHECK_IMAGES, MEMORY_FORMATS, MIXED_PRECISION, MONITORS, OBJECTIVES, STRATEGIES,
                                    SAMPLERS, TRACKERS, check_images_value)
from finetune.errors import FinetuneError, did_you_mean

__all__ = [
    "SECTIONS",
    "AugmentConfig",
    "ConvertConfig",
    "DataConfig",
    "DistillConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RuntimeConfig",
    "StrategyConfig",
    "base_type",
    "field_specs",
]


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


class _Section:
    """Coercion and checks shared by every section (fields typed, choices enforced)."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.section}.{f.name}"
            value = _coerce(key, getattr(self, f.name), hints[f.name])
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise FinetuneError(f"{key}: `{value}` is not valid; {did_you_mean(value, choices)}"
                                    f"choose one of {', '.join(choices)}")
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Range checks of one section; overridden where there are any."""

    def _at_least(self, name: str, low: float, strict: bool = False) -> None:
        value = getattr(self, name)
        if value is not None and (value <= low if strict else value < low):
            bound = f"greater than {low:g}" if strict else (f"at least {low:g}" if low else "0 or more")
            raise FinetuneError(f"{self.section}.{name}: `{value}` must be {bound}")

    def _within(self, name: str, low: float, high: float, what: str) -> None:
        value = getattr(self, name)
        if value is not None and not low <= value <= high:
            raise FinetuneError(f"{self.section}.{name}: `{value}` must be {what}")


@dataclass
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    name: str = field(default="tf_efficientnet_lite0",
                      metadata=_help("timm model name, or a run directory to continue from (e.g. a converted run)"))
    weights: str = field(
        default="auto",
        metadata=_help("auto | offline | hub | none | PATH to .safetensors/.pth (auto: offline if shipped, else hub)"))
    img_size: int | None = field(default=None, metadata=_help("square input size (default: the model's)"))
    drop_rate: float = field(default=0.0, metadata=_help("dropout before the classifier"))

    def check(self) -> None:
        if self.img_size is not None and not 16 <= self.img_size <= 1024:
            raise FinetuneError(f"model.img_size: `{self.img_size}` is out of range; use 16 to 1024 (e.g. 128 or 224)")
        self._within("drop_rate", 0.0, 0.95, "in [0, 0.95]")


@dataclass
class DataConfig(_Section):
    section: ClassVar[str] = "data"
    root: str | None = field(
        default=None, metadata=_help("image folder: DIR/<class>/* or DIR/train/<class>/* + DIR/val/<class>/*; "
                                     "or WebDataset shards of `finetune shard`: wds:DIR or "
                                     "wds:DIR/train-{000000..000009}.tar"))
    val_root: str | None = field(
        default=None, metadata=_help("validation shards when data.root is WebDataset shards "
                                     "(wds:DIR/val-{000000..000001}.tar; default: the val shards of the index)"))
    labels: str | None = field(
        default=None, metadata=_help("CSV or .jsonl manifest: one row per image with a path (relative to data.root, "
                                     "or absolute) and a label, optionally a split (train/val); instead of class "
                                     "folders"))
    path_column: str = field(default="path", metadata=_help("manifest column of the image paths (default: path, "
                                                            "else filename/file/image...)"))
    label_column: str = field(default="label", metadata=_help("manifest (or hf: data set) column of the labels "
                                                              "(default: label, else class/category... or the "
                                                              "ClassLabel feature)"))
    image_column: str = field(default="image", metadata=_help("image column of a Hugging Face data set (--data "
                                                              "hf:DIR; default: image, else its Image feature)"))
    split_column: str = field(default="split", metadata=_help("manifest column of the split (train/val; other "
                                                              "values left out); none: split like a class folder"))
    val_fraction: float = field(default=0.2, metadata=_help("validation share when the folder has no val split"))
    batch_size: int = field(default=32, metadata=_help("images per step per process"))
    num_workers: int | None = field(default=None, metadata=_help("DataLoader workers (default: from CPU count)"))
    class_balanced: bool = field(default=False, metadata=_help("weight the loss by inverse class frequency"))
    sampler: str = field(default="shuffle", metadata=_help(
        "shuffle: a seeded permutation per epoch; balanced: draw images with replacement ∝ 1/count(class) "
        "(unlike class_balanced, which weights the loss)", choices=SAMPLERS))
    # `str | bool`: the CLI gets `--check-images VALUE`; check() turns true/false spellings back into booleans
    check_images: str | bool = field(
        default=True, metadata=_help("true: decode every image once before training (results cached, a re-run decodes "
                                     "only new or changed files) and skip broken ones; lazy: decode nothing up front, "
                                     "skip what fails to load during training (listed in RUN/skipped.txt at the end); "
                                     "false: decode nothing, skip only missing and empty files"))

    def check(self) -> None:
        if self.root is not None:
            self.root = os.path.expanduser(self.root)
        if self.labels is not None:
            self.labels = os.path.expanduser(self.labels)
            if str(self.root or "").startswith("hf:"):
                raise FinetuneError(f"data.labels: `{self.labels}` cannot be combined with the Hugging Face data set "
                                    f"`{self.root}`, whose labels are its column data.label_column; drop --labels")
        if self.val_root is not None and not str(self.root or "").startswith("wds:"):
            raise FinetuneError("data.val_root (--val-data) is for WebDataset shards (--data wds:...); a folder "
                                "brings its own val/ folder or is split with data.val_fraction")
        for name in ("path_column", "label_column", "split_column", "image_column"):
            if not getattr(self, name).strip():
                raise FinetuneError(f"data.{name}: empty; name a column of the manifest (data.labels)")
        if not 0 < self.val_fraction < 1:
            raise FinetuneError(f"data.val_fraction: `{self.val_fraction}` must be greater than 0 and less than 1 "
                                "(e.g. 0.2); training keeps the best epoch by validation accuracy")
        self._at_least("batch_size", 1)
        self._at_least("num_workers", 0)
        value = check_images_value(self.check_images)
        if value is None:
            raise FinetuneError(f"data.check_images: `{self.check_images}` is not valid; "
                                f"{did_you_mean(str(self.check_images).lower(), CHECK_IMAGES)}choose one of "
                                f"{', '.join(CHECK_IMAGES)}")
        self.check_images = value


@dataclass
class AugmentConfig(_Section):
    section: ClassVar[str] = "augment"
    scale: float = field(default=0.5, metadata=_help("smallest RandomResizedCrop area fraction (1 = no crop aug)"))
    hflip: float = field(default=0.5, metadata=_help("horizontal flip probability"))
    auto_augment: str = field(
        default="none",
        metadata=_help(f"{' | '.join(AUTO_AUGMENT)} or a timm policy string such as rand-m7-mstd0.5"))
    random_erasing: float = field(default=0.0, metadata=_help("random-erasing probability (timm RandomErasing)"))
    mixup: float = field(default=0.0, metadata=_help("mixup alpha (0 = off; timm Mixup)"))
    cutmix: float = field(default=0.0, metadata=_help("cutmix alpha (0 = off; timm Mixup)"))

    def check(self) -> None:
        self._within("scale", 1e-3, 1.0, "in (0, 1]")
        for name in ("hflip", "random_erasing"):
            self._within(name, 0.0, 1.0, "a probability in [0, 1]")
        for name in ("mixup", "cutmix"):
            self._at_least(name, 0.0)
        policy = self.auto_augment
        if policy not in AUTO_AUGMENT and not policy.startswith(("rand-", "augmix", "original", "v0")):
            raise FinetuneError(f"augment.auto_augment: `{policy}` is not valid; {did_you_mean(policy, AUTO_AUGMENT)}"
                                f"choose one of {', '.join(AUTO_AUGMENT)} or a timm policy string (rand-m9-mstd0.5)")

    @property
    def timm_auto_augment(self) -> str | None:
        """The policy as timm's ``create_transform(auto_augment=…)`` takes it."""
        return AUTO_AUGMENT.get(self.auto_augment, self.auto_augment)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class OptimConfig(_Section):
    section: ClassVar[str] = "optim"
    epochs: int = field(default=5, metadata=_help("total epochs, head-only epochs included"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate of the head (AdamW)"))
    body_lr_mult: float = field(default=0.3, metadata=_help("body LR = lr × this once unfrozen"))
    layer_decay: float | None = field(
        default=None, metadata=_help("layer-wise LR decay: each block deeper from the head gets LR × this "
                                     "(e.g. 0.75; timm's param_groups_layer_decay); none = off"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (not applied to biases and norms)"))
    warmup_epochs: float = field(default=0.3, metadata=_help("linear warmup length per phase, in epochs"))
    label_smoothing: float = field(default=0.1, metadata=_help("cross-entropy label smoothing"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    monitor: str = field(default="val_top1", metadata=_help(
        "validation metric that picks the best epoch (model.safetensors) and drives early stopping",
        choices=MONITORS))
    patience: int = field(default=0, metadata=_help("stop after this many epochs without improvement of "
                                                    "optim.monitor (0: never stop early)"))
    min_delta: float = field(default=0.0, metadata=_help("smallest change of optim.monitor that counts as an "
                                                         "improvement for early stopping"))

    def check(self) -> None:
        for name in ("epochs", "grad_accum"):
            self._at_least(name, 1)
        self._at_least("patience", 0)
        self._at_least("min_delta", 0.0)
        for name in ("lr", "body_lr_mult"):
            self._at_least(name, 0.0, strict=True)
        for name in ("warmup_epochs", "weight_decay"):
            self._at_least(name, 0.0)
        self._within("label_smoothing", 0.0, 0.999, "in [0, 1)")
        self._within("layer_decay", 1e-6, 1.0, "in (0, 1] (e.g. 0.75), or none")


@dataclass
class StrategyConfig(_Section):
    section: ClassVar[str] = "strategy"
    name: str = field(
        default="auto",
        metadata=_help("probe: train the head only; full: train everything; finetune: head first, then everything "
                       "with a lower body LR; gradual: head first, then unfreeze stage by stage from the top; "
                       "auto: finetune for pretrained weights, full for random init", choices=STRATEGIES))
    head_epochs: int = field(default=1, metadata=_help("head-only epochs before unfreezing (finetune, gradual)"))
    bn: str = field(
        default="auto",
        metadata=_help("BatchNorm statistics: frozen keeps the pretrained running stats (best on small data), "
                       "train updates them; auto = frozen for pretrained weights, train for random init",
                       choices=BN_MODES))
    ema: bool = field(default=False, metadata=_help("keep an EMA of the weights (timm ModelEmaV3); validate and "
                                                    "save the EMA weights"))
    ema_decay: float = field(default=0.998, metadata=_help("EMA decay per optimizer update (with warmup)"))
    feature_cache: bool = field(default=True, metadata=_help("head-only epochs train on cached backbone features "
                                                             "when the backbone is frozen "
                                                             "(see finetune/train/features.py)"))
    cache_views: int = field(default=1, metadata=_help("augmented views per image in the feature cache; head "
                                                       "epochs cycle through them"))

    def check(self) -> None:
        self._at_least("head_epochs", 0)
        self._at_least("cache_views", 1)
        self._within("ema_decay", 0.0, 0.999999, "in [0, 1)")


@dataclass
class LoraConfig(_Section):
    section: ClassVar[str] = "lora"
    enabled: bool = field(default=False, metadata=_help("train LoRA adapters (peft) instead of the whole body"))
    r: int = field(default=8, metadata=_help("LoRA rank"))
    alpha: float | None = field(default=None, metadata=_help("LoRA scaling alpha (default: r)"))
    dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA branch"))
    targets: str = field(default="auto", metadata=_help("auto (pointwise/expand 1×1 convs and linear layers, never "
                                                        "depthwise) or comma-separated module-name regexes"))

    def check(self) -> None:
        self._at_least("r", 1)
        self._at_least("alpha", 0.0, strict=True)
        self._within("dropout", 0.0, 0.99, "in [0, 1)")


@dataclass
class DistillConfig(_Section):
    section: ClassVar[str] = "distill"
    teacher: str | None = field(
        default=None, metadata=_help("run directory of a teacher to distill from (e.g. the run a student was "
                                     "converted from); the loss becomes KD + feature matching + CE"))
    alpha: float = field(default=0.5, metadata=_help("weight of the KD term (CE gets 1 - this)"))
    temperature: float = field(default=2.0, metadata=_help("softmax temperature T (KD × T²)"))
    beta: float = field(default=1.0, metadata=_help("weight of the per-converted-layer feature MSE (0 = off)"))

    def check(self) -> None:
        if self.teacher is not None:
            self.teacher = os.path.expanduser(self.teacher)
        self._within("alpha", 0.0, 1.0, "between 0 and 1")
        self._at_least("temperature", 0.0, strict=True)
        self._at_least("beta", 0.0)


@dataclass
class ConvertConfig(_Section):
    """For ``task: convert``: train a dense teacher, convert it to separable convs, distill."""

    section: ClassVar[str] = "convert"
    teacher_epochs: int = field(default=5, metadata=_help("epochs to train the dense teacher (when model.name "
                                                          "is a timm name, not a trained run)"))
    rank: str | None = field(default=None, metadata=_help("separable rank per layer: an integer or full"))
    energy: float | None = field(default=None, metadata=_help("keep this share of singular-value energy per layer"))
    macs: float | None = field(default=0.4, metadata=_help("global MACs budget as a fraction of the original"))
    objective: str = field(default="accuracy", metadata=_help("accuracy | latency", choices=OBJECTIVES))
    calib_images: int = field(default=256, metadata=_help("images for the pointwise refit and BN re-estimation"))

    def check(self) -> None:
        self._at_least("teacher_epochs", 1)
        self._within("energy", 1e-6, 1.0, "in (0, 1]")
        self._within("macs", 1e-6, 1.0, "in (0, 1]")
        self._at_least("calib_images", 0)
        if self.rank not in (None, "full") and not str(self.rank).isdigit():
            raise FinetuneError(f"convert.rank: `{self.rank}` must be a positive integer or full")


@dataclass
class RuntimeConfig(_Section):
    section: ClassVar[str] = "runtime"
    out: str | None = field(default=None, metadata=_help("run directory (default runs/<model>-<time>)"))
    seed: int = field(default=0, metadata=_help("random seed (split, init, shuffling)"))
    mixed_precision: str = field(default="no", metadata=_help("no | bf16 | fp16", choices=MIXED_PRECISION))
    memory_format: str = field(
        default="auto", metadata=_help("auto | channels_last | contiguous (auto: time a few steps of each, keep the "
                                       "faster)", choices=MEMORY_FORMATS))
    checkpoint_every: int = field(default=0, metadata=_help("also checkpoint every N optimizer updates "
                                                            "(0: at epoch ends only)"))
    keep_checkpoints: int = field(default=2, metadata=_help("newest complete checkpoints kept in RUN/checkpoints"))
    keep_best_checkpoint: bool = field(default=False, metadata=_help("also keep the checkpoint of the best epoch "
                                                                     "(besides the newest keep_checkpoints)"))
    resume: str | None = field(default=None, metadata=_help("continue the run in runtime.out from its latest "
                                                            "checkpoint (latest) or from a checkpoint directory"))
    report_to: str = field(default="none", metadata=_help(
        "experiment trackers through accelerate, comma-separated: " + ", ".join(TRACKERS) + "; all (every one "
        "installed) or none; their logs go in the run directory"))

    def check(self) -> None:
        self._at_least("seed", 0)
        self._at_least("checkpoint_every", 0)
        self._at_least("keep_checkpoints", 1)
        if self.resume is not None:
            self.resume = os.path.expanduser(self.resume)
        self.report_to = _tracker_names(self.report_to)


def _tracker_names(value: str) -> str:
    """``runtime.report_to`` normalised: ``none``, ``all`` or known tracker names joined by commas.

    >>> _tracker_names(" TensorBoard, mlflow,tensorboard")
    'tensorboard,mlflow'
    >>> _tracker_names("tensorbord")
    Traceback (most recent call last):
    ...
    finetune.errors.FinetuneError: runtime.report_to: `tensorbord` is not a tracker; did you mean `tensorboard`? choose from tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio, all or none
    """
    names = list(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    if not names or names == ["none"]:
        return "none"
    known = (*TRACKERS, "all", "none")
    for name in names:
        if name not in known:
            raise FinetuneError(f"runtime.report_to: `{name}` is not a tracker; {did_you_mean(name, known)}"
                                f"choose from {', '.join(TRACKERS)}, all or none")
    if len(names) > 1 and ("none" in names or "all" in names):
        raise FinetuneError(f"runtime.report_to: `{value}` mixes all/none with other names; give all or none "
                            "alone, or a list of trackers")
    return ",".join(names)


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "data": DataConfig, "augment": AugmentConfig, "optim": OptimConfig,
    "strategy": StrategyConfig, "lora": LoraConfig, "distill": DistillConfig, "convert": ConvertConfig,
    "runtime": RuntimeConfig,
}


def base_type(hint: Any) -> type:
    """``int | None`` → ``int``; ``str`` → ``str``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def field_specs() -> dict[str, dict[str, Any]]:
    """Dotted key → type, default and help of every recipe field (for flags and docs)."""
    specs = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            specs[f"{section}.{f.name}"] = {"type": hints[f.name], "default": f.default, **f.metadata}
    return specs


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert strings from YAML/CLI into the field's type; reject what cannot be converted."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise FinetuneError(f"{name}: a value is required")
    kind = base_type(hint)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise FinetuneError(f"{name}: `{value}` is not a boolean; use true or false")
    if kind in (int, float):
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise FinetuneError(f"{name}: `{value}` is not a number")
        try:
            number = float(value)  # accepts "1e-3", which YAML 1.1 leaves as a string
        except (TypeError, ValueError):
            raise FinetuneError(f"{name}: `{value}` is not a number; write e.g. "
                                f"{'0.001' if kind is float else '3'}") from None
        if not math.isfinite(number):
            raise FinetuneError(f"{name}: `{value}` must be a finite number")
        if kind is int:
            if number != int(number):
                raise FinetuneError(f"{name}: `{value}` must be a whole number")
            return int(number)
        return number
    if kind is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted `no` / `yes` as a boolean
            return "yes" if value else "no"
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        if isinstance(value, dict):
            raise FinetuneError(f"{name}: expected a single value, got a mapping `{value}`")
        return str(value)
    return value
