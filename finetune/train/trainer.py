"""``fit()``: one run from a :class:`~finetune.config.recipe.Recipe`, driven by accelerate.

The loop follows accelerate's ``examples/cv_example.py``: one ``prepare``, ``backward``,
``gather_for_metrics``, printing on the main process only. The same code runs on a CPU, one
GPU or several processes (``accelerate launch``). The command line builds the same Recipe, so
``finetune train`` and ``fit`` are one code path.

>>> from finetune import Recipe, fit                                    # doctest: +SKIP
>>> result = fit(Recipe(model="tf_efficientnet_lite0", data="~/photos", epochs=3))  # doctest: +SKIP
>>> result.metrics["top1"], result.run_dir                               # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from finetune.train.autotune import (FORMATS, autotune_key, cached_memory_format, choose_memory_format,
                                remember_memory_format)
from finetune.io import model_state_dict, write_json, write_text
from finetune.config.recipe import Recipe
from finetune.data.folder import (FolderSplit, ImageDataset, Sample, build_transform, class_weights, draft_size,
                           eval_loader, is_unlabelled_folder, scan_folder, scan_unlabelled)
from finetune.distill import DistillationLoss, feature_layers_from_plan
from finetune.errors import FinetuneError
from finetune.train.features import FeatureCache, HeadOnly, cache_unusable_reason
from finetune.train.loop import predict, train_epoch
from finetune.metrics import classification_metrics, plot_confusion, plot_curves
from finetune.models import check_model_name
from finetune.rundir import (RUN_METRICS, RUN_RECIPE, RUN_WEIGHTS, load_model, read_run_meta, write_log, write_meta,
                             write_weights)
from finetune.train.optim import body_stage_ids, build_optimizer, build_scheduler, plan_phases, set_trainable
from finetune.train.checkpoints import Position, load_checkpoint, save_checkpoint, set_rng_state
from finetune.train.outputs import (check_run_dir, check_same_classes, create_run_dir, model_meta, recipe_for_disk,
                             report_split, resume_checkpoint)
from finetune.data.sampling import EpochSampler, SeededAugmentation
from finetune.models.weights import resolve_weights


@dataclass
class FitResult:
    """What :func:`fit` returns: where the run is, its final metrics, and the best model."""

    run_dir: Path
    metrics: dict[str, Any]
    model: nn.Module
    classes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def default_num_workers() -> int:
    """DataLoader workers: none on a 2-core machine (they would steal compute), more on big hosts."""
    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        return min(8, max(1, cores - 1))
    return min(4, max(0, cores // 2 - 1))


def fit(recipe: Recipe, *, progress: bool = True, overwrite: bool = False) -> FitResult:
    """Fine-tune ``recipe.model.name`` on the image folder ``recipe.data.root``; write a run directory.

    The run directory holds ``model.safetensors`` (best epoch by validation top-1; it loads in
    plain timm, LoRA merged in), ``model.json``, ``metrics.json``, ``log.csv``, ``curves.png``,
    ``confusion.png``, ``recipe.yaml`` (re-runnable: ``finetune train RUN/recipe.yaml``),
    ``skipped.txt`` when images were skipped and, with LoRA, ``adapter/`` in peft's format.
    """
    if recipe.task == "convert":
        from finetune.tasks.pipeline import convert_pipeline  # train teacher → convert → distill

        return convert_pipeline(recipe, progress=progress, overwrite=overwrite)
    started = time.perf_counter()
    # cheap mistakes first: nothing scanned or created before these
    data_root = recipe.require_data()
    source_meta = read_run_meta(recipe.model.name) if recipe.starts_from_run else None
    if source_meta is None:
        check_model_name(recipe.model.name)
        resolve_weights(recipe.model.name, recipe.model.weights)
    if recipe.distill.teacher is not None:
        read_run_meta(recipe.distill.teacher)
    # accelerate keeps one AcceleratorState per process and refuses a second fit() with another
    # mixed precision (notebooks, the demo); drop it, keeping the process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: accelerate 1.15 only forms a gloo process group under torchrun (world
    # size > 1) when told the run is on CPU; otherwise each process would train alone.
    accelerator = Accelerator(mixed_precision=recipe.runtime.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=recipe.optim.grad_accum)
    run_dir = check_run_dir(recipe, overwrite)
    checkpoint = resume_checkpoint(recipe, run_dir)
    resumed = load_checkpoint(checkpoint, accelerator.process_index) if checkpoint is not None else None
    if resumed is not None and resumed["world_size"] != accelerator.num_processes:
        raise FinetuneError(f"checkpoint `{checkpoint}` was written by {resumed['world_size']} process(es), this "
                            f"run has {accelerator.num_processes}; resume with the same number of processes")
    # Distillation also works on a folder of loose, unlabelled images: the KD (+ feature) terms need
    # no labels, and the teacher's predictions serve as validation labels.
    unlabelled = recipe.distill.teacher is not None and is_unlabelled_folder(data_root)
    if unlabelled and source_meta is None:
        raise FinetuneError("an unlabelled folder can only train a student run: pass --student RUN_DIR "
                            "(e.g. from `finetune convert`) with --teacher")
    scan = scan_unlabelled if unlabelled else scan_folder
    split = scan(data_root, val_fraction=recipe.data.val_fraction, seed=recipe.runtime.seed,
                 check_images=recipe.data.check_images)
    if unlabelled:
        split.classes = list(source_meta["classes"])
    if checkpoint is None:
        create_run_dir(run_dir, accelerator, overwrite)
    report_split(split, run_dir, accelerator)

    # Seeded after every step that may draw random numbers only sometimes (e.g. the one-off
    # conversion of offline weights), so a run is reproducible whatever the cache holds.
    set_seed(recipe.runtime.seed)
    model, data_config, pretrained = build_model_for(recipe, split, source_meta, unlabelled)
    freeze_bn = recipe.strategy.bn == "frozen" or (recipe.strategy.bn == "auto" and pretrained)
    accelerator.print(
        f"model {recipe.model.name}: {model.pretrained_cfg.get('weights_source')}; "
        f"input {data_config['input_size'][-1]} px; BatchNorm statistics {'frozen' if freeze_bn else 'trained'}"
    )
    if recipe.lora.enabled:
        from finetune.adapters import apply_lora, describe_trainable

        model = apply_lora(model, r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                           targets=recipe.lora.targets)
        accelerator.print(f"LoRA r={recipe.lora.r}: {describe_trainable(model)}")
    meta = model_meta(recipe_for_disk(recipe, run_dir), split, data_config, model, source_meta,
                      accelerator.num_processes)
    if accelerator.is_main_process and checkpoint is None:
        write_meta(run_dir, meta)
        write_text(run_dir / RUN_RECIPE, recipe_for_disk(recipe, run_dir).to_yaml())

    train_loader, val_loader = build_loaders(recipe, split, data_config)
    train_sampler = train_loader.sampler  # ours (EpochSampler); accelerate wraps it below
    train_images, val_images = train_loader.dataset.dataset, val_loader.dataset
    memory_format = _memory_format(recipe, model, val_loader, accelerator,
                                   resumed["memory_format"] if resumed is not None else None)
    meta["memory_format"] = str(memory_format).replace("torch.", "")
    model = model.to(accelerator.device, memory_format=memory_format)
    train_loader, val_loader = accelerator.prepare(train_loader, val_loader)
    loss_fn, mixer = build_loss(recipe, split, accelerator.device)
    distiller, before = None, {}
    if recipe.distill.teacher is not None:
        distiller = _distiller(recipe, model, data_config, split.classes).to(accelerator.device)
        loss_fn = lambda images, logits, labels: distiller(  # noqa: E731
            images, logits, None if unlabelled else labels)["loss"]
        if unlabelled:
            split.val = _teacher_labels(_TeacherView(distiller), split.val, data_config, accelerator.device)
            _, val_loader = build_loaders(recipe, split, data_config)
            val_loader = accelerator.prepare(val_loader)
            meta["data"]["val_labels"] = "teacher predictions (unlabelled folder): val top-1 = agreement"
            accelerator.print("unlabelled folder: validation accuracy is agreement with the teacher's predictions")
        for label, net in (("teacher_top1", _TeacherView(distiller)), ("student_before_top1", model)):
            logits, labels = predict(net.to(accelerator.device), val_loader, accelerator, memory_format)
            before[label] = (logits.argmax(1) == labels).float().mean().item()
        accelerator.print(f"distilling from {recipe.distill.teacher}: teacher val top-1 "
                          f"{before['teacher_top1']:.4f}, student before {before['student_before_top1']:.4f}")

    # timm's EMA with warmup (decay ramps up from 0): short fine-tuning runs have few hundred updates
    ema = ModelEmaV3(model, decay=recipe.strategy.ema_decay, use_warmup=True) if recipe.strategy.ema else None
    stages = max(body_stage_ids(model).values()) + 1 if recipe.resolved_strategy == "gradual" else None
    phases = plan_phases(recipe, stages)
    history: list[dict[str, Any]] = []
    best = (-1.0, 0.0)
    position = Position()
    if resumed is not None:
        accelerator.unwrap_model(model).load_state_dict(resumed["model"])
        if ema is not None:
            ema.module.load_state_dict(resumed["ema"])
        history, best, position = resumed["history"], tuple(resumed["best"]), resumed["position"]
        meta["best_epoch"] = resumed["best_epoch"]
        accelerator.print(f"resuming from {checkpoint}: {position.epochs_done} epoch(s) and {position.batches} "
                          f"batch(es) done, {position.total_updates} updates")
    total_updates = [position.total_updates]
    every = recipe.runtime.checkpoint_every

    def save(phase_index: int, epochs_done: int, batches: int, updates: int, sums: list[float]) -> None:
        save_checkpoint(
            run_dir, accelerator, model=accelerator.unwrap_model(model), ema=ema.module if ema else None,
            optimizer=optimizer, scheduler=scheduler,
            position=Position(phase_index, epochs_done, batches, updates, total_updates[0]),
            extra={"history": history, "best": list(best), "best_epoch": meta.get("best_epoch"),
                   "memory_format": meta["memory_format"],
                   "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
            rank_state={"sums": sums}, keep=recipe.runtime.keep_checkpoints)

    def on_update(updates: int) -> None:
        total_updates[0] += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=total_updates[0])

    cache_reason = "off (strategy.feature_cache false)" if not recipe.strategy.feature_cache else \
        cache_unusable_reason(accelerator.unwrap_model(model), freeze_bn=freeze_bn, mixes=recipe.augment.mixes,
                              distills=distiller is not None, lora=recipe.lora.enabled)
    cache: FeatureCache | None = None
    if any(p.trainable == "head" for p in phases):
        accelerator.print("head-only epochs: " + (f"from cached backbone features ({recipe.strategy.cache_views} "
                                                  "augmented view(s) per image)" if cache_reason is None
                                                  else f"backbone recomputed every epoch: {cache_reason}"))
    epochs_before = [sum(p.epochs for p in phases[:i]) for i in range(len(phases))]
    for phase_index, phase in enumerate(phases):
        if epochs_before[phase_index] + phase.epochs <= position.epochs_done:
            continue  # finished before the checkpoint
        cached = cache_reason is None and phase.trainable == "head"
        model = set_trainable(accelerator.unwrap_model(model), phase)
        if cached and cache is None:
            cache = FeatureCache(model, train_images, val_images, seed=recipe.runtime.seed,
                                 views=recipe.strategy.cache_views, batch_size=recipe.data.batch_size,
                                 memory_format=memory_format, device=accelerator.device,
                                 description=f"{meta['architecture']}|{data_config}")
        # the network this phase trains: the head on cached features, or the whole model on images
        net = accelerator.prepare_model(HeadOnly(model)) if cached else accelerator.prepare_model(model)
        if not cached:
            model = net
        optimizer = accelerator.prepare_optimizer(build_optimizer(accelerator.unwrap_model(model), phase, recipe))
        updates_per_epoch = max(1, math.ceil(len(train_loader) / recipe.optim.grad_accum))
        scheduler = build_scheduler(optimizer, phase, recipe, updates_per_epoch)
        updates = 0
        if resumed is not None and position.phase == phase_index:  # the checkpoint's optimizer is this phase's
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            if accelerator.scaler is not None and resumed.get("grad_scaler"):  # fp16: the loss scale goes on
                accelerator.scaler.load_state_dict(resumed["grad_scaler"])
            updates = position.updates
        first = max(epochs_before[phase_index], position.epochs_done) + 1
        for epoch in range(first, epochs_before[phase_index] + phase.epochs + 1):
            skip, sums = 0, None
            if resumed is not None:  # the first epoch after the checkpoint: its RNGs, its place in the epoch
                skip = position.batches
                sums = resumed["rng"]["rank_state"]["sums"] if skip and resumed["rng"] else None
                if resumed["rng"] is not None:
                    set_rng_state(resumed["rng"])
                resumed = None
            tic = time.perf_counter()  # includes computing the cached features, when that happens
            loader, sampler, val_batches, fmt = train_loader, train_sampler, val_loader, memory_format
            if cached:
                loader, sampler = cache.train_loader(cache.view_of(epoch), recipe.data.batch_size,
                                                     drop_last=len(train_images) % recipe.data.batch_size == 1)
                loader, val_batches = accelerator.prepare(loader, cache.val_loader(recipe.data.batch_size))
                fmt = torch.contiguous_format
            # accelerate forwards set_epoch only two wrappers deep; under DDP + skip it is three
            sampler.set_epoch(epoch)

            def on_step(batches: int, updates_now: int, get_sums: Callable[[], list[float]],
                        _epoch: int = epoch, _phase: int = phase_index) -> None:
                if every and accelerator.sync_gradients and updates_now % every == 0 and batches < len(train_loader):
                    save(_phase, _epoch - 1, batches, updates_now, get_sums())

            train_loss, train_top1, seen, updates, mean_lrs = train_epoch(
                net, loader, optimizer, scheduler, loss_fn, accelerator,
                freeze_bn=freeze_bn, memory_format=fmt, updates=updates,
                desc=f"epoch {epoch}/{recipe.optim.epochs} ({phase.name})", progress=progress,
                mixer=mixer, on_update=on_update, epoch=epoch, skip=skip, sums=sums, on_step=on_step,
            )
            train_seconds = time.perf_counter() - tic
            evaluated = ema.module if ema is not None else model  # EMA runs validate (and save) the EMA weights
            logits, labels = predict(HeadOnly(accelerator.unwrap_model(evaluated)) if cached else evaluated,
                                     val_batches, accelerator, fmt)
            val_loss = nn.functional.cross_entropy(logits, labels).item()
            val_top1 = (logits.argmax(1) == labels).float().mean().item()
            row = {
                "epoch": epoch, "phase": phase.name,
                "lr_head": mean_lrs[0],  # mean over the epoch's steps (warmup and cosine move it)
                "lr_body": mean_lrs[-1] if phase.trains_body else 0.0,
                "train_loss": train_loss, "train_top1": train_top1,
                "val_loss": val_loss, "val_top1": val_top1,
                "epoch_seconds": time.perf_counter() - tic,
                "train_images_per_s": seen / max(train_seconds, 1e-9),
            }
            history.append(row)
            accelerator.print(
                f"epoch {epoch}/{recipe.optim.epochs} [{phase.name}] train loss {train_loss:.4f} acc "
                f"{train_top1:.3f} | val{' (EMA)' if ema else ''} loss {val_loss:.4f} acc {val_top1:.3f} | "
                f"{row['train_images_per_s']:.1f} img/s"
            )
            if (val_top1, -val_loss) > best:  # ties on accuracy go to the lower loss
                best = (val_top1, -val_loss)
                meta["best_epoch"] = epoch
                if accelerator.is_main_process:
                    saved = accelerator.unwrap_model(evaluated)
                    write_weights(run_dir, model_state_dict(_plain_model(saved, recipe)), meta)
                    if recipe.lora.enabled:
                        from finetune.adapters import save_adapter

                        save_adapter(saved, run_dir / "adapter")
                    write_meta(run_dir, meta)
            if accelerator.is_main_process:
                write_log(history, run_dir)
            save(phase_index, epoch, 0, updates, [])
            accelerator.wait_for_everyone()

    # Final evaluation of the best weights, so metrics.json describes model.safetensors.
    accelerator.wait_for_everyone()
    best_model = _plain_model(accelerator.unwrap_model(model), recipe)
    best_model.load_state_dict(load_file(run_dir / RUN_WEIGHTS))
    best_model = best_model.to(accelerator.device)
    logits, labels = predict(best_model, val_loader, accelerator, memory_format)
    metrics = classification_metrics(logits, labels, split.classes)
    metrics["best_epoch"] = meta.get("best_epoch")
    if distiller is not None:
        metrics["distillation"] = {**before, "student_after_top1": metrics["top1"], "teacher": recipe.distill.teacher}
        distiller.close()
        accelerator.print("\n".join(["", f"{'model':<28}{'val top-1':>10}",
                                      f"{'teacher':<28}{before['teacher_top1']:>10.4f}",
                                      f"{'student before distillation':<28}{before['student_before_top1']:>10.4f}",
                                      f"{'student after distillation':<28}{metrics['top1']:>10.4f}"]))
    seconds = time.perf_counter() - started
    metrics["train_seconds"] = seconds
    if accelerator.is_main_process:
        write_json(run_dir / RUN_METRICS, metrics)
        plot_confusion(metrics["confusion"], split.classes, run_dir / "confusion.png",
                       title=f"{recipe.model.name} — validation (top-1 {metrics['top1']:.3f})")
        plot_curves(history, run_dir / "curves.png")
        meta["status"] = "complete"
        meta["val_top1"] = metrics["top1"]
        write_meta(run_dir, meta)
    accelerator.print(
        f"done in {seconds:.0f}s: best val top-1 {metrics['top1']:.4f} (epoch {metrics['best_epoch']}); "
        f"run directory {run_dir}"
    )
    best_model = best_model.to(memory_format=torch.contiguous_format).eval()
    return FitResult(run_dir=run_dir, metrics=metrics, model=best_model, classes=split.classes,
                     history=history, seconds=seconds)


# --------------------------------------------------------------------------------------------
def build_model_for(recipe: Recipe, split: FolderSplit, source_meta: dict | None,
                 unlabelled: bool) -> tuple[nn.Module, dict, bool]:
    """The model to train, its data config, and whether it starts from trained weights."""
    if source_meta is not None:
        model, data_config = load_model(recipe.model.name, img_size=recipe.model.img_size)
        if not unlabelled:
            check_same_classes(recipe.model.name, source_meta["classes"], split.classes)
        return model, data_config, True
    extra = {"drop_rate": recipe.model.drop_rate} if recipe.model.drop_rate else {}
    model, data_config = load_model(recipe.model.name, weights=recipe.model.weights, num_classes=len(split.classes),
                                    img_size=recipe.model.img_size, **extra)
    return model, data_config, recipe.model.weights != "none"


def _plain_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """The model as ``model.safetensors`` stores it: LoRA merged into a copy (plain timm keys)."""
    if not recipe.lora.enabled:
        return model
    from finetune.adapters import merge_lora

    return merge_lora(copy.deepcopy(model))


def build_loss(recipe: Recipe, split: FolderSplit, device: torch.device) -> tuple[Callable, Mixup | None]:
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


@torch.no_grad()
def _teacher_labels(teacher: nn.Module, samples: list, data_config: dict, device: torch.device) -> list:
    """The samples relabelled with the teacher's top-1 predictions (for unlabelled validation)."""
    loader = eval_loader(samples, data_config)
    teacher.eval()
    preds = torch.cat([teacher(images.to(device)).argmax(1).cpu() for images, _ in loader])
    return [Sample(s.path, int(p)) for s, p in zip(samples, preds)]


class _TeacherView(nn.Module):
    """The teacher as the student's data loader sees it (re-normalised to the teacher's mean/std)."""

    def __init__(self, distiller: DistillationLoss) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.distiller.teacher(self.distiller.teacher_input(images))


def _distiller(recipe: Recipe, student: nn.Module, data_config: dict, classes: list[str]) -> DistillationLoss:
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


def build_loaders(recipe: Recipe, split: FolderSplit, data_config: dict) -> tuple[DataLoader, DataLoader]:
    workers = default_num_workers() if recipe.data.num_workers is None else recipe.data.num_workers
    aug = recipe.augment
    train_tf = build_transform(data_config, train=True, scale=(aug.scale, 1.0), hflip=aug.hflip,
                               auto_augment=aug.timm_auto_augment, re_prob=aug.random_erasing)
    eval_tf = build_transform(data_config, train=False)
    batch_size = recipe.data.batch_size
    common = dict(batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                  pin_memory=torch.cuda.is_available())
    draft = draft_size(data_config)
    # drop only a last batch of one image: BatchNorm in train mode cannot normalise a single sample
    # order and augmentation are functions of (seed, epoch, index): see finetune.data.sampling
    train_set = SeededAugmentation(ImageDataset(split.train, train_tf, draft_size=draft), recipe.runtime.seed)
    train = DataLoader(train_set, sampler=EpochSampler(len(train_set), recipe.runtime.seed),
                       drop_last=len(split.train) % batch_size == 1, **common)
    val = DataLoader(ImageDataset(split.val, eval_tf, draft_size=draft), shuffle=False, **common)
    return train, val


def _memory_format(recipe: Recipe, model: nn.Module, loader: DataLoader, accelerator: Accelerator,
                   resumed_format: str | None = None) -> torch.memory_format:
    """The forced format, or (``auto``) the one measured faster for this model, size and device;
    a resumed run keeps the format its checkpoint was trained in."""
    if recipe.runtime.memory_format != "auto":
        return FORMATS[recipe.runtime.memory_format]
    if resumed_format is not None:
        return FORMATS[resumed_format]
    with torch.random.fork_rng(devices=[]):  # iter() draws a seed: it must not shift the seeded stream
        images, labels = next(iter(loader))
    images = images.to(accelerator.device)
    # the name alone would not tell a converted model from its dense original: add the size
    name = str(getattr(model, "default_cfg", {}).get("architecture", type(model).__name__))
    key = autotune_key(f"{name}:{sum(p.numel() for p in model.parameters())}", images)
    cached = cached_memory_format(key)
    if cached is not None:
        fmt = cached[0]
        accelerator.print(f"memory format: {str(fmt).replace('torch.', '')} (measured before for this model, size "
                          "and machine; --memory-format forces one)")
        return fmt
    with torch.random.fork_rng(devices=[]):  # timing must not shift the seeded random stream
        # labels only feed the timing loss; unlabelled images carry -1
        fmt, timings = choose_memory_format(model.to(accelerator.device), images,
                                            labels.clamp(min=0).to(accelerator.device))
    if accelerator.is_main_process:
        remember_memory_format(key, fmt, timings)
    accelerator.print("memory format: " + ", ".join(f"{k} {v * 1000:.0f} ms/step" for k, v in timings.items())
                      + f" -> {str(fmt).replace('torch.', '')}")
    return fmt
