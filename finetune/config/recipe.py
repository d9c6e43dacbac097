"""The recipe: one object that YAML files, command-line flags and the Python API all build.

A :class:`Recipe` holds sections (``model``, ``data``, ``augment``, ``optim``, ``strategy``,
``lora``, ``distill``, ``convert``, ``runtime``), each a small dataclass whose fields carry their
help text in ``metadata`` (peft's style), so ``finetune train --help`` is generated from this
file and cannot drift from it. Values are checked in ``__post_init__``; a bad one raises
:class:`~finetune.errors.FinetuneError` naming the dotted key, the value and the fix.

The common keys also have flat short names (``epochs`` → ``optim.epochs``, ``data`` →
``data.root``; table :data:`SHORT_KEYS`), usable as keyword arguments, top-level YAML keys and
``--flags``:

>>> recipe = Recipe(model="mobilenetv2_100", data="photos", epochs=3, lr="3e-4")
>>> recipe.model.name, recipe.data.root, recipe.optim.epochs, recipe.optim.lr
('mobilenetv2_100', 'photos', 3, 0.0003)
>>> Recipe(data="photos", strategy="fulll")
Traceback (most recent call last):
...
finetune.errors.FinetuneError: strategy.name: `fulll` is not valid; did you mean `full`? choose one of auto, probe, full, finetune, gradual
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
from typing import Any, ClassVar, Iterable

import yaml

from finetune.errors import FinetuneError

STRATEGIES = ("auto", "probe", "full", "finetune", "gradual")
TASKS = ("train", "convert")
MIXED_PRECISION = ("no", "bf16", "fp16")
BN_MODES = ("auto", "frozen", "train")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
OBJECTIVES = ("accuracy", "latency")
# Named auto-augment policies → timm's policy strings. TrivialAugment (Müller & Hutter 2021) is one
# random op per image at a uniformly drawn magnitude: timm's RandAugment with n=1 and mstd>100.
AUTO_AUGMENT = {"none": None, "randaugment": "rand-m9-mstd0.5-inc1", "trivialaugment": "rand-n1-m10-mstd101-inc1",
                "augmix": "augmix-m5-w3-d1", "autoaugment": "original"}


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def did_you_mean(value: Any, candidates: Iterable[str]) -> str:
    """``"did you mean `x`? "`` for the closest candidate, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), list(candidates), n=1)
    return f"did you mean `{close[0]}`? " if close else ""


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
        default=None, metadata=_help("image folder: DIR/<class>/* or DIR/train/<class>/* + DIR/val/<class>/*"))
    val_fraction: float = field(default=0.2, metadata=_help("validation share when the folder has no val split"))
    batch_size: int = field(default=32, metadata=_help("images per step per process"))
    num_workers: int | None = field(default=None, metadata=_help("DataLoader workers (default: from CPU count)"))
    class_balanced: bool = field(default=False, metadata=_help("weight the loss by inverse class frequency"))
    check_images: bool = field(default=True,
                               metadata=_help("decode every image once before training, skip broken ones"))

    def check(self) -> None:
        if self.root is not None:
            self.root = os.path.expanduser(self.root)
        if not 0 < self.val_fraction < 1:
            raise FinetuneError(f"data.val_fraction: `{self.val_fraction}` must be greater than 0 and less than 1 "
                                "(e.g. 0.2); training keeps the best epoch by validation accuracy")
        self._at_least("batch_size", 1)
        self._at_least("num_workers", 0)


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

    def check(self) -> None:
        for name in ("epochs", "grad_accum"):
            self._at_least(name, 1)
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
                                                             "when the backbone is frozen (see finetune/features.py)"))
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
    keep_checkpoints: int = field(default=2, metadata=_help("complete checkpoints kept in RUN/checkpoints"))
    resume: str | None = field(default=None, metadata=_help("continue the run in runtime.out from its latest "
                                                            "checkpoint (latest) or from a checkpoint directory"))

    def check(self) -> None:
        self._at_least("seed", 0)
        self._at_least("checkpoint_every", 0)
        self._at_least("keep_checkpoints", 1)
        if self.resume is not None:
            self.resume = os.path.expanduser(self.resume)


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "data": DataConfig, "augment": AugmentConfig, "optim": OptimConfig,
    "strategy": StrategyConfig, "lora": LoraConfig, "distill": DistillConfig, "convert": ConvertConfig,
    "runtime": RuntimeConfig,
}
# A section given as a bare value: `model: mobilenetv2_100`, `data: ~/photos`, `strategy: probe`.
SECTION_SHORTHAND = {"model": "name", "data": "root", "strategy": "name", "lora": "enabled", "distill": "teacher"}
# Flat short names for the common keys (keyword arguments, top-level YAML keys, --flags).
SHORT_KEYS = {
    "data": "data.root", "model": "model.name", "weights": "model.weights", "img_size": "model.img_size",
    "out": "runtime.out", "epochs": "optim.epochs", "strategy": "strategy.name",
    "head_epochs": "strategy.head_epochs", "batch_size": "data.batch_size", "lr": "optim.lr",
    "body_lr_mult": "optim.body_lr_mult", "layer_decay": "optim.layer_decay", "weight_decay": "optim.weight_decay",
    "warmup_epochs": "optim.warmup_epochs", "label_smoothing": "optim.label_smoothing",
    "val_fraction": "data.val_fraction", "seed": "runtime.seed", "mixed_precision": "runtime.mixed_precision",
    "grad_accum": "optim.grad_accum", "num_workers": "data.num_workers", "class_balanced": "data.class_balanced",
    "bn": "strategy.bn", "ema": "strategy.ema", "ema_decay": "strategy.ema_decay",
    "feature_cache": "strategy.feature_cache", "memory_format": "runtime.memory_format",
    "aug_scale": "augment.scale", "auto_augment": "augment.auto_augment", "mixup": "augment.mixup",
    "cutmix": "augment.cutmix", "random_erasing": "augment.random_erasing", "teacher": "distill.teacher",
    "kd_alpha": "distill.alpha", "kd_temperature": "distill.temperature", "kd_beta": "distill.beta",
    "check_images": "data.check_images", "lora": "lora.enabled", "lora_r": "lora.r",
    "checkpoint_every": "runtime.checkpoint_every", "resume": "runtime.resume",
}


@dataclass(init=False)
class Recipe:
    """Everything one run needs. Only ``data.root`` is required, and only to train.

    Sections may be given as section objects, mappings, or (for ``model``, ``data``,
    ``strategy``, ``lora``, ``distill``) a bare value; common keys also by their short name.

    >>> r = Recipe(model="tf_efficientnet_lite0", data="~/photos", epochs=3)
    >>> r.resolved_strategy, r.optim.epochs
    ('finetune', 3)
    >>> Recipe.from_dict({"optim": {"lr": "1e-3"}}, overrides=["data.root=~/x"]).optim.lr
    0.001
    """

    name: str | None
    description: str
    task: str
    model: ModelConfig
    data: DataConfig
    augment: AugmentConfig
    optim: OptimConfig
    strategy: StrategyConfig
    lora: LoraConfig
    distill: DistillConfig
    convert: ConvertConfig
    runtime: RuntimeConfig

    def __init__(self, **values: Any) -> None:
        tree = _to_tree(values)
        self.name = None if tree.get("name") is None else str(tree["name"])
        self.description = str(tree.get("description") or "")
        self.task = str(tree.get("task") or "train")
        if self.task not in TASKS:
            raise FinetuneError(f"task: `{self.task}` is not valid; choose one of {', '.join(TASKS)}")
        for section, cls in SECTIONS.items():
            given = tree.get(section, {})
            if isinstance(given, cls):
                given = dataclasses.asdict(given)
            setattr(self, section, cls(**given))
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        s, o = self.strategy, self.optim
        if s.name in ("finetune", "gradual") and s.head_epochs >= o.epochs:
            raise FinetuneError(
                f"strategy.head_epochs: `{s.head_epochs}` leaves no epoch to fine-tune the body "
                f"(optim.epochs={o.epochs}); lower head_epochs or use strategy probe")
        if self.lora.enabled and s.name not in ("auto", "full"):
            raise FinetuneError(f"strategy.name: `{s.name}` does not combine with lora.enabled (LoRA trains "
                                "adapters + head + BatchNorm from the start); use strategy auto or full")
        if self.lora.enabled and self.optim.layer_decay is not None:
            raise FinetuneError("optim.layer_decay: does not combine with lora.enabled (adapters have no depth "
                                "order); leave layer_decay unset for LoRA")
        if self.augment.mixes and self.data.class_balanced:
            raise FinetuneError("augment.mixup/cutmix: soft targets do not combine with data.class_balanced; "
                                "turn one of them off")
        if self.augment.mixes and self.distill.teacher is not None:
            raise FinetuneError("augment.mixup/cutmix: not supported together with distill.teacher; "
                                "set them to 0 for a distillation run")

    # -- what the training loop asks ---------------------------------------------------------------
    @property
    def resolved_strategy(self) -> str:
        """``auto`` made concrete: ``finetune`` for pretrained weights, ``full`` for random init or a run."""
        if self.lora.enabled:
            return "lora"
        if self.strategy.name != "auto":
            return self.strategy.name
        if self.model.weights == "none" or self.starts_from_run:
            return "full"  # random init, or a trained (e.g. converted) run whose head already fits
        return "finetune"

    @property
    def starts_from_run(self) -> bool:
        """``model.name`` is a run directory (trained or converted) rather than a timm model."""
        return os.path.isfile(os.path.join(os.path.expanduser(self.model.name), "model.json"))

    def require_data(self) -> str:
        """``data.root``, or the one-line error a user needs when it is missing."""
        if not self.data.root:
            raise FinetuneError("data.root: missing; pass the image folder with --data DIR "
                                "(or --set data.root=DIR, or `data: {root: DIR}` in the recipe)")
        return self.data.root

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (what ``recipe.yaml`` in a run directory holds)."""
        head = {"name": self.name, "description": self.description, "task": self.task}
        return {**{k: v for k, v in head.items() if v not in (None, "")},
                **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}}

    def to_yaml(self) -> str:
        """YAML text of :meth:`to_dict`; it loads back with :meth:`from_yaml` to an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: Iterable[str] | dict[str, Any]) -> "Recipe":
        """A copy with dotted overrides applied (``["optim.lr=3e-4"]`` or ``{"optim.lr": 3e-4}``)."""
        return Recipe.from_dict(self.to_dict(), overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: Iterable[str] | dict[str, Any] | None = None) -> "Recipe":
        """Build from a (nested or flat) mapping plus dotted ``key=value`` overrides."""
        if not isinstance(data, dict):
            raise FinetuneError("a recipe must be a mapping of keys to values")
        tree = _to_tree(data)
        for key, value in _parse_overrides(overrides).items():
            _set_dotted(tree, key, value)
        return cls(**tree)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike,
                  overrides: Iterable[str] | dict[str, Any] | None = None) -> "Recipe":
        """Load a YAML recipe (``recipes/*.yaml``, ``RUN_DIR/recipe.yaml``) with optional overrides."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise FinetuneError(f"`{path}` is a folder, not a recipe file; to train on it use --data {path}")
        if not path.is_file():
            raise FinetuneError(f"recipe file `{path}` does not exist; pass a .yaml file such as RUN_DIR/recipe.yaml "
                                "or a name from `finetune recipes`")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise FinetuneError(f"recipe file `{path}` is not a text file; pass a .yaml recipe") from None
        except yaml.YAMLError as exc:
            raise FinetuneError(f"recipe file `{path}` is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise FinetuneError(f"recipe file `{path}` must hold a mapping of keys to values")
        try:
            return cls.from_dict(data, overrides)
        except FinetuneError as exc:
            raise FinetuneError(f"{path.name}: {exc}") from None


# -- helpers ------------------------------------------------------------------------------------
def _valid_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return ["name", "description", "task", *keys]


def _unknown_key(key: str, candidates: Iterable[str]) -> FinetuneError:
    candidates = list(candidates)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close and "." in key:  # `optim.lrr` → `optim.lr`; `lr.x`: compare the last part
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [c.rsplit(".", 1)[-1] for c in candidates], n=1)
        close = [c for c in candidates if c.endswith("." + close[0])][:1] if close else []
    hint = f"did you mean `{close[0]}`? " if close else ""
    section = key.split(".")[0]
    listed = [c for c in candidates if c.startswith(section + ".")]
    if not listed:  # a top-level key: name the sections, not all ~40 short names
        return FinetuneError(f"unknown key `{key}`; {hint}valid top-level keys: name, description, task, "
                             f"{', '.join(SECTIONS)}, or a short name such as epochs, lr, data, model "
                             "(all keys: finetune train --help)")
    return FinetuneError(f"unknown key `{key}`; {hint}valid keys: {', '.join(listed)}")


def _to_tree(values: dict[str, Any]) -> dict[str, Any]:
    """Nested ``{section: {field: value}}`` from nested, shorthand and short-name input."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key in ("name", "description", "task"):
            tree[key] = value
        elif key in SECTIONS:
            cls = SECTIONS[key]
            if isinstance(value, cls):
                value = dataclasses.asdict(value)
            if isinstance(value, dict):
                section = tree.setdefault(key, {})
                fields = {f.name for f in dataclasses.fields(cls)}
                for sub, sub_value in value.items():
                    if sub not in fields:
                        raise _unknown_key(f"{key}.{sub}", [f"{key}.{f}" for f in sorted(fields)])
                    section[sub] = sub_value
            elif key in SECTION_SHORTHAND and not isinstance(value, (list, tuple)):
                tree.setdefault(key, {})[SECTION_SHORTHAND[key]] = value
            else:
                raise FinetuneError(f"{key}: expected a mapping of {key} settings, got `{value}`")
        elif key in SHORT_KEYS:
            _set_dotted(tree, SHORT_KEYS[key], value)
        elif "." in key:
            _set_dotted(tree, key, value)
        else:
            raise _unknown_key(key, ["name", "description", "task", *SECTIONS, *SHORT_KEYS])
    return tree


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    key = SHORT_KEYS.get(key, key)
    if key in ("name", "description", "task"):
        tree[key] = value
        return
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise _unknown_key(key, _valid_keys())
    section, name = parts
    if name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise _unknown_key(key, _valid_keys())
    tree.setdefault(section, {})[name] = value


def _parse_overrides(overrides: Iterable[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["optim.lr=3e-4", "lora.enabled=true"]`` → ``{"optim.lr": "3e-4", "lora.enabled": True}``."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise FinetuneError(f"--set `{item}`: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parsed[key.strip()] = value
    return parsed


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
