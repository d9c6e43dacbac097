"""Training configuration: one dataclass that the CLI flags, YAML files and the Python API share.

Every field carries its help text in ``metadata`` (peft's style), so ``finetune train --help``
is generated from this file and cannot drift from it. Values are checked in ``__post_init__``;
a bad one raises :class:`~finetune.errors.FinetuneError` naming the key, the value and the
valid choices.

>>> cfg = TrainConfig(data="photos", epochs=3, lr="3e-4")   # YAML may hand us "3e-4" as a string
>>> cfg.lr
0.0003
>>> TrainConfig(data="photos", strategy="freeze")
Traceback (most recent call last):
...
finetune.errors.FinetuneError: strategy: `freeze` is not valid; choose one of auto, probe, full, finetune
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import FinetuneError

STRATEGIES = ("auto", "probe", "full", "finetune")
MIXED_PRECISION = ("no", "bf16", "fp16")
BN_MODES = ("auto", "frozen", "train")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Everything one fine-tuning run needs. Only ``data`` is required.

    >>> TrainConfig(data="~/photos", model="mobilenetv2_100", epochs=2).resolved_strategy
    'finetune'
    """

    data: str = field(metadata=_help("image folder: DIR/<class>/* or DIR/train/<class>/* + DIR/val/<class>/*"))
    model: str = field(default="tf_efficientnet_lite0",
                       metadata=_help("timm model name, or a run directory to continue from (e.g. a converted run)"))
    weights: str = field(
        default="auto",
        metadata=_help("auto | offline | hub | none | PATH to .safetensors/.pth (auto: offline if shipped, else hub)"),
    )
    out: str | None = field(default=None, metadata=_help("run directory (default runs/<model>-<time>)"))
    epochs: int = field(default=5, metadata=_help("total epochs, head-only epochs included"))
    strategy: str = field(
        default="auto",
        metadata=_help("probe: train the head only; full: train everything; "
                       "finetune: head first, then everything with a lower body LR; "
                       "auto: finetune for pretrained weights, full for random init", choices=STRATEGIES),
    )
    head_epochs: int = field(default=1, metadata=_help("head-only epochs before unfreezing (strategy finetune)"))
    batch_size: int = field(default=32, metadata=_help("images per step per process"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate of the head (AdamW)"))
    body_lr_mult: float = field(default=0.3, metadata=_help("body LR = lr × this once unfrozen (strategy finetune)"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (not applied to biases and norms)"))
    warmup_epochs: float = field(default=0.3, metadata=_help("linear warmup length per phase, in epochs"))
    label_smoothing: float = field(default=0.1, metadata=_help("cross-entropy label smoothing"))
    img_size: int | None = field(default=None, metadata=_help("square input size (default: the model's)"))
    val_fraction: float = field(default=0.2, metadata=_help("validation share when the folder has no val split"))
    seed: int = field(default=0, metadata=_help("random seed (split, init, shuffling)"))
    mixed_precision: str = field(default="no", metadata=_help("no | bf16 | fp16", choices=MIXED_PRECISION))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    num_workers: int | None = field(default=None, metadata=_help("DataLoader workers (default: from CPU count)"))
    class_balanced: bool = field(default=False, metadata=_help("weight the loss by inverse class frequency"))
    bn: str = field(
        default="auto",
        metadata=_help("BatchNorm statistics: frozen keeps the pretrained running stats (best on small data), "
                       "train updates them; auto = frozen for pretrained weights, train for random init",
                       choices=BN_MODES),
    )
    memory_format: str = field(
        default="auto", metadata=_help("auto | channels_last | contiguous (auto: time a few steps of each, keep the faster)",
                                       choices=MEMORY_FORMATS)
    )
    aug_scale: float = field(default=0.5, metadata=_help("smallest RandomResizedCrop area fraction (1 = no crop aug)"))
    teacher: str | None = field(
        default=None, metadata=_help("run directory of a teacher to distill from (e.g. the run a student was "
                                     "converted from); the loss becomes KD + feature matching + CE"))
    kd_alpha: float = field(default=0.5, metadata=_help("distillation: weight of the KD term (CE gets 1 - this)"))
    kd_temperature: float = field(default=2.0, metadata=_help("distillation: softmax temperature T (KD × T²)"))
    kd_beta: float = field(default=1.0, metadata=_help("distillation: weight of the per-converted-layer feature "
                                                        "MSE (0 turns it off)"))
    check_images: bool = field(default=True, metadata=_help("decode every image once before training, skip broken ones"))

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise FinetuneError(f"{f.name}: `{value}` is not valid; choose one of {', '.join(choices)}")
        self.data = os.path.expanduser(str(self.data))
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name}: `{getattr(self, name)}` must be at least 1")
        for name in ("lr", "body_lr_mult"):
            if not getattr(self, name) > 0:
                raise FinetuneError(f"{name}: `{getattr(self, name)}` must be greater than 0")
        if not 0 <= self.head_epochs:
            raise FinetuneError(f"head_epochs: `{self.head_epochs}` must be 0 or more")
        if self.strategy == "finetune" and self.head_epochs >= self.epochs:
            raise FinetuneError(
                f"head_epochs: `{self.head_epochs}` leaves no epoch to fine-tune the body "
                f"(epochs={self.epochs}); lower head_epochs or use strategy probe"
            )
        if not 0 < self.val_fraction < 1:
            raise FinetuneError(f"val_fraction: `{self.val_fraction}` must be greater than 0 and less than 1 "
                                "(e.g. 0.2); training keeps the best epoch by validation accuracy")
        for name in ("seed", "num_workers"):
            if (getattr(self, name) or 0) < 0:
                raise FinetuneError(f"{name}: `{getattr(self, name)}` must be 0 or more")
        if not 0 <= self.label_smoothing < 1:
            raise FinetuneError(f"label_smoothing: `{self.label_smoothing}` must be in [0, 1)")
        if not 0 <= self.kd_alpha <= 1:
            raise FinetuneError(f"kd_alpha: `{self.kd_alpha}` must be between 0 and 1")
        if self.kd_temperature <= 0 or self.kd_beta < 0:
            raise FinetuneError("kd_temperature must be > 0 and kd_beta >= 0 "
                                f"(got `{self.kd_temperature}`, `{self.kd_beta}`)")
        if self.teacher is not None:
            self.teacher = os.path.expanduser(self.teacher)
        if not 0 < self.aug_scale <= 1:
            raise FinetuneError(f"aug_scale: `{self.aug_scale}` must be in (0, 1]")
        if self.img_size is not None and not 16 <= self.img_size <= 1024:
            raise FinetuneError(f"img_size: `{self.img_size}` is out of range; use 16 to 1024 (e.g. 128 or 224)")
        for name in ("warmup_epochs", "weight_decay"):
            if getattr(self, name) < 0:
                raise FinetuneError(f"{name}: `{getattr(self, name)}` must be 0 or more")

    @property
    def resolved_strategy(self) -> str:
        """``auto`` made concrete: ``finetune`` for pretrained weights, ``full`` for random init or a run."""
        if self.strategy != "auto":
            return self.strategy
        if self.weights == "none" or self.starts_from_run:
            return "full"  # random init, or a trained (e.g. converted) run whose head already fits
        return "finetune"

    @property
    def starts_from_run(self) -> bool:
        """``model`` names a run directory (trained or converted) rather than a timm model."""
        return os.path.isfile(os.path.join(os.path.expanduser(self.model), "model.json"))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (what ``recipe.yaml`` in a run directory holds)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """YAML text of :meth:`to_dict`; floats are written so that YAML reads them back as floats."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Build from a mapping; unknown keys are an error that lists the valid ones."""
        merged = {**data, **(overrides or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise FinetuneError(f"unknown key `{unknown[0]}`; {hint}valid keys: {', '.join(sorted(known))}")
        if "data" not in merged or merged["data"] in (None, ""):
            raise FinetuneError("`data` is required: the image folder to train on (--data DIR)")
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Load a YAML file written by :meth:`to_yaml` (e.g. ``runs/x/recipe.yaml``)."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise FinetuneError(f"`{path}` is a folder, not a recipe file; to train on it use --data {path}")
        if not path.is_file():
            raise FinetuneError(f"recipe file `{path}` does not exist; pass a .yaml file such as RUN_DIR/recipe.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise FinetuneError(f"recipe file `{path}` is not a text file; pass a .yaml recipe") from None
        except yaml.YAMLError as exc:
            raise FinetuneError(f"recipe file `{path}` is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise FinetuneError(f"recipe file `{path}` must hold a mapping of keys to values")
        return cls.from_dict(data, overrides)


def field_help() -> dict[str, dict[str, Any]]:
    """Field name → (type hint, default, metadata), for building command-line flags."""
    hints = typing.get_type_hints(TrainConfig)
    return {
        f.name: {"type": hints[f.name], "default": f.default, **f.metadata}
        for f in dataclasses.fields(TrainConfig)
    }


def base_type(hint: Any) -> type:
    """``int | None`` → ``int``; ``str`` → ``str``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert strings from YAML/CLI into the field's type; reject what cannot be converted."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
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
        if isinstance(value, bool):
            raise FinetuneError(f"{name}: `{value}` is not a number")
        try:
            number = float(value)  # accepts "1e-3", which YAML 1.1 leaves as a string
        except (TypeError, ValueError):
            raise FinetuneError(f"{name}: `{value}` is not a number") from None
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
        return str(value)
    return value
