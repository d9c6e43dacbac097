"""Where a training run writes: the run directory checked and created, the recipe as stored,
the checkpoint to resume, the split reported, and what ``model.json`` records about the run.

The file names and the ``model.json`` writer are :mod:`finetune.rundir`'s; only the main process
writes, and every write is atomic.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from finetune.config.recipe import Recipe
from finetune.data import FolderSplit, manifest_path, write_skipped
from finetune.data.hf import is_hf_source, normalise_source, source_folder
from finetune.data.shards import absolute_spec, is_wds
from finetune.errors import FinetuneError
from finetune.io import write_text
from finetune.models.weights import model_source
from finetune.rundir import RUN_ARTEFACTS, RUN_CHECKPOINTS, RUN_JOB, RUN_RECIPE, RUN_SKIPPED, make_run_meta
from finetune.train.checkpoints import find_checkpoint
from finetune.train.launch import restart_count


def elastic_job() -> str | None:
    """The elastic agent's run id when this process is one of its workers (torchrun or
    ``finetune train --num-processes``); ``None`` otherwise, and for torchrun's default id ``none``."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return job if job and job != "none" else None


def default_run_dir(recipe: Recipe) -> Path:
    """``runtime.out``, else ``runs/<model>-<time>`` (``runs/<model>-<job>`` under the elastic agent, so every
    process and every restart of the job agrees on it)."""
    if recipe.runtime.out:
        return Path(recipe.runtime.out).expanduser()
    stamp = elastic_job() or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(recipe.model.name).name}-{stamp}"


def restarted_run(recipe: Recipe, overwrite: bool) -> tuple[Recipe, bool]:
    """The recipe and ``--overwrite`` of a worker the elastic agent restarted: continue from the run's newest
    checkpoint, or -- if the job stopped before its first one -- start the job's own folder over."""
    if restart_count() == 0:
        return recipe, overwrite
    run_dir = default_run_dir(recipe)
    if find_checkpoint(run_dir) is not None:
        return recipe.replace({"runtime.resume": "latest"}), overwrite
    job_file = run_dir / RUN_JOB
    ours = elastic_job() is not None and job_file.is_file() and job_file.read_text().strip() == elastic_job()
    return recipe, overwrite or ours


def check_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    """Where the run goes, checked before anything is scanned or written."""
    run_dir = default_run_dir(recipe)
    if run_dir.exists() and not run_dir.is_dir():
        raise FinetuneError(f"--out `{run_dir}` is a file; pass a directory for the run")
    root = recipe.require_data()
    data = (source_folder(root) if is_hf_source(root) else Path(root)).expanduser().resolve()
    if run_dir.resolve() == data or data in run_dir.resolve().parents:
        raise FinetuneError(
            f"run directory `{run_dir}` is inside the data folder `{recipe.data.root}`, so its files would become "
            "training images; pass --out outside the data folder"
        )
    if recipe.runtime.resume is not None:
        if not (run_dir / RUN_RECIPE).is_file():
            raise FinetuneError(f"--resume: `{run_dir}` holds no run to resume; pass its --out (or its recipe.yaml), "
                                "or start the run without --resume")
        return run_dir
    # only the main process writes; the others must not read a folder it may be clearing
    main = os.environ.get("RANK", "0") == "0"
    if main and run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise FinetuneError(f"run directory `{run_dir}` already holds files; choose another --out, pass --overwrite, "
                            "or --resume to continue it")
    return run_dir


def recipe_for_disk(recipe: Recipe, run_dir: Path) -> Recipe:
    """The recipe as ``RUN/recipe.yaml`` stores it: paths absolute (it re-runs from any folder),
    no ``runtime.resume`` (a re-run starts from scratch unless asked)."""
    changes: dict = {"runtime.resume": None, "runtime.out": str(run_dir.resolve())}
    if recipe.data.root and is_hf_source(recipe.data.root):
        changes["data.root"] = normalise_source(recipe.data.root)
    elif is_wds(recipe.data.root):
        changes["data.root"] = absolute_spec(recipe.data.root)
        if recipe.data.val_root:
            changes["data.val_root"] = absolute_spec(recipe.data.val_root)
    elif recipe.data.root:
        changes["data.root"] = str(Path(recipe.data.root).expanduser().resolve())
    if recipe.data.labels:
        changes["data.labels"] = str(manifest_path(recipe.data.labels, recipe.data.root).resolve())
    if recipe.starts_from_run:
        changes["model.name"] = str(Path(recipe.model.name).expanduser().resolve())
    if recipe.distill.teacher:
        changes["distill.teacher"] = str(Path(recipe.distill.teacher).expanduser().resolve())
    return recipe.replace(changes)


def resume_checkpoint(recipe: Recipe, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (``runtime.resume``), after checking the run is the same run."""
    if recipe.runtime.resume is None:
        return None
    saved = Recipe.from_yaml(run_dir / RUN_RECIPE).to_dict()
    wanted = recipe_for_disk(recipe, run_dir).to_dict()
    for section, values in wanted.items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            old = saved.get(section, {}).get(key) if key else saved.get(section)
            if old != value:
                name = f"{section}.{key}" if key else section
                raise FinetuneError(f"--resume: {name} is `{value}` but the run was started with `{old}`; resume "
                                    f"with the run's own recipe (finetune train {run_dir / RUN_RECIPE} --resume)")
    if recipe.runtime.resume == "latest":
        checkpoint = find_checkpoint(run_dir)
        if checkpoint is None:
            raise FinetuneError(f"--resume: `{run_dir}` has no complete checkpoint yet; start it again with "
                                "--overwrite")
        return checkpoint
    checkpoint = Path(recipe.runtime.resume)
    if not checkpoint.is_dir():
        raise FinetuneError(f"--resume `{checkpoint}`: no such checkpoint directory; use --resume alone for the "
                            f"latest one in {run_dir / RUN_CHECKPOINTS}")
    return checkpoint


def create_run_dir(run_dir: Path, accelerator: Accelerator, overwrite: bool) -> None:
    """Make the folder; with ``overwrite`` remove what a previous run wrote (nothing else)."""
    if accelerator.is_main_process:
        if overwrite:  # remove a previous run's files, so nothing stale is mistaken for this run's
            for pattern in RUN_ARTEFACTS:
                for path in run_dir.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        if elastic_job() is not None:
            write_text(run_dir / RUN_JOB, elastic_job() + "\n")
    accelerator.wait_for_everyone()


def report_split(split: FolderSplit, run_dir: Path, accelerator: Accelerator) -> None:
    """Print the split and its warnings; list skipped images in ``skipped.txt``."""
    accelerator.print(
        f"data {split.root}: {len(split.classes)} classes, {len(split.train)} train / {len(split.val)} val images"
        f"; {split.layout}"
    )
    for warning in split.warnings:
        accelerator.print(f"warning: {warning}")
    if split.skipped:
        accelerator.print(f"skipped {len(split.skipped)} unreadable image(s); list in {run_dir / RUN_SKIPPED}")
        if accelerator.is_main_process:
            write_skipped(split.skipped, run_dir / RUN_SKIPPED)


def model_meta(recipe: Recipe, split: FolderSplit, data_config: dict, model: nn.Module,
               source_meta: dict[str, Any] | None, world_size: int) -> dict[str, Any]:
    """What ``model.json`` records for a training run (:func:`finetune.rundir.make_run_meta` plus how it
    was trained); ``status`` stays ``running`` until the final evaluation."""
    source = dict(source_meta or {})
    extra: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "strategy": recipe.resolved_strategy,
        "data": {"root": str(split.root), "layout": split.layout, "train_images": len(split.train),
                 "val_images": len(split.val), "skipped_images": len(split.skipped)},
        "world_size": world_size,
        "status": "running",
    }
    if source_meta is not None:
        extra["started_from"] = recipe.model.name
    if recipe.distill.teacher is not None:
        extra["teacher"] = recipe.distill.teacher
    # a model from hf-hub:/local-dir: is recorded as its timm architecture (the folder may go away)
    architecture = source["architecture"] if source_meta else recipe.model.name
    if model_source(architecture) is not None:
        architecture = model.pretrained_cfg["architecture"]
    return make_run_meta(architecture=architecture,
                         classes=split.classes, data_config=data_config,
                         builder=source.get("builder"), builder_kwargs=source.get("builder_kwargs"),
                         separable_plan=source.get("separable_plan"),
                         weights_source=model.pretrained_cfg.get("weights_source"), extra=extra)


def check_same_classes(run: str, run_classes: list[str], data_classes: list[str]) -> None:
    """A run continued or distilled on a folder must see the classes it was trained on."""
    if list(run_classes) != list(data_classes):
        raise FinetuneError(
            f"`{run}` was trained on classes {', '.join(run_classes[:6])}{'…' if len(run_classes) > 6 else ''} "
            f"but the data folder has {', '.join(data_classes[:6])}{'…' if len(data_classes) > 6 else ''}; "
            "use the same class folders (or train a new head from a timm model name)"
        )
