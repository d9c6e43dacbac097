"""The recipe: one object that YAML files, command-line flags and the Python API all build.

A :class:`Recipe` holds the sections of :mod:`finetune.config.sections` (``model``, ``data``,
``augment``, ``optim``, ``strategy``, ``lora``, ``distill``, ``convert``, ``runtime``), each checked
on construction, plus the checks across sections. It is built from keyword arguments, nested or
flat mappings (:meth:`Recipe.from_dict`) and YAML files (:meth:`Recipe.from_yaml`), with dotted
``KEY=VALUE`` overrides, and written back with :meth:`Recipe.to_yaml`.

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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from finetune.config.choices import TASKS
from finetune.config.sections import (SECTIONS, AugmentConfig, ConvertConfig, DataConfig, DistillConfig, LoraConfig,
                                      ModelConfig, OptimConfig, RuntimeConfig, StrategyConfig)
from finetune.errors import FinetuneError, close_matches, did_you_mean

__all__ = ["SECTION_SHORTHAND", "SHORT_KEYS", "Recipe"]

# A section given as a bare value: `model: mobilenetv2_100`, `data: ~/photos`, `strategy: probe`.
SECTION_SHORTHAND = {"model": "name", "data": "root", "strategy": "name", "lora": "enabled", "distill": "teacher"}
# Flat short names for the common keys (keyword arguments, top-level YAML keys, --flags).
SHORT_KEYS = {
    "data": "data.root", "val_data": "data.val_root", "model": "model.name", "weights": "model.weights",
    "img_size": "model.img_size",
    "out": "runtime.out", "epochs": "optim.epochs", "strategy": "strategy.name",
    "head_epochs": "strategy.head_epochs", "batch_size": "data.batch_size", "lr": "optim.lr",
    "body_lr_mult": "optim.body_lr_mult", "layer_decay": "optim.layer_decay", "weight_decay": "optim.weight_decay",
    "warmup_epochs": "optim.warmup_epochs", "label_smoothing": "optim.label_smoothing",
    "val_fraction": "data.val_fraction", "seed": "runtime.seed", "mixed_precision": "runtime.mixed_precision",
    "grad_accum": "optim.grad_accum", "num_workers": "data.num_workers", "class_balanced": "data.class_balanced",
    "sampler": "data.sampler",
    "bn": "strategy.bn", "ema": "strategy.ema", "ema_decay": "strategy.ema_decay",
    "feature_cache": "strategy.feature_cache", "memory_format": "runtime.memory_format",
    "aug_scale": "augment.scale", "auto_augment": "augment.auto_augment", "mixup": "augment.mixup",
    "cutmix": "augment.cutmix", "random_erasing": "augment.random_erasing", "teacher": "distill.teacher",
    "kd_alpha": "distill.alpha", "kd_temperature": "distill.temperature", "kd_beta": "distill.beta",
    "check_images": "data.check_images", "lora": "lora.enabled", "lora_r": "lora.r",
    "checkpoint_every": "runtime.checkpoint_every", "resume": "runtime.resume",
    "report_to": "runtime.report_to", "monitor": "optim.monitor", "patience": "optim.patience",
    "min_delta": "optim.min_delta", "keep_checkpoints": "runtime.keep_checkpoints", "labels": "data.labels",
    "image_column": "data.image_column", "label_column": "data.label_column",
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
        """``model.name`` names an existing directory: a run (trained or converted) to start from, not a timm model.

        Only the directory's existence is checked here; what a run directory holds, and the error for a
        folder that is not one, are :mod:`finetune.rundir`'s (``read_run_meta``), which sits above this package.
        """
        return os.path.isdir(os.path.expanduser(self.model.name))

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
    hint = did_you_mean(key, candidates)
    if not hint and "." in key:  # `optim.lrr` → `optim.lr`; `lr.x`: compare the last part
        tail = close_matches(key.rsplit(".", 1)[-1], [c.rsplit(".", 1)[-1] for c in candidates])
        dotted = [c for c in candidates if c.endswith("." + tail[0])][:1] if tail else []
        hint = did_you_mean(dotted[0], dotted) if dotted else ""  # the dotted key, in the shared wording
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
