"""What a run is built from, the same way for :func:`~finetune.train.trainer.fit` and
:func:`~finetune.train.lr_find.lr_find`: the model (LoRA applied), the BatchNorm decision, the
phases, the loss (mixup), the loaders, the distiller and its teacher view, the EMA and the
frozen-feature-cache decision. Nothing here knows about processes, checkpoints or the run
directory.

>>> from finetune.config import Recipe
>>> freezes_bn(Recipe(data="."), pretrained=True), freezes_bn(Recipe(data=".", bn="train"), pretrained=True)
(True, False)
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import Recipe
from finetune.data import (FolderSplit, ImageDataset, Sample, build_transform, class_weights, draft_size,
                           eval_loader)
from finetune.data.sampling import SeededAugmentation, epoch_sampler
from finetune.distill import DistillationLoss, feature_layers_from_plan
from finetune.errors import FinetuneError
from finetune.rundir import load_model, read_run_meta
from finetune.train.features import cache_unusable_reason
from finetune.train.loop import LossFn
from finetune.train.optim import Phase, body_stage_ids, plan_phases
from finetune.train.outputs import check_same_classes


@dataclass
class BuiltModel:
    """The model to train (LoRA applied), its data config, and how BatchNorm is treated."""

    model: nn.Module
    data_config: dict[str, Any]
    pretrained: bool  # starts from trained weights (timm's, or a run's)
    freeze_bn: bool


def default_num_workers() -> int:
    """DataLoader workers: none on a 2-core machine (they would steal compute), more on big hosts."""
    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        return min(8, max(1, cores - 1))
    return min(4, max(0, cores // 2 - 1))


def source_run_meta(recipe: Recipe) -> dict[str, Any] | None:
    """``model.json`` of the run the recipe continues (``model.name`` is a run directory), else ``None``."""
    return read_run_meta(recipe.model.name) if recipe.starts_from_run else None


def freezes_bn(recipe: Recipe, pretrained: bool) -> bool:
    """Whether BatchNorm running statistics stay as loaded: ``bn: frozen``, or ``auto`` on trained weights."""
    return recipe.strategy.bn == "frozen" or (recipe.strategy.bn == "auto" and pretrained)


def load_start_model(recipe: Recipe, split: FolderSplit, source_meta: dict | None,
                     unlabelled: bool) -> tuple[nn.Module, dict, bool]:
    """The model to train before LoRA, its data config, and whether it starts from trained weights."""
    if source_meta is not None:
        model, data_config = load_model(recipe.model.name, img_size=recipe.model.img_size)
        if not unlabelled:
            check_same_classes(recipe.model.name, source_meta["classes"], split.classes)
        return model, data_config, True
    extra = {"drop_rate": recipe.model.drop_rate} if recipe.model.drop_rate else {}
    model, data_config = load_model(recipe.model.name, weights=recipe.model.weights, num_classes=len(split.classes),
                                    img_size=recipe.model.img_size, **extra)
    return model, data_config, recipe.model.weights != "none"


def build_model(recipe: Recipe, split: FolderSplit, source_meta: dict | None, unlabelled: bool,
                log: Callable[[str], None] | None = None) -> BuiltModel:
    """The model as the recipe trains it: loaded, then wrapped in LoRA adapters when ``lora.enabled``.

    ``log`` (e.g. ``accelerator.print``) receives one line on the model and one on LoRA.
    """
    model, data_config, pretrained = load_start_model(recipe, split, source_meta, unlabelled)
    freeze_bn = freezes_bn(recipe, pretrained)
    if log is not None:
        log(f"model {recipe.model.name}: {model.pretrained_cfg.get('weights_source')}; "
            f"input {data_config['input_size'][-1]} px; BatchNorm statistics {'frozen' if freeze_bn else 'trained'}")
    if recipe.lora.enabled:
        # imported for LoRA runs only: peft adds seconds to every start
        from finetune.adapters import apply_lora, describe_trainable

        model = apply_lora(model, r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                           targets=recipe.lora.targets)
        if log is not None:
            log(f"LoRA r={recipe.lora.r}: {describe_trainable(model)}")
    return BuiltModel(model, data_config, pretrained, freeze_bn)


def plain_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """The model as ``model.safetensors`` stores it: LoRA merged into a copy (plain timm keys)."""
    if not recipe.lora.enabled:
        return model
    from finetune.adapters import merge_lora  # LoRA runs only (see build_model)

    return merge_lora(copy.deepcopy(model))


def gradual_stages(recipe: Recipe, model: nn.Module) -> int | None:
    """The number of body stages gradual unfreezing walks through (``None`` for other strategies)."""
    return max(body_stage_ids(model).values()) + 1 if recipe.resolved_strategy == "gradual" else None


def build_phases(recipe: Recipe, model: nn.Module) -> list[Phase]:
    """The run's phases (:func:`~finetune.train.optim.plan_phases`) with the model's stage count."""
    return plan_phases(recipe, gradual_stages(recipe, model))


def build_loss(recipe: Recipe, split: FolderSplit, device: torch.device) -> tuple[LossFn, Mixup | None]:
    """Cross-entropy (label smoothing, class weights), or timm's Mixup + soft-target CE."""
    aug = recipe.augment
    if aug.mixes:
        mixer = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=recipe.optim.label_smoothing,
                      num_classes=len(split.classes))
        soft = SoftTargetCrossEntropy()
        return (lambda images, logits, targets: soft(logits, targets)), mixer
    weight = class_weights(split.train, len(split.classes)) if recipe.data.class_balanced else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.optim.label_smoothing)
    criterion = criterion.to(device)
    return (lambda images, logits, labels: criterion(logits, labels)), None


def loader_workers(recipe: Recipe) -> int:
    """DataLoader workers of the training loader: ``data.num_workers``, else :func:`default_num_workers`."""
    return default_num_workers() if recipe.data.num_workers is None else recipe.data.num_workers


def build_loaders(recipe: Recipe, split: FolderSplit, data_config: dict) -> tuple[DataLoader, DataLoader]:
    """The training loader (seeded order and augmentation) and the validation loader."""
    if split.shards is not None:
        raise FinetuneError("this command reads image files by index; WebDataset shards train with "
                            "`finetune train --data wds:...` only: point it at the image folder instead")
    workers = loader_workers(recipe)
    aug = recipe.augment
    train_tf = build_transform(data_config, train=True, scale=(aug.scale, 1.0), hflip=aug.hflip,
                               auto_augment=aug.timm_auto_augment, re_prob=aug.random_erasing)
    eval_tf = build_transform(data_config, train=False)
    batch_size = recipe.data.batch_size
    common = dict(batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                  pin_memory=torch.cuda.is_available())
    draft = draft_size(data_config)
    # order and augmentation are functions of (seed, epoch, index): see finetune.data.sampling
    train_set = SeededAugmentation(ImageDataset(split.train, train_tf, draft_size=draft, skip_log=split.skip_log), recipe.runtime.seed)
    # drop only a last batch of one image: BatchNorm in train mode cannot normalise a single sample
    sampler = epoch_sampler(recipe.data.sampler, [s.label for s in split.train], recipe.runtime.seed)
    train = DataLoader(train_set, sampler=sampler,
                       drop_last=len(split.train) % batch_size == 1, **common)
    val = DataLoader(ImageDataset(split.val, eval_tf, draft_size=draft, skip_log=split.skip_log), shuffle=False, **common)
    return train, val


def build_distiller(recipe: Recipe, student: nn.Module, data_config: dict, classes: list[str]) -> DistillationLoss:
    """The distillation loss from ``distill.teacher`` (feature terms for a converted student's plan)."""
    kd = recipe.distill
    teacher, teacher_config = load_model(kd.teacher, img_size=recipe.model.img_size)
    check_same_classes(kd.teacher, teacher.pretrained_cfg["label_names"], classes)
    plan_layers = feature_layers_from_plan(student) if getattr(student, "separable_plan", None) else []
    return DistillationLoss(
        teacher, student, alpha=kd.alpha, temperature=kd.temperature,
        beta=kd.beta if plan_layers else 0.0, feature_layers=plan_layers or None,
        teacher_mean_std=(teacher_config["mean"], teacher_config["std"]),
        student_mean_std=(data_config["mean"], data_config["std"]),
    )


def distillation_loss_fn(distiller: DistillationLoss, unlabelled: bool) -> LossFn:
    """The training loss of a distilled run; without labels only the KD (+ feature) terms count."""
    def loss_fn(images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The distiller's total loss on a batch."""
        return distiller(images, logits, None if unlabelled else labels)["loss"]

    return loss_fn


class TeacherView(nn.Module):
    """The teacher as the student's data loader sees it (re-normalised to the teacher's mean/std)."""

    def __init__(self, distiller: DistillationLoss) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for images normalised for the student."""
        return self.distiller.teacher(self.distiller.teacher_input(images))


@torch.no_grad()
def teacher_labels(teacher: nn.Module, samples: list[Sample], data_config: dict,
                   device: torch.device) -> list[Sample]:
    """The samples relabelled with the teacher's top-1 predictions (for unlabelled validation)."""
    loader = eval_loader(samples, data_config)
    teacher.eval()
    preds = torch.cat([teacher(images.to(device)).argmax(1).cpu() for images, _ in loader])
    return [Sample(s.path, int(p)) for s, p in zip(samples, preds)]


def build_ema(recipe: Recipe, model: nn.Module) -> ModelEmaV3 | None:
    """timm's EMA with warmup (decay ramps up from 0: short fine-tuning runs have few hundred updates)."""
    return ModelEmaV3(model, decay=recipe.strategy.ema_decay, use_warmup=True) if recipe.strategy.ema else None


def feature_cache_reason(recipe: Recipe, model: nn.Module, *, freeze_bn: bool, distills: bool) -> str | None:
    """Why head-only epochs recompute the backbone every epoch, or ``None`` when they train on cached features."""
    if not recipe.strategy.feature_cache:
        return "off (strategy.feature_cache false)"
    if str(recipe.data.root).startswith("wds:"):  # the cache indexes images; shards are streams
        return "off (WebDataset shards are streamed, not indexed)"
    if recipe.data.sampler != "shuffle":  # the cached-feature loader draws in shuffle order
        return f"off (data.sampler {recipe.data.sampler})"
    return cache_unusable_reason(model, freeze_bn=freeze_bn, mixes=recipe.augment.mixes, distills=distills,
                                 lora=recipe.lora.enabled)
