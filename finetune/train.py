"""``fit()``: the training loop, driven by accelerate (the only module that imports it).

The loop follows accelerate's ``examples/cv_example.py``: one ``prepare``, ``backward``,
``gather_for_metrics``, printing on the main process only. The same code runs on a CPU,
one GPU or several processes (``accelerate launch``).

>>> from finetune import TrainConfig, fit                      # doctest: +SKIP
>>> result = fit(TrainConfig(data="~/photos", epochs=3))     # doctest: +SKIP
>>> result.metrics["top1"], result.run_dir                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune import __version__
from finetune.autotune import FORMATS, choose_memory_format
from finetune.checkpoint import model_state_dict, save_weights, weights_metadata, write_json, write_text
from finetune.config import TrainConfig
from finetune.data import (FolderSplit, ImageDataset, Sample, build_transform, class_weights, draft_size,
                           eval_loader, is_unlabelled_folder, scan_folder, scan_unlabelled, write_skipped)
from finetune.distill import DistillationLoss, feature_layers_from_plan
from finetune.errors import FinetuneError
from finetune.metrics import classification_metrics, plot_confusion, plot_curves
from finetune.models import RUN_FORMAT, RUN_META, RUN_WEIGHTS, check_model_name, load_model, read_run_meta
from finetune.weights import resolve_weights

LOG_COLUMNS = (
    "epoch", "phase", "lr_head", "lr_body", "train_loss", "train_top1",
    "val_loss", "val_top1", "epoch_seconds", "train_images_per_s",
)


@dataclass
class Phase:
    """A stretch of epochs with one set of trainable parameters and learning rates."""

    name: str
    epochs: int
    train_body: bool
    head_lr: float
    body_lr: float


@dataclass
class FitResult:
    """What :func:`fit` returns: where the run is, its final metrics, and the best model."""

    run_dir: Path
    metrics: dict[str, Any]
    model: nn.Module
    classes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def plan_phases(cfg: TrainConfig) -> list[Phase]:
    """Split the epochs into phases for the strategy.

    ``finetune`` (fastai's ``fine_tune``): train the new head alone for ``head_epochs``, then
    everything, the body at ``lr × body_lr_mult``.

    >>> [(p.name, p.epochs) for p in plan_phases(TrainConfig(data=".", epochs=5))]
    [('head', 1), ('body', 4)]
    """
    strategy = cfg.resolved_strategy
    head_epochs = cfg.head_epochs
    if cfg.strategy == "auto" and head_epochs >= cfg.epochs:
        head_epochs = 0  # too short for a head-only phase: train everything, body at the lower LR
    if strategy == "probe":
        return [Phase("head", cfg.epochs, False, cfg.lr, 0.0)]
    if strategy == "full" or head_epochs == 0:
        body_lr = cfg.lr if strategy == "full" else cfg.lr * cfg.body_lr_mult
        return [Phase("full" if strategy == "full" else "body", cfg.epochs, True, cfg.lr, body_lr)]
    return [
        Phase("head", head_epochs, False, cfg.lr, 0.0),
        Phase("body", cfg.epochs - head_epochs, True, cfg.lr, cfg.lr * cfg.body_lr_mult),
    ]


def default_num_workers() -> int:
    """DataLoader workers: none on a 2-core machine (they would steal compute), more on big hosts."""
    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        return min(8, max(1, cores - 1))
    return min(4, max(0, cores // 2 - 1))


def fit(cfg: TrainConfig, *, progress: bool = True, overwrite: bool = False) -> FitResult:
    """Fine-tune ``cfg.model`` on the image folder ``cfg.data`` and write a run directory.

    The run directory holds ``model.safetensors`` (best epoch by validation top-1; it loads in
    plain timm), ``model.json``, ``metrics.json``, ``log.csv``, ``curves.png``, ``confusion.png``,
    ``recipe.yaml`` and ``skipped.txt`` when images were skipped.
    """
    started = time.perf_counter()
    # cheap mistakes first: nothing scanned or created before these
    source_meta = read_run_meta(cfg.model) if cfg.starts_from_run else None
    if source_meta is None:
        check_model_name(cfg.model)
        resolve_weights(cfg.model, cfg.weights)
    if cfg.teacher is not None:
        read_run_meta(cfg.teacher)
    # accelerate keeps one AcceleratorState per process and refuses a second fit() with another
    # mixed precision (notebooks, the demo); drop it, keeping the process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    run_dir = _check_run_dir(cfg, overwrite)
    # Distillation also works on a folder of loose, unlabelled images: the KD (+ feature) terms need
    # no labels, and the teacher's predictions serve as validation labels.
    unlabelled = cfg.teacher is not None and is_unlabelled_folder(cfg.data)
    if unlabelled and source_meta is None:
        raise FinetuneError("an unlabelled folder can only train a student run: pass --student RUN_DIR "
                            "(e.g. from `finetune convert`) with --teacher")
    scan = scan_unlabelled if unlabelled else scan_folder
    split = scan(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, check_images=cfg.check_images)
    if unlabelled:
        split.classes = list(source_meta["classes"])
    _create_run_dir(run_dir, accelerator, overwrite)
    _report_split(split, run_dir, accelerator)

    # Seeded after every step that may draw random numbers only sometimes (e.g. the one-off
    # conversion of offline weights), so a run is reproducible whatever the cache holds.
    set_seed(cfg.seed)
    if source_meta is not None:
        model, data_config = load_model(cfg.model, img_size=cfg.img_size)
        if not unlabelled:
            _check_same_classes(cfg.model, source_meta["classes"], split.classes)
    else:
        model, data_config = load_model(cfg.model, weights=cfg.weights, num_classes=len(split.classes),
                                        img_size=cfg.img_size)
    pretrained = cfg.weights != "none" or source_meta is not None
    freeze_bn = cfg.bn == "frozen" or (cfg.bn == "auto" and pretrained)
    accelerator.print(
        f"model {cfg.model}: {model.pretrained_cfg.get('weights_source')}; "
        f"input {data_config['input_size'][-1]} px; BatchNorm statistics {'frozen' if freeze_bn else 'trained'}"
    )
    meta = _model_meta(cfg, split, data_config, model, source_meta)
    if accelerator.is_main_process:
        write_json(run_dir / RUN_META, meta)
        write_text(run_dir / "recipe.yaml", cfg.to_yaml())

    train_loader, val_loader = _loaders(cfg, split, data_config)
    memory_format = _memory_format(cfg, model, val_loader, accelerator)
    meta["memory_format"] = str(memory_format).replace("torch.", "")
    model = model.to(memory_format=memory_format)
    train_loader, val_loader = accelerator.prepare(train_loader, val_loader)
    weight = class_weights(split.train, len(split.classes)) if cfg.class_balanced else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing).to(accelerator.device)
    loss_fn = lambda images, logits, labels: criterion(logits, labels)  # noqa: E731
    distiller, before = None, {}
    if cfg.teacher is not None:
        distiller = _distiller(cfg, model, data_config, split.classes).to(accelerator.device)
        loss_fn = lambda images, logits, labels: distiller(  # noqa: E731
            images, logits, None if unlabelled else labels)["loss"]
        if unlabelled:
            split.val = _teacher_labels(_TeacherView(distiller), split.val, data_config, accelerator.device)
            _, val_loader = _loaders(cfg, split, data_config)
            val_loader = accelerator.prepare(val_loader)
            meta["data"]["val_labels"] = "teacher predictions (unlabelled folder): val top-1 = agreement"
            accelerator.print("unlabelled folder: validation accuracy is agreement with the teacher's predictions")
        for label, net in (("teacher_top1", _TeacherView(distiller)), ("student_before_top1", model)):
            logits, labels = _predict(net.to(accelerator.device), val_loader, accelerator, memory_format, False)
            before[label] = (logits.argmax(1) == labels).float().mean().item()
        accelerator.print(f"distilling from {cfg.teacher}: teacher val top-1 {before['teacher_top1']:.4f}, "
                          f"student before {before['student_before_top1']:.4f}")

    history: list[dict[str, Any]] = []
    best, epoch = (-1.0, 0.0), 0
    for phase in plan_phases(cfg):
        model = _set_trainable(accelerator.unwrap_model(model), phase.train_body)
        model = accelerator.prepare_model(model)
        optimizer = _optimizer(accelerator.unwrap_model(model), phase, cfg.weight_decay)
        optimizer = accelerator.prepare_optimizer(optimizer)
        updates_per_epoch = max(1, math.ceil(len(train_loader) / cfg.grad_accum))
        scheduler = CosineLRScheduler(
            optimizer, t_initial=max(2, phase.epochs * updates_per_epoch), lr_min=1e-6,
            warmup_t=int(cfg.warmup_epochs * updates_per_epoch), warmup_lr_init=1e-6, t_in_epochs=False,
        )
        updates = 0
        for _ in range(phase.epochs):
            epoch += 1
            tic = time.perf_counter()
            train_loss, train_top1, seen, updates, mean_lrs = _train_epoch(
                model, train_loader, optimizer, scheduler, loss_fn, accelerator,
                freeze_bn=freeze_bn, memory_format=memory_format, updates=updates,
                desc=f"epoch {epoch}/{cfg.epochs} ({phase.name})", progress=progress,
            )
            train_seconds = time.perf_counter() - tic
            logits, labels = _predict(model, val_loader, accelerator, memory_format, progress=False)
            val_loss = nn.functional.cross_entropy(logits, labels).item()
            val_top1 = (logits.argmax(1) == labels).float().mean().item()
            row = {
                "epoch": epoch, "phase": phase.name,
                "lr_head": mean_lrs[0],  # mean over the epoch's steps (warmup and cosine move it)
                "lr_body": mean_lrs[-1] if phase.train_body else 0.0,
                "train_loss": train_loss, "train_top1": train_top1,
                "val_loss": val_loss, "val_top1": val_top1,
                "epoch_seconds": time.perf_counter() - tic,
                "train_images_per_s": seen / max(train_seconds, 1e-9),
            }
            history.append(row)
            accelerator.print(
                f"epoch {epoch}/{cfg.epochs} [{phase.name}] train loss {train_loss:.4f} acc {train_top1:.3f} | "
                f"val loss {val_loss:.4f} acc {val_top1:.3f} | {row['train_images_per_s']:.1f} img/s"
            )
            if accelerator.is_main_process:
                state = model_state_dict(accelerator.unwrap_model(model))
                save_weights(state, run_dir / "checkpoints" / "last.safetensors")
                if (val_top1, -val_loss) > best:  # ties on accuracy go to the lower loss
                    best = (val_top1, -val_loss)
                    meta["best_epoch"] = epoch
                    save_weights(state, run_dir / RUN_WEIGHTS, weights_metadata(meta))
                    write_json(run_dir / RUN_META, meta)
                _write_log(history, run_dir / "log.csv")
            accelerator.wait_for_everyone()

    # Final evaluation of the best weights, so metrics.json describes model.safetensors.
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).load_state_dict(load_file(run_dir / RUN_WEIGHTS))
    logits, labels = _predict(model, val_loader, accelerator, memory_format, progress=False)
    metrics = classification_metrics(logits, labels, split.classes)
    metrics["best_epoch"] = meta.get("best_epoch")
    if distiller is not None:
        metrics["distillation"] = {**before, "student_after_top1": metrics["top1"], "teacher": cfg.teacher}
        distiller.close()
        accelerator.print("\n".join(["", f"{'model':<28}{'val top-1':>10}",
                                      f"{'teacher':<28}{before['teacher_top1']:>10.4f}",
                                      f"{'student before distillation':<28}{before['student_before_top1']:>10.4f}",
                                      f"{'student after distillation':<28}{metrics['top1']:>10.4f}"]))
    seconds = time.perf_counter() - started
    metrics["train_seconds"] = seconds
    if accelerator.is_main_process:
        write_json(run_dir / "metrics.json", metrics)
        plot_confusion(metrics["confusion"], split.classes, run_dir / "confusion.png",
                       title=f"{cfg.model} — validation (top-1 {metrics['top1']:.3f})")
        plot_curves(history, run_dir / "curves.png")
        meta["status"] = "complete"
        meta["val_top1"] = metrics["top1"]
        write_json(run_dir / RUN_META, meta)
    accelerator.print(
        f"done in {seconds:.0f}s: best val top-1 {metrics['top1']:.4f} (epoch {metrics['best_epoch']}); "
        f"run directory {run_dir}"
    )
    best_model = accelerator.unwrap_model(model).to(memory_format=torch.contiguous_format).eval()
    return FitResult(run_dir=run_dir, metrics=metrics, model=best_model, classes=split.classes,
                     history=history, seconds=seconds)


# --------------------------------------------------------------------------------------------
RUN_ARTEFACTS = ("model.safetensors", "model.json", "metrics.json", "log.csv", "confusion.png", "curves.png",
                 "recipe.yaml", "skipped.txt", "checkpoints", "eval-*")


def _check_run_dir(cfg: TrainConfig, overwrite: bool) -> Path:
    """Where the run goes, checked before anything is scanned or written."""
    out = cfg.out or os.path.join("runs", f"{cfg.model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(out).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise FinetuneError(f"--out `{run_dir}` is a file; pass a directory for the run")
    data = Path(cfg.data).expanduser().resolve()
    if run_dir.resolve() == data or data in run_dir.resolve().parents:
        raise FinetuneError(
            f"run directory `{run_dir}` is inside the data folder `{cfg.data}`, so its files would become "
            "training images; pass --out outside the data folder"
        )
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise FinetuneError(f"run directory `{run_dir}` already holds files; choose another --out or pass --overwrite")
    return run_dir


def _create_run_dir(run_dir: Path, accelerator: Accelerator, overwrite: bool) -> None:
    if accelerator.is_main_process:
        if overwrite:  # remove what a previous run wrote, so nothing stale is mistaken for this run's
            for pattern in RUN_ARTEFACTS:
                for path in run_dir.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def _report_split(split: FolderSplit, run_dir: Path, accelerator: Accelerator) -> None:
    accelerator.print(
        f"data {split.root}: {len(split.classes)} classes, {len(split.train)} train / {len(split.val)} val images"
        f"; {split.layout}"
    )
    for warning in split.warnings:
        accelerator.print(f"warning: {warning}")
    if split.skipped:
        accelerator.print(f"skipped {len(split.skipped)} unreadable image(s); list in {run_dir / 'skipped.txt'}")
        if accelerator.is_main_process:
            write_skipped(split.skipped, run_dir / "skipped.txt")


def _model_meta(cfg: TrainConfig, split: FolderSplit, data_config: dict, model: nn.Module,
                source_meta: dict[str, Any] | None) -> dict[str, Any]:
    meta = {
        "format": RUN_FORMAT,
        "architecture": source_meta["architecture"] if source_meta else cfg.model,
        "num_classes": len(split.classes),
        "classes": split.classes,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "weights_source": model.pretrained_cfg.get("weights_source"),
        "config": cfg.to_dict(),
        "strategy": cfg.resolved_strategy,
        "data": {"root": str(split.root), "layout": split.layout, "train_images": len(split.train),
                 "val_images": len(split.val), "skipped_images": len(split.skipped)},
        "versions": {"finetune-vision": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "created": datetime.now().isoformat(timespec="seconds"),
        "status": "running",
    }
    if source_meta is not None:
        meta["started_from"] = cfg.model
        if source_meta.get("separable_plan"):
            meta["separable_plan"] = source_meta["separable_plan"]
    if cfg.teacher is not None:
        meta["teacher"] = cfg.teacher
    return meta


def _check_same_classes(run: str, run_classes: list[str], data_classes: list[str]) -> None:
    if list(run_classes) != list(data_classes):
        raise FinetuneError(
            f"`{run}` was trained on classes {', '.join(run_classes[:6])}{'…' if len(run_classes) > 6 else ''} "
            f"but the data folder has {', '.join(data_classes[:6])}{'…' if len(data_classes) > 6 else ''}; "
            "use the same class folders (or train a new head from a timm model name)"
        )


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


def _distiller(cfg: TrainConfig, student: nn.Module, data_config: dict, classes: list[str]) -> DistillationLoss:
    teacher, teacher_config = load_model(cfg.teacher, img_size=cfg.img_size)
    _check_same_classes(cfg.teacher, teacher.pretrained_cfg["label_names"], classes)
    plan_layers = feature_layers_from_plan(student) if getattr(student, "separable_plan", None) else []
    return DistillationLoss(
        teacher, student, alpha=cfg.kd_alpha, temperature=cfg.kd_temperature,
        beta=cfg.kd_beta if plan_layers else 0.0, feature_layers=plan_layers or None,
        teacher_mean_std=(teacher_config["mean"], teacher_config["std"]),
        student_mean_std=(data_config["mean"], data_config["std"]),
    )


def _loaders(cfg: TrainConfig, split: FolderSplit, data_config: dict) -> tuple[DataLoader, DataLoader]:
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    train_tf = build_transform(data_config, train=True, scale=(cfg.aug_scale, 1.0))
    eval_tf = build_transform(data_config, train=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=workers, persistent_workers=workers > 0,
                  pin_memory=torch.cuda.is_available())
    draft = draft_size(data_config)
    # drop only a last batch of one image: BatchNorm in train mode cannot normalise a single sample
    train = DataLoader(ImageDataset(split.train, train_tf, draft_size=draft), shuffle=True, generator=generator,
                       drop_last=len(split.train) % cfg.batch_size == 1, **common)
    val = DataLoader(ImageDataset(split.val, eval_tf, draft_size=draft), shuffle=False, **common)
    return train, val


def _memory_format(cfg: TrainConfig, model: nn.Module, loader: DataLoader,
                   accelerator: Accelerator) -> torch.memory_format:
    """The forced format, or (``auto``) the one measured faster for this model, size and device."""
    if cfg.memory_format != "auto":
        return FORMATS[cfg.memory_format]
    with torch.random.fork_rng(devices=[]):  # timing must not shift the seeded random stream
        images, labels = next(iter(loader))
        # labels only feed the timing loss; unlabelled images carry -1
        fmt, timings = choose_memory_format(model.to(accelerator.device), images.to(accelerator.device),
                                            labels.clamp(min=0).to(accelerator.device))
    accelerator.print("memory format: " + ", ".join(f"{k} {v * 1000:.0f} ms/step" for k, v in timings.items())
                      + f" -> {str(fmt).replace('torch.', '')}")
    return fmt


def _set_trainable(model: nn.Module, train_body: bool) -> nn.Module:
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad_(train_body or id(p) in head)
    return model


def _optimizer(model: nn.Module, phase: Phase, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with head groups first, then body groups (lower LR).

    Biases and norm weights (ndim <= 1) get no weight decay, the rule of timm's
    ``param_groups_weight_decay``; that helper groups a whole module, and we need the head and
    body split too, so the split is written out here.
    """
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for is_head, lr in ((True, phase.head_lr), (False, phase.body_lr)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head_ids) == is_head]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": ps, "lr": lr, "weight_decay": wd}
                   for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=phase.head_lr)


def _freeze_bn_stats(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _train_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator: Accelerator, *, freeze_bn: bool,
                 memory_format: torch.memory_format, updates: int, desc: str,
                 progress: bool) -> tuple[float, float, int, int, list[float]]:
    model.train()
    if freeze_bn:
        _freeze_bn_stats(model)
    lr_sums = [0.0] * len(optimizer.param_groups)
    total_loss = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device)
    seen = 0
    # disable=None: tqdm stays silent when stderr is not a terminal (no \r lines in log files)
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
               disable=None if progress and accelerator.is_local_main_process else True)
    for step, (images, labels) in enumerate(bar):
        images = images.contiguous(memory_format=memory_format)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(images)
                loss = loss_fn(images, logits, labels)
            if not torch.isfinite(loss):
                raise FinetuneError(
                    f"loss became {loss.item()} at step {step} of {desc} (lr {optimizer.param_groups[0]['lr']:.2e}); "
                    "lower --lr, or use --mixed-precision no if fp16 overflowed"
                )
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            updates += 1
            scheduler.step_update(updates)
        lr_sums = [acc + group["lr"] for acc, group in zip(lr_sums, optimizer.param_groups)]
        total_loss += loss.detach() * labels.size(0)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.size(0)
        if not bar.disable:  # .item() waits for the device; only pay it when a bar shows the value
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    totals = accelerator.reduce(torch.stack([total_loss, correct, torch.tensor(float(seen), device=accelerator.device)]),
                                reduction="sum")
    n = max(totals[2].item(), 1.0)
    mean_lrs = [acc / max(step + 1, 1) for acc in lr_sums]
    return totals[0].item() / n, totals[1].item() / n, int(totals[2].item()), updates, mean_lrs


@torch.no_grad()
def _predict(model, loader, accelerator: Accelerator, memory_format: torch.memory_format,
             progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, leave=False, disable=not (progress and accelerator.is_local_main_process)):
        images = images.contiguous(memory_format=memory_format)
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def _write_log(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buffer.getvalue())
