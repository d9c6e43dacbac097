"""``fit()``: one run from a :class:`~finetune.config.recipe.Recipe`, driven by accelerate.

The loop follows accelerate's computer-vision example: one ``prepare``, ``backward``,
``gather_for_metrics``, printing on the main process only. The same code runs on a CPU, one
GPU or several processes (``accelerate launch``). The command line builds the same Recipe, so
``finetune train`` and ``fit`` are one code path. The pieces are built in
:mod:`finetune.train.build` and trained by :class:`~finetune.train.session.TrainingSession`.

>>> from finetune import Recipe, fit                                    # doctest: +SKIP
>>> result = fit(Recipe(model="tf_efficientnet_lite0", data="~/photos", epochs=3))  # doctest: +SKIP
>>> result.metrics["top1"], result.run_dir                               # doctest: +SKIP
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from torch import nn

from finetune.config import Recipe
from finetune.data import (FolderSplit, is_unlabelled_folder, lazy_skip_log, merge_skipped, read_skipped, scan_folder,
                           scan_manifest, scan_unlabelled, write_skipped)
from finetune.data.hf import is_hf_source, scan_hf
from finetune.data.shards import is_wds
from finetune.errors import FinetuneError
from finetune.hub import write_model_card
from finetune.report import write_report
from finetune.io import write_json, write_text
from finetune.metrics import classification_metrics, plot_confusion, plot_curves
from finetune.models import check_model_name
from finetune.models.weights import resolve_weights
from finetune.rundir import RUN_METRICS, RUN_RECIPE, RUN_SKIPPED, read_run_meta, write_meta
from finetune.train.autotune import format_label, training_memory_format
from finetune.train.build import (BuiltModel, build_ema, build_loaders, build_loss, build_model, build_phases,
                                  distillation_loss_fn, loader_workers, source_run_meta)
from finetune.train.checkpoints import load_checkpoint, load_latest_checkpoint
from finetune.train.loop import gather_logits
from finetune.train.outputs import (check_run_dir, create_run_dir, model_meta, recipe_for_disk, report_split,
                                    restarted_run, resume_checkpoint)
from finetune.train.session import RunData, TrainingSession
from finetune.train.shard_data import shard_loaders, shard_split
from finetune.train.teacher import finish_distillation, start_distillation
from finetune.train.tracking import end_tracking, start_tracking, tracking


@dataclass
class FitResult:
    """What :func:`fit` returns: where the run is, its final metrics, and the best model."""

    run_dir: Path
    metrics: dict[str, Any]
    model: nn.Module
    classes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def fit(recipe: Recipe, *, progress: bool = True, overwrite: bool = False) -> FitResult:
    """Fine-tune ``recipe.model.name`` on the image folder ``recipe.data.root``; write a run directory.

    The run directory holds ``model.safetensors`` (the best epoch by ``optim.monitor``, validation
    top-1 by default; it loads in plain timm, LoRA merged in), ``model.json``, ``metrics.json``, ``log.csv``, ``curves.png``,
    ``confusion.png``, ``recipe.yaml`` (re-runnable: ``finetune train RUN/recipe.yaml``),
    ``skipped.txt`` when images were skipped and, with LoRA, ``adapter/`` in peft's format
    (names: :mod:`finetune.rundir`). A ``task: convert`` recipe is several runs, not one: it is
    refused here (``finetune.run_recipe`` runs any task).
    """
    if recipe.task == "convert":
        raise FinetuneError("fit() trains one run; a `task: convert` recipe is a pipeline of runs: run it with "
                            "finetune.run_recipe(recipe) or `finetune train RECIPE`")
    started = time.perf_counter()
    recipe, overwrite = restarted_run(recipe, overwrite)  # a worker group the elastic agent restarted
    source_meta = check_sources(recipe)  # cheap mistakes first: nothing scanned or created before these
    run_dir = check_run_dir(recipe, overwrite)
    accelerator = make_accelerator(recipe, run_dir)  # a tracker not installed fails here
    try:
        return _fit(recipe, accelerator, run_dir, source_meta, started, progress, overwrite)
    finally:
        end_tracking(accelerator)  # trackers flushed and closed, also when training raises


def _fit(recipe: Recipe, accelerator: Accelerator, run_dir: Path, source_meta: dict[str, Any] | None,
         started: float, progress: bool, overwrite: bool) -> FitResult:
    """:func:`fit` once the recipe, the sources and the run directory are checked."""
    checkpoint, resumed = open_checkpoint(recipe, run_dir, accelerator)
    split, unlabelled = scan_data(recipe, source_meta)
    if checkpoint is None:
        create_run_dir(run_dir, accelerator, overwrite)
    report_split(split, run_dir, accelerator)

    # Seeded after every step that may draw random numbers only sometimes (e.g. the one-off
    # conversion of offline weights), so a run is reproducible whatever the cache holds.
    set_seed(recipe.runtime.seed)
    built = build_model(recipe, split, source_meta, unlabelled, log=accelerator.print)
    meta = model_meta(recipe_for_disk(recipe, run_dir), split, built.data_config, built.model, source_meta,
                      accelerator.num_processes)
    if accelerator.is_main_process and checkpoint is None:
        write_meta(run_dir, meta)
        write_text(run_dir / RUN_RECIPE, recipe_for_disk(recipe, run_dir).to_yaml())
    start_tracking(accelerator, recipe_for_disk(recipe, run_dir))
    model, data = prepare_data(recipe, split, built, accelerator, resumed["memory_format"] if resumed else None)
    meta["memory_format"] = format_label(data.memory_format)
    loss_fn, mixer = build_loss(recipe, split, accelerator.device)
    teacher = None
    if recipe.distill.teacher is not None:
        teacher = start_distillation(recipe, model, split, data, accelerator, unlabelled, meta)
        loss_fn = distillation_loss_fn(teacher.distiller, unlabelled)

    ema = build_ema(recipe, model)
    session = TrainingSession(recipe, accelerator, run_dir, meta, model=model, ema=ema,
                              phases=build_phases(recipe, model), data=data, loss_fn=loss_fn, mixer=mixer,
                              freeze_bn=built.freeze_bn, distills=teacher is not None, progress=progress)
    if resumed is not None:
        session.restore(resumed, checkpoint)
    session.train()

    # Final evaluation of the best weights, so metrics.json describes model.safetensors.
    best_model = session.load_best()
    logits, labels = gather_logits(best_model, data.val_loader, accelerator, data.memory_format)
    metrics = classification_metrics(logits, labels, split.classes)
    metrics["best_epoch"] = meta.get("best_epoch")
    if teacher is not None:
        metrics["distillation"] = finish_distillation(teacher, logits, labels, metrics["top1"],
                                                      recipe.distill.teacher, accelerator)
    seconds = time.perf_counter() - started
    metrics["train_seconds"] = seconds
    write_results(recipe, accelerator, run_dir, meta, metrics, session.history, split.classes)
    if accelerator.is_main_process:
        write_run_report(recipe, run_dir, metrics, split, logits, labels)
    accelerator.print(
        f"done in {seconds:.0f}s: best val top-1 {metrics['top1']:.4f} (epoch {metrics['best_epoch']}); "
        f"run directory {run_dir}"
    )
    best_model = best_model.to(memory_format=torch.contiguous_format).eval()
    return FitResult(run_dir=run_dir, metrics=metrics, model=best_model, classes=split.classes,
                     history=session.history, seconds=seconds)


# --------------------------------------------------------------------------------------------
def check_sources(recipe: Recipe) -> dict[str, Any] | None:
    """Check the data folder is set and the model, its weights and the teacher exist; the source
    run's ``model.json`` when the recipe continues a run."""
    if is_wds(recipe.require_data()):
        shard_split(recipe)  # a missing index, no matching shards, a tar without `cls`: before any launch
    source_meta = source_run_meta(recipe)
    if source_meta is None:
        check_model_name(recipe.model.name)
        resolve_weights(recipe.model.name, recipe.model.weights)
    if recipe.distill.teacher is not None:
        read_run_meta(recipe.distill.teacher)
    return source_meta


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    """The run's ``Accelerator`` (mixed precision, gradient accumulation, the recipe's trackers writing
    under ``run_dir``), fresh for every fit()."""
    trackers = tracking(recipe, run_dir)  # before accelerate's state is touched: a missing package is one line
    # accelerate keeps one AcceleratorState per process and refuses a second fit() with another
    # mixed precision (notebooks, the demo); drop it, keeping the process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: accelerate 1.15 only forms a gloo process group under torchrun (world
    # size > 1) when told the run is on CPU; otherwise each process would train alone.
    return Accelerator(mixed_precision=recipe.runtime.mixed_precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=recipe.optim.grad_accum, **trackers)


def open_checkpoint(recipe: Recipe, run_dir: Path,
                    accelerator: Accelerator) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and this process's view of it (``None, None`` for a new run).
    ``--resume`` alone takes the newest checkpoint that reads back whole."""
    checkpoint = resume_checkpoint(recipe, run_dir)
    if checkpoint is None:
        return None, None
    if recipe.runtime.resume == "latest":
        checkpoint, resumed = load_latest_checkpoint(run_dir, accelerator.process_index, warn=accelerator.print)
    else:
        resumed = load_checkpoint(checkpoint, accelerator.process_index)
    if resumed["world_size"] != accelerator.num_processes:
        raise FinetuneError(f"checkpoint `{checkpoint}` was written by {resumed['world_size']} process(es), this "
                            f"run has {accelerator.num_processes}; resume with the same number of processes")
    return checkpoint, resumed


def scan_data(recipe: Recipe, source_meta: dict[str, Any] | None) -> tuple[FolderSplit, bool]:
    """The train/val split of the data folder (or of the manifest ``data.labels``), and whether the folder
    is unlabelled.

    One scan per job: the main process of each machine scans first and fills the scan cache
    (:mod:`finetune.data.scan_cache`); the other processes wait, then take every verdict from the
    cache. The main process prints what the scan did, with the job's totals when there are several
    processes (``scan: N images, D decoded, C from cache (S s)``). With ``check_images: lazy`` the
    split carries the :class:`~finetune.data.skiplog.SkipLog` its datasets record failed loads in.
    """
    data_root = recipe.require_data()
    if is_wds(data_root):  # WebDataset shards: classes and counts from their index, nothing to scan
        split = shard_split(recipe)
        PartialState().print(f"shards: {split.layout}; {len(split.train)} train / {len(split.val)} val images "
                             "(from the index)")
        return split, False
    # Distillation also works on a folder of loose, unlabelled images: the KD (+ feature) terms need
    # no labels, and the teacher's predictions serve as validation labels.
    labels = recipe.data.labels  # a manifest (finetune.data.manifest) instead of class folders
    unlabelled = not labels and recipe.distill.teacher is not None and is_unlabelled_folder(data_root)
    if unlabelled and source_meta is None:
        raise FinetuneError("an unlabelled folder can only train a student run: pass --student RUN_DIR "
                            "(e.g. from `finetune convert`) with --teacher")
    scan = scan_unlabelled if unlabelled else scan_folder
    if labels:
        scan = functools.partial(scan_manifest, labels=labels, path_column=recipe.data.path_column,
                                 label_column=recipe.data.label_column, split_column=recipe.data.split_column)
    if is_hf_source(data_root):  # a Hugging Face data set: hf:DIR or hf:imagefolder:DIR (finetune.data.hf)
        scan = functools.partial(scan_hf, image_column=recipe.data.image_column,
                                 label_column=recipe.data.label_column)
    state = PartialState()
    lazy = recipe.data.check_images == "lazy"
    skip_log = lazy_skip_log(recipe.runtime.out, state.process_index) if lazy else None
    if skip_log is not None and recipe.runtime.resume is None:
        skip_log.clear()  # records of a run this one overwrites; a resumed run keeps its own
    if not state.is_local_main_process:
        state.wait_for_everyone()  # the machine's main process scans first, filling the cache
    try:
        split = scan(data_root, val_fraction=recipe.data.val_fraction, seed=recipe.runtime.seed,
                     check_images=recipe.data.check_images)
    finally:  # also when it raises: the others then scan (from the cache) and raise the same error
        if state.is_local_main_process:
            state.wait_for_everyone()
    counts = gather_object([split.scan])  # every process's, in rank order (a collective: all call it)
    line = f"scan: {split.scan.describe()}"
    if len(counts) > 1:
        line += (f"; {len(counts)} processes: {sum(c.decoded for c in counts)} decoded, "
                 f"{sum(c.cached for c in counts)} from cache in total")
    if recipe.data.check_images is not True:
        line += f"; check_images {'lazy' if lazy else 'false'}: nothing decoded before training"
    state.print(line)
    split.skip_log = skip_log
    if unlabelled:
        split.classes = list(source_meta["classes"])
    return split, unlabelled


def prepare_data(recipe: Recipe, split: FolderSplit, built: BuiltModel, accelerator: Accelerator,
                 resumed_format: str | None) -> tuple[nn.Module, RunData]:
    """The loaders, prepared for the processes, and the model on the device in the chosen memory format."""
    if split.shards is not None:  # each process reads its own shards: nothing for accelerate to split
        train_loader, val_loader = shard_loaders(recipe, split, built.data_config, accelerator,
                                                 loader_workers(recipe))
        memory_format = training_memory_format(recipe, built.model, val_loader, accelerator, resumed_format)
        model = built.model.to(accelerator.device, memory_format=memory_format)
        return model, RunData(train_loader, val_loader, train_loader, None, None, memory_format, built.data_config)
    train_loader, val_loader = build_loaders(recipe, split, built.data_config)
    train_sampler = train_loader.sampler  # ours (EpochSampler); accelerate wraps it below
    train_images, val_images = train_loader.dataset.dataset, val_loader.dataset
    memory_format = training_memory_format(recipe, built.model, val_loader, accelerator, resumed_format)
    model = built.model.to(accelerator.device, memory_format=memory_format)
    train_loader, val_loader = accelerator.prepare(train_loader, val_loader)
    return model, RunData(train_loader, val_loader, train_sampler, train_images, val_images, memory_format,
                          built.data_config)


def write_results(recipe: Recipe, accelerator: Accelerator, run_dir: Path, meta: dict[str, Any],
                  metrics: dict[str, Any], history: list[dict[str, Any]], classes: list[str]) -> None:
    """``metrics.json``, the confusion and curve plots, and ``model.json`` marked complete (main process).

    With ``check_images: lazy`` every process first hands the files that failed to load during
    training (its own and its loader workers', :class:`~finetune.data.skiplog.SkipLog`) to the main
    process, which adds them to ``skipped.txt`` and prints how many there were.
    """
    late = None
    if recipe.data.check_images == "lazy":
        log = lazy_skip_log(recipe.runtime.out, accelerator.process_index)
        late = merge_skipped(gather_object(log.read()))  # a collective: every process calls it
        log.clear()
    if not accelerator.is_main_process:
        return
    if late is not None:
        skipped = merge_skipped(read_skipped(run_dir / RUN_SKIPPED), late)
        if late:
            write_skipped(skipped, run_dir / RUN_SKIPPED)
        meta.setdefault("data", {}).update(skipped_images=len(skipped), skipped_during_training=len(late))
        accelerator.print(f"check_images lazy: {len(late)} image(s) failed to load during training and were "
                          "replaced by other images" + (f"; list in {run_dir / RUN_SKIPPED}" if late else ""))
    write_json(run_dir / RUN_METRICS, metrics)
    plot_confusion(metrics["confusion"], classes, run_dir / "confusion.png",
                   title=f"{recipe.model.name} — validation (top-1 {metrics['top1']:.3f})")
    plot_curves(history, run_dir / "curves.png")
    meta["status"] = "complete"
    meta["val_top1"] = metrics["top1"]
    write_meta(run_dir, meta)
    write_model_card(run_dir)


def write_run_report(recipe: Recipe, run_dir: Path, metrics: dict[str, Any], split: FolderSplit,
                     logits: torch.Tensor, labels: torch.Tensor) -> None:
    """``RUN/report.html`` for the validation split (the gathered logits are in ``split.val``'s order)."""
    write_report(run_dir, title=f"{Path(run_dir).name}: {recipe.model.name}", metrics=metrics,
                 subtitle=f"validation split of {split.root} ({len(split.val)} images)",
                 classes=split.classes, probs=logits.softmax(1), labels=labels,
                 paths=[] if split.shards is not None else [sample.path for sample in split.val],
                 plots={"curves": run_dir / "curves.png", "confusion": run_dir / "confusion.png"},
                 skipped=[(s.path, s.reason) for s in read_skipped(run_dir / RUN_SKIPPED)],
                 recipe=(run_dir / RUN_RECIPE).read_text() if (run_dir / RUN_RECIPE).is_file() else None)
