"""Phases, trainable parameters, parameter groups, optimizer and LR schedule for one run.

A run is a list of :class:`Phase` objects: the strategy (``probe``, ``full``, ``finetune``,
``gradual``, ``lora``) decides which parameters train in each and at what learning rate.
Layer ids for layer-wise LR decay and the stages of gradual unfreezing come from timm's
``group_matcher`` (the same grouping ``timm.optim.param_groups_layer_decay`` uses).

>>> from finetune.config.recipe import Recipe
>>> [(p.name, p.epochs, p.trainable) for p in plan_phases(Recipe(data=".", epochs=5))]
[('head', 1, 'head'), ('body', 4, 'all')]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.models import group_parameters
from timm.scheduler import CosineLRScheduler
from torch import nn

from finetune.config.recipe import Recipe
from finetune.errors import FinetuneError


@dataclass
class Phase:
    """A stretch of epochs with one set of trainable parameters and learning rates.

    ``trainable`` is ``"head"``, ``"all"``, ``"lora"`` (whatever peft left trainable) or an
    int *k*: the head plus the top *k* stages of the body (gradual unfreezing).
    """

    name: str
    epochs: int
    trainable: str | int
    head_lr: float
    body_lr: float

    @property
    def trains_body(self) -> bool:
        """Whether any body parameter trains in this phase."""
        return self.trainable != "head"


def plan_phases(recipe: Recipe, body_stages: int | None = None) -> list[Phase]:
    """Split the epochs into phases for the strategy.

    ``finetune`` (fastai's ``fine_tune``): the new head alone for ``head_epochs``, then
    everything, the body at ``lr × body_lr_mult``. ``gradual`` (ULMFiT): the head alone, then
    one more group of stages unfrozen per epoch from the top until the whole body trains in the
    last epoch; ``body_stages`` is the number of stages (:func:`body_stage_ids`).

    >>> [(p.trainable, p.epochs) for p in plan_phases(Recipe(data=".", epochs=4, strategy="gradual"), 7)]
    [('head', 1), (3, 1), (5, 1), ('all', 1)]
    """
    strategy, epochs, lr = recipe.resolved_strategy, recipe.optim.epochs, recipe.optim.lr
    body_lr = lr * recipe.optim.body_lr_mult
    head_epochs = recipe.strategy.head_epochs
    if recipe.strategy.name == "auto" and head_epochs >= epochs:
        head_epochs = 0  # too short for a head-only phase: train everything, body at the lower LR
    if strategy == "lora":
        return [Phase("lora", epochs, "lora", lr, lr)]
    if strategy == "probe":
        return [Phase("head", epochs, "head", lr, 0.0)]
    if strategy == "full":
        return [Phase("full", epochs, "all", lr, lr)]
    phases = [Phase("head", head_epochs, "head", lr, 0.0)] if head_epochs else []
    body_epochs = epochs - head_epochs
    if strategy == "finetune" or not body_stages:
        return phases + [Phase("body", body_epochs, "all", lr, body_lr)]
    for epoch in range(1, body_epochs + 1):
        stages = math.ceil(body_stages * epoch / body_epochs)
        trainable: str | int = "all" if stages >= body_stages else stages
        if phases and phases[-1].trainable == trainable:
            phases[-1].epochs += 1
        else:
            phases.append(Phase(f"unfreeze-{trainable}", 1, trainable, lr, body_lr))
    return phases


def head_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every classifier parameter (timm's ``get_classifier``)."""
    return {id(p) for p in model.get_classifier().parameters()}


def body_stage_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name → stage index (0 = stem … highest = last stage), head excluded.

    Stages are timm's coarse groups (stem, each ``blocks.N``, the final conv).
    """
    if not hasattr(model, "group_matcher"):
        raise FinetuneError(f"strategy gradual needs a timm model with stages (group_matcher); "
                            f"{type(model).__name__} has none: use strategy finetune")
    head = head_parameter_ids(model)
    names = {name for name, p in model.named_parameters() if id(p) not in head}
    groups = group_parameters(model, model.group_matcher(coarse=True))
    stage_of = {}
    for stage, (_, members) in enumerate(sorted((gid, [n for n in members if n in names])
                                                for gid, members in groups.items())):
        for name in members:
            stage_of[name] = stage
    # re-number densely over the stages that hold body parameters
    dense = {old: new for new, old in enumerate(sorted(set(stage_of.values())))}
    return {name: dense[stage] for name, stage in stage_of.items()}


def set_trainable(model: nn.Module, phase: Phase) -> nn.Module:
    """Set ``requires_grad`` for a phase; returns the model.

    >>> import timm
    >>> m = timm.create_model("mobilenetv2_100", num_classes=3)
    >>> m = set_trainable(m, Phase("head", 1, "head", 1e-3, 0.0))
    >>> sum(p.numel() for p in m.parameters() if p.requires_grad)   # 1280 × 3 + 3
    3843
    """
    if phase.trainable == "lora":
        return model  # peft already froze the base and left adapters, head and BatchNorm trainable
    head = head_parameter_ids(model)
    if isinstance(phase.trainable, int):
        stages = body_stage_ids(model)
        top = max(stages.values())
        for name, p in model.named_parameters():
            p.requires_grad_(id(p) in head or stages.get(name, top) > top - phase.trainable)
        return model
    for p in model.parameters():
        p.requires_grad_(phase.trainable == "all" or id(p) in head)
    return model


def _layer_scales(model: nn.Module, layer_decay: float | None) -> dict[str, float]:
    """Parameter name → LR scale ``layer_decay ** (depth from the top)``, as timm's
    ``param_groups_layer_decay`` computes it (fine-grained groups: one per block)."""
    if layer_decay is None or layer_decay == 1.0:
        return {}
    if not hasattr(model, "group_matcher"):
        raise FinetuneError(f"optim.layer_decay needs a timm model with group_matcher; {type(model).__name__} "
                            "has none: leave layer_decay unset")
    layer_map = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer_map.values())  # the classifier matches no pattern: timm puts it in the last group
    return {name: layer_decay ** (top - layer_map[name]) if name in layer_map else 1.0
            for name, _ in model.named_parameters()}


def build_optimizer(model: nn.Module, phase: Phase, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: head groups at ``phase.head_lr``, body groups at
    ``phase.body_lr`` (× the layer's ``lr_scale`` under layer-wise decay, applied by timm's
    scheduler). Biases and norm weights (ndim ≤ 1) get no weight decay, timm's rule; timm's
    helpers group a whole module and we need the head/body split as well, so it is written here.
    """
    head = head_parameter_ids(model)
    scales = _layer_scales(model, recipe.optim.layer_decay)
    groups: dict[tuple[bool, bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = id(p) in head
        scale = 1.0 if is_head else scales.get(name, 1.0)
        decay = p.ndim > 1
        key = (not is_head, not decay, round(scale, 8))
        group = groups.setdefault(key, {
            "params": [], "lr": phase.head_lr if is_head else phase.body_lr,
            "weight_decay": recipe.optim.weight_decay if decay else 0.0, "lr_scale": scale,
            "group": "head" if is_head else "body"})
        group["params"].append(p)
    if not groups:
        raise FinetuneError(f"phase `{phase.name}` has no trainable parameters; check strategy and lora settings")
    ordered = [groups[k] for k in sorted(groups)]  # head groups first: log.csv reads lr_head from group 0
    return torch.optim.AdamW(ordered, lr=phase.head_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, phase: Phase, recipe: Recipe,
                    updates_per_epoch: int) -> CosineLRScheduler:
    """timm's cosine schedule with linear warmup, stepped per optimizer update."""
    return CosineLRScheduler(
        optimizer, t_initial=max(2, phase.epochs * updates_per_epoch), lr_min=1e-6,
        warmup_t=int(recipe.optim.warmup_epochs * updates_per_epoch), warmup_lr_init=1e-6, t_in_epochs=False,
    )
