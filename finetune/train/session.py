"""The training state of one run and the steps that move it on: phases, epochs, validation, the
best weights and the checkpoints that make a kill at any instant resumable exactly.

:func:`~finetune.train.trainer.fit` builds a :class:`TrainingSession` from the recipe's pieces
(:mod:`finetune.train.build`), restores a checkpoint into it when resuming, and calls
:meth:`TrainingSession.train`.

>>> from finetune.train.session import TrainingSession                      # doctest: +SKIP
>>> session.train(); best = session.load_best()                              # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import Recipe
from finetune.data import ImageDataset
from finetune.data.sampling import EpochSampler
from finetune.hub import write_timm_config
from finetune.io import model_state_dict
from finetune.metrics import classification_metrics
from finetune.rundir import RUN_ADAPTER, RUN_WEIGHTS, write_log, write_meta, write_weights
from finetune.train.build import feature_cache_reason, plain_model
from finetune.train.checkpoints import (Position, checkpoint_size, save_checkpoint as write_checkpoint,
                                        set_rng_state)
from finetune.train.features import FeatureCache, HeadOnly
from finetune.train.loop import LossFn, gather_logits, train_epoch
from finetune.train.optim import Phase, build_optimizer, build_scheduler, set_trainable
from finetune.train.preemption import Preempted, StopSignals
from finetune.train.stopping import NO_SCORE, epochs_without_improvement, selection_score, should_stop
from finetune.train.tracking import log_epoch, log_update


@dataclass
class RunData:
    """A run's prepared loaders, and what the feature cache needs from the unprepared ones."""

    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: EpochSampler  # ours; accelerate wraps it in the prepared loader
    train_images: ImageDataset
    val_images: ImageDataset
    memory_format: torch.memory_format
    data_config: dict[str, Any]  # the model's, which the transforms were built from


class TrainingSession:
    """Model, EMA, the current phase's optimizer and scheduler, history, best epoch and position.

    ``best`` is the :func:`~finetune.train.stopping.selection_score` of the best epoch so far (by
    ``optim.monitor``); ``position`` is where a restored checkpoint stood; ``total_updates`` counts
    optimizer updates over the run (the EMA's step); ``stop`` turns SIGTERM/SIGUSR1 into a
    checkpoint and :class:`~finetune.train.preemption.Preempted` while :meth:`train` runs.
    """

    def __init__(self, recipe: Recipe, accelerator: Accelerator, run_dir: Path, meta: dict[str, Any], *,
                 model: nn.Module, ema: ModelEmaV3 | None, phases: list[Phase], data: RunData, loss_fn: LossFn,
                 mixer: Mixup | None, freeze_bn: bool, distills: bool, progress: bool) -> None:
        self.recipe, self.accelerator, self.run_dir, self.meta = recipe, accelerator, run_dir, meta
        self.model, self.ema, self.phases, self.data = model, ema, phases, data
        self.loss_fn, self.mixer, self.freeze_bn, self.progress = loss_fn, mixer, freeze_bn, progress
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, float] = NO_SCORE
        self.position = Position()
        self.total_updates = 0
        self.resumed: dict[str, Any] | None = None  # a checkpoint's state until its epoch starts
        self.cache: FeatureCache | None = None
        self.stop = StopSignals()
        self.cache_reason = feature_cache_reason(recipe, accelerator.unwrap_model(model), freeze_bn=freeze_bn,
                                                 distills=distills)

    # -- resume ----------------------------------------------------------------------------------
    def restore(self, resumed: dict[str, Any], checkpoint: Path) -> None:
        """Continue from a loaded checkpoint: weights, EMA, history, best epoch and position now; the
        optimizer, scheduler and RNG states when their phase and epoch start."""
        self.accelerator.unwrap_model(self.model).load_state_dict(resumed["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(resumed["ema"])
        self.history, self.best, self.position = resumed["history"], tuple(resumed["best"]), resumed["position"]
        self.meta["best_epoch"] = resumed["best_epoch"]
        self.total_updates = self.position.total_updates
        self.resumed = resumed
        self.accelerator.print(f"resuming from {checkpoint}: {self.position.epochs_done} epoch(s) and "
                               f"{self.position.batches} batch(es) done, {self.position.total_updates} updates")

    def _restore_phase(self, phase_index: int) -> int:
        """Load the checkpoint's optimizer and scheduler if it stopped in this phase; its updates so far."""
        resumed = self.resumed
        if resumed is None or self.position.phase != phase_index:
            return 0
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scheduler.load_state_dict(resumed["scheduler"])
        scaler = self.accelerator.scaler
        if scaler is not None and resumed.get("grad_scaler"):  # fp16: the loss scale goes on
            scaler.load_state_dict(resumed["grad_scaler"])
        return self.position.updates

    def _resume_epoch(self) -> tuple[int, list[float] | None]:
        """For the first epoch after a checkpoint: restore its RNGs; the batches to skip and the sums so far."""
        resumed, self.resumed = self.resumed, None
        if resumed is None:
            return 0, None
        skip = self.position.batches
        sums = resumed["rng"]["rank_state"]["sums"] if skip and resumed["rng"] else None
        if resumed["rng"] is not None:
            set_rng_state(resumed["rng"])
        return skip, sums

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, phase_index: int, epochs_done: int, batches: int, updates: int,
                        sums: list[float]) -> Path:
        """Write the whole state atomically (every process calls this); ``sums`` are this process's
        running totals of the unfinished epoch (empty at an epoch's end). Its size and write time go
        in ``model.json`` (``checkpoint``)."""
        accelerator = self.accelerator
        tic = time.perf_counter()
        path = write_checkpoint(
            self.run_dir, accelerator, model=accelerator.unwrap_model(self.model),
            ema=self.ema.module if self.ema else None, optimizer=self.optimizer, scheduler=self.scheduler,
            position=Position(phase_index, epochs_done, batches, updates, self.total_updates),
            extra={"history": self.history, "best": list(self.best), "best_epoch": self.meta.get("best_epoch"),
                   "memory_format": self.meta["memory_format"],
                   "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
            rank_state={"sums": sums}, keep=self.recipe.runtime.keep_checkpoints,
            keep_epoch=self.meta.get("best_epoch") if self.recipe.runtime.keep_best_checkpoint else None)
        self.meta["checkpoint"] = {"name": path.name, "megabytes": round(checkpoint_size(path) / 1e6, 2),
                                   "seconds": round(time.perf_counter() - tic, 3)}
        return path

    def on_update(self, updates: int, loss: torch.Tensor) -> None:
        """After every optimizer update: count it, move the EMA, report the loss to the trackers (if any)."""
        self.total_updates += 1
        if self.ema is not None:
            self.ema.update(self.accelerator.unwrap_model(self.model), step=self.total_updates)
        log_update(self.accelerator, self.total_updates, loss, self.optimizer.param_groups[0]["lr"])

    def on_step(self, phase_index: int, epoch: int, epoch_batches: int, batches: int, updates: int,
                get_sums: Callable[[], list[float]]) -> None:
        """After every batch: a mid-epoch checkpoint every ``runtime.checkpoint_every`` updates, and one
        before stopping when a process received SIGTERM/SIGUSR1 (at an epoch's last batch the epoch
        finishes first: :meth:`run_epoch` stops after its checkpoint)."""
        every, sync = self.recipe.runtime.checkpoint_every, self.accelerator.sync_gradients
        stop = self.stop.agreed(self.accelerator) if sync else None
        if sync and batches < epoch_batches and (stop or (every and updates % every == 0)):
            path = self.save_checkpoint(phase_index, epoch - 1, batches, updates, get_sums())
            if stop:
                raise Preempted(stop, path, self.total_updates)

    def stopped_early(self) -> bool:
        """Whether early stopping ends the run here (said once, and recorded in ``model.json``)."""
        optim = self.recipe.optim
        if not should_stop(self.history, optim.monitor, optim.patience, optim.min_delta):
            return False
        if "stopped_early" not in self.meta:
            waited = epochs_without_improvement(self.history, optim.monitor, optim.min_delta)
            self.meta["stopped_early"] = {"after_epoch": self.history[-1]["epoch"], "monitor": optim.monitor,
                                          "patience": optim.patience}
            self.accelerator.print(f"early stopping: {optim.monitor} has not improved for {waited} epoch(s); "
                                   f"best epoch {self.meta.get('best_epoch')}")
        return True

    # -- training --------------------------------------------------------------------------------
    def train(self) -> None:
        """Run the phases, or what is left of them after a restored checkpoint."""
        if any(p.trainable == "head" for p in self.phases):
            self.accelerator.print("head-only epochs: " + (
                f"from cached backbone features ({self.recipe.strategy.cache_views} augmented view(s) per image)"
                if self.cache_reason is None else f"backbone recomputed every epoch: {self.cache_reason}"))
        epochs_before = 0
        with self.stop:
            for phase_index, phase in enumerate(self.phases):
                if epochs_before + phase.epochs > self.position.epochs_done and not self.stopped_early():
                    self.run_phase(phase_index, phase, epochs_before)  # (else finished before the checkpoint)
                epochs_before += phase.epochs

    def run_phase(self, phase_index: int, phase: Phase, epochs_before: int) -> None:
        """Set the phase's trainable parameters, optimizer and schedule; train its epochs."""
        accelerator, recipe = self.accelerator, self.recipe
        cached = self.cache_reason is None and phase.trainable == "head"
        self.model = set_trainable(accelerator.unwrap_model(self.model), phase)
        if cached and self.cache is None:
            self.cache = FeatureCache(self.model, self.data.train_images, self.data.val_images,
                                      seed=recipe.runtime.seed, views=recipe.strategy.cache_views,
                                      batch_size=recipe.data.batch_size, memory_format=self.data.memory_format,
                                      device=accelerator.device,
                                      description=f"{self.meta['architecture']}|{self.data.data_config}")
        # the network this phase trains: the head on cached features, or the whole model on images
        net = accelerator.prepare_model(HeadOnly(self.model)) if cached else accelerator.prepare_model(self.model)
        if not cached:
            self.model = net
        self.optimizer = accelerator.prepare_optimizer(build_optimizer(accelerator.unwrap_model(self.model), phase,
                                                                       recipe))
        updates_per_epoch = max(1, math.ceil(len(self.data.train_loader) / recipe.optim.grad_accum))
        self.scheduler = build_scheduler(self.optimizer, phase, recipe, updates_per_epoch)
        updates = self._restore_phase(phase_index)
        for epoch in range(max(epochs_before, self.position.epochs_done) + 1, epochs_before + phase.epochs + 1):
            if self.stopped_early():
                break
            updates = self.run_epoch(phase_index, phase, epoch, net, cached, updates)

    def _epoch_batches(self, epoch: int, cached: bool) -> tuple[Any, EpochSampler, Any, torch.memory_format]:
        """Training batches, their sampler, validation batches and memory format of one epoch."""
        data = self.data
        if not cached:
            return data.train_loader, data.train_sampler, data.val_loader, data.memory_format
        batch_size = self.recipe.data.batch_size
        loader, sampler = self.cache.train_loader(self.cache.view_of(epoch), batch_size,
                                                  drop_last=len(data.train_images) % batch_size == 1)
        loader, val_batches = self.accelerator.prepare(loader, self.cache.val_loader(batch_size))
        return loader, sampler, val_batches, torch.contiguous_format

    def run_epoch(self, phase_index: int, phase: Phase, epoch: int, net: nn.Module, cached: bool,
                  updates: int) -> int:
        """Train and validate one epoch, log it, keep the best weights, checkpoint; the phase's updates."""
        accelerator, recipe = self.accelerator, self.recipe
        skip, sums = self._resume_epoch()
        tic = time.perf_counter()  # includes computing the cached features, when that happens
        loader, sampler, val_batches, fmt = self._epoch_batches(epoch, cached)
        # accelerate forwards set_epoch only two wrappers deep; under DDP + skip it is three
        sampler.set_epoch(epoch)
        train_loss, train_top1, seen, updates, mean_lrs = train_epoch(
            net, loader, self.optimizer, self.scheduler, self.loss_fn, accelerator,
            freeze_bn=self.freeze_bn, memory_format=fmt, updates=updates,
            desc=f"epoch {epoch}/{recipe.optim.epochs} ({phase.name})", progress=self.progress,
            mixer=self.mixer, on_update=self.on_update, epoch=epoch, skip=skip, sums=sums,
            on_step=partial(self.on_step, phase_index, epoch, len(self.data.train_loader)),
        )
        train_seconds = time.perf_counter() - tic
        val_loss, val_top1, val_f1, evaluated = self.validate(val_batches, fmt, cached)
        row = {
            "epoch": epoch, "phase": phase.name,
            "lr_head": mean_lrs[0],  # mean over the epoch's steps (warmup and cosine move it)
            "lr_body": mean_lrs[-1] if phase.trains_body else 0.0,
            "train_loss": train_loss, "train_top1": train_top1,
            "val_loss": val_loss, "val_top1": val_top1, "val_macro_f1": val_f1,
            "epoch_seconds": time.perf_counter() - tic,
            "train_images_per_s": seen / max(train_seconds, 1e-9),
        }
        self.history.append(row)
        log_epoch(accelerator, row)
        score = selection_score(row, recipe.optim.monitor)
        if score > self.best:
            self.save_best(epoch, score, evaluated)
        if accelerator.is_main_process:
            write_log(self.history, self.run_dir)
        path = self.save_checkpoint(phase_index, epoch, 0, updates, [])
        accelerator.wait_for_everyone()
        saved = self.meta["checkpoint"]
        accelerator.print(
            f"epoch {epoch}/{recipe.optim.epochs} [{phase.name}] train loss {train_loss:.4f} acc "
            f"{train_top1:.3f} | val{' (EMA)' if self.ema else ''} loss {val_loss:.4f} acc {val_top1:.3f} | "
            f"{row['train_images_per_s']:.1f} img/s | checkpoint {saved['megabytes']:.1f} MB in {saved['seconds']:.2f} s"
        )
        if stop := self.stop.agreed(accelerator):
            raise Preempted(stop, path, self.total_updates)
        return updates

    def validate(self, batches: Any, memory_format: torch.memory_format,
                 cached: bool) -> tuple[float, float, float, nn.Module]:
        """Validation loss, top-1 and macro F1, and the network measured (the EMA's, when the run keeps one)."""
        evaluated = self.ema.module if self.ema is not None else self.model
        net = HeadOnly(self.accelerator.unwrap_model(evaluated)) if cached else evaluated
        logits, labels = gather_logits(net, batches, self.accelerator, memory_format)
        measured = classification_metrics(logits, labels, [str(c) for c in range(logits.shape[1])])
        return measured["loss"], measured["top1"], measured["macro_f1"], evaluated

    def save_best(self, epoch: int, score: tuple[float, float], evaluated: nn.Module) -> None:
        """Record a new best epoch and write its weights (LoRA merged; the adapter too) and ``model.json``."""
        self.best = score
        self.meta["best_epoch"] = epoch
        if not self.accelerator.is_main_process:
            return
        saved = self.accelerator.unwrap_model(evaluated)
        plain = plain_model(saved, self.recipe)
        write_weights(self.run_dir, model_state_dict(plain), self.meta)
        write_timm_config(self.run_dir, plain, self.meta)  # the run folder is a timm model folder too
        if self.recipe.lora.enabled:
            from finetune.adapters import save_adapter  # LoRA runs only: peft adds seconds to every start

            save_adapter(saved, self.run_dir / RUN_ADAPTER)
        write_meta(self.run_dir, self.meta)

    def load_best(self) -> nn.Module:
        """The best epoch's weights as saved (LoRA merged), on the run's device, once every process is done."""
        self.accelerator.wait_for_everyone()
        best = plain_model(self.accelerator.unwrap_model(self.model), self.recipe)
        best.load_state_dict(load_file(self.run_dir / RUN_WEIGHTS))
        return best.to(self.accelerator.device)
