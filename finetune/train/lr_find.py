"""``lr_find``: an exponential learning-rate sweep (Smith 2015; fastai's ``lr_find``).

The model, data, augmentation and loss are built from the recipe exactly as :func:`fit` builds
them; the sweep trains the parameters of the recipe's *first* phase (the new head for
``finetune``/``gradual``/``probe``, everything for ``full``, the adapters for LoRA), which is
what the recipe's ``optim.lr`` sets. The model is thrown away afterwards.

The suggestion is the LR of steepest descent of the smoothed loss (before its minimum), the
rule fastai calls ``steep``; the LR at the minimum is reported too (divide it by ~10 for a
conservative choice).

>>> from finetune import Recipe, lr_find                                       # doctest: +SKIP
>>> lr_find(Recipe(data="~/photos", model="mobilenetv2_100")).suggestion    # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import Recipe
from finetune.data.manifest import scan_data_section
from finetune.errors import FinetuneError
from finetune.io import atomic_path
from finetune.train.build import build_loaders, build_loss, build_model, build_phases, source_run_meta
from finetune.train.loop import LossFn, Mixer, freeze_bn_stats
from finetune.train.optim import build_optimizer, set_trainable


@dataclass
class LrFindResult:
    """The sweep: learning rates, raw and smoothed losses, and the suggestions."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    min_loss_lr: float
    plot: Path | None = None
    phase: str = ""
    notes: list[str] = field(default_factory=list)


def suggest_lr(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(steepest-descent LR, LR at the minimum) of a smoothed loss curve.

    >>> lrs = list(np.logspace(-6, 0, 61)); loss = [2.0] * 20 + list(np.linspace(2.0, 0.5, 30)) + [0.5 + k for k in range(11)]
    >>> steep, low = suggest_lr(lrs, loss)
    >>> bool(1e-4 < steep < 1e-2 and abs(low - lrs[49]) < 1e-12)
    True
    """
    if len(lrs) < 5:
        raise FinetuneError("the LR sweep stopped after fewer than 5 steps; lower --start-lr or raise --steps")
    low = int(np.argmin(smoothed))
    stop = max(low, 2)
    slopes = np.gradient(np.asarray(smoothed[:stop + 1]), np.log10(np.asarray(lrs[:stop + 1])))
    steep = int(np.argmin(slopes[:stop]))
    return float(lrs[steep]), float(lrs[low])


def lr_find(recipe: Recipe, out: str | os.PathLike | None = "lr_find.png", steps: int = 100,
            start_lr: float = 1e-7, end_lr: float = 1.0, smoothing: float = 0.98,
            diverge: float = 4.0) -> LrFindResult:
    """Sweep the LR exponentially from ``start_lr`` to ``end_lr`` over ``steps`` updates.

    Stops early once the smoothed loss exceeds ``diverge`` × its minimum. Saves a loss-vs-LR
    plot to ``out`` (``None``: no plot).
    """
    if not 0 < start_lr < end_lr:
        raise FinetuneError(f"--start-lr {start_lr} and --end-lr {end_lr}: need 0 < start < end (e.g. 1e-7 and 1)")
    if steps < 10:
        raise FinetuneError(f"--steps {steps}: use at least 10 (100 is typical)")
    recipe.require_data()
    source_meta = source_run_meta(recipe)
    torch.manual_seed(recipe.runtime.seed)
    split = scan_data_section(recipe.data, recipe.runtime.seed)  # class folders or the manifest
    built = build_model(recipe, split, source_meta, unlabelled=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = built.model.to(device)
    phase = build_phases(recipe, model)[0]
    set_trainable(model, phase)
    optimizer = build_optimizer(model, phase, recipe)
    train_loader, _ = build_loaders(recipe, split, built.data_config)
    loss_fn, mixer = build_loss(recipe, split, device)
    model.train()
    if built.freeze_bn:
        freeze_bn_stats(model)
    lrs, losses, smoothed = _sweep(model, optimizer, phase.head_lr, train_loader, loss_fn, mixer, device,
                                   steps=steps, start_lr=start_lr, end_lr=end_lr, smoothing=smoothing,
                                   diverge=diverge)
    suggestion, min_lr = suggest_lr(lrs, smoothed)
    result = LrFindResult(lrs=lrs, losses=losses, smoothed=smoothed, suggestion=suggestion, min_loss_lr=min_lr,
                          phase=phase.name)
    if out is not None:
        result.plot = Path(out).expanduser()
        _plot(result, result.plot, f"{recipe.model.name}, phase `{phase.name}`")
    return result


def _sweep(model: nn.Module, optimizer: torch.optim.Optimizer, head_lr: float, loader: DataLoader, loss_fn: LossFn,
           mixer: Mixer | None, device: torch.device, *, steps: int, start_lr: float, end_lr: float,
           smoothing: float, diverge: float) -> tuple[list[float], list[float], list[float]]:
    """Train ``steps`` updates at exponentially rising LRs (every group keeps its ratio to the head's);
    returns the LRs, raw losses and bias-corrected smoothed losses until a stop."""
    ratios = [group["lr"] / head_lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    factor = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    batches = iter(loader)
    for step in range(steps):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        targets = labels
        if mixer is not None:
            images, targets = mixer(images, labels)
        lr = start_lr * factor ** step
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        loss = loss_fn(images, model(images), targets)
        if not torch.isfinite(loss):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average = smoothing * average + (1 - smoothing) * loss.item()
        value = average / (1 - smoothing ** (step + 1))  # bias-corrected, as in fastai
        lrs.append(lr)
        losses.append(loss.item())
        smoothed.append(value)
        best = min(best, value)
        if step > 10 and value > diverge * best:
            break
    return lrs, losses, smoothed


def _plot(result: LrFindResult, path: Path, title: str) -> None:
    """Raw and smoothed loss against the LR (log scale), with the two suggestions marked."""
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed loss")
    ax.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggested {result.suggestion:.1e}")
    ax.axvline(result.min_loss_lr, color="0.4", linestyle=":", label=f"minimum {result.min_loss_lr:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    top = np.percentile(result.smoothed, 95) * 1.5 if result.smoothed else None
    if top is not None and math.isfinite(top):
        ax.set_ylim(top=top)
    ax.set_title(f"LR finder: {title}")
    ax.legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.15)
