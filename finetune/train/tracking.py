"""Experiment trackers through accelerate: ``runtime.report_to`` (``--report-to``).

``finetune train --report-to tensorboard,mlflow`` hands the names to
``Accelerator(log_with=..., project_dir=RUN)``; :func:`start_tracking` records the recipe as the
run's hyper-parameters, :func:`log_epoch` every ``log.csv`` column at step = epoch,
:func:`log_update` the loss and head LR at step = optimizer updates, and ``fit`` ends the trackers
(:func:`end_tracking`, accelerate's ``end_training`` without ending the process group) also
when training raises. accelerate logs on the main process only. ``log.csv`` is written either way.

>>> resolve_trackers("none")
[]
>>> flatten_config({"optim": {"lr": 0.001, "betas": [0.9, 0.99]}, "runtime": {"out": None}})
{'optim.lr': 0.001, 'optim.betas': '[0.9, 0.99]', 'runtime.out': 'None'}
>>> epoch_values({"epoch": 2, "phase": "body", "lr_head": 0.1, "val_top1": 0.5, "train_images_per_s": 9.0})
{'phase': 'body', 'lr/head': 0.1, 'val/top1': 0.5, 'train/images_per_s': 9.0}
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import (LoggerType, is_aim_available, is_clearml_available, is_comet_ml_available,
                              is_dvclive_available, is_mlflow_available, is_swanlab_available,
                              is_tensorboard_available, is_trackio_available, is_wandb_available)

from finetune.config import Recipe
from finetune.errors import FinetuneError

__all__ = ["PROJECT_NAME", "end_tracking", "epoch_values", "flatten_config", "install_hint", "log_epoch", "log_update",
           "resolve_trackers", "start_tracking", "tracking"]

# accelerate's project name: TensorBoard writes RUN/<PROJECT_NAME>/; the MLflow experiment, W&B project
PROJECT_NAME = "finetune-vision"
# tracker → (PyPI package, our extra or None)
INSTALL = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
           "aim": ("aim", "aim"), "comet_ml": ("comet_ml", "comet"), "clearml": ("clearml", "clearml"),
           "dvclive": ("dvclive", None), "swanlab": ("swanlab", None), "trackio": ("trackio", None)}
# log.csv column → tracker key (``epoch`` is the step)
EPOCH_KEYS = {"phase": "phase", "lr_head": "lr/head", "lr_body": "lr/body", "train_loss": "train/loss",
              "train_top1": "train/top1", "val_loss": "val/loss", "val_top1": "val/top1",
              "val_macro_f1": "val/macro_f1",
              "epoch_seconds": "time/epoch_seconds", "train_images_per_s": "train/images_per_s"}


def _available(name: str) -> bool:
    """accelerate's own check (looked up at call time, so a test can patch it here)."""
    checks = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available,
              "aim": is_aim_available, "comet_ml": is_comet_ml_available, "clearml": is_clearml_available,
              "dvclive": is_dvclive_available, "swanlab": is_swanlab_available, "trackio": is_trackio_available}
    return bool(checks[name]())


def install_hint(name: str) -> str:
    """``pip install tensorboard`` (or ``pip install 'finetune-vision[tensorboard]'``)."""
    package, extra = INSTALL[name]
    return f"pip install {package}" + (f" (or pip install 'finetune-vision[{extra}]')" if extra else "")


def resolve_trackers(report_to: str) -> list[str]:
    """accelerate's tracker names for ``runtime.report_to``; a missing package is a one-line error.

    ``all`` is every tracker installed (and an error when there is none).
    """
    if report_to == "none":
        return []
    known = [str(t.value) for t in LoggerType if t != LoggerType.ALL]
    if report_to == "all":
        names = [n for n in known if n in INSTALL and _available(n)]
        if not names:
            raise FinetuneError("--report-to all: no experiment tracker is installed; "
                                f"e.g. {install_hint('tensorboard')}")
        return names
    names = report_to.split(",")
    for name in names:
        if name not in known:
            raise FinetuneError(f"--report-to {name}: this accelerate has no such tracker (it has "
                                f"{', '.join(known)}); upgrade accelerate or choose another")
        if not _available(name):
            raise FinetuneError(f"--report-to {name}: the {name} package is not installed; {install_hint(name)}")
    return names


_MLFLOW_URI_SET: str | None = None  # the store this module pointed MLflow at (a later run gets its own)


def tracking(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """The ``Accelerator`` arguments for the recipe's trackers (none: no arguments)."""
    names = resolve_trackers(recipe.runtime.report_to)
    global _MLFLOW_URI_SET
    if "mlflow" in names and os.environ.get("MLFLOW_TRACKING_URI") in (None, _MLFLOW_URI_SET):  # not the user's
        # accelerate leaves MLflow's store at its default (mlflow 3: a SQLite file in the working
        # directory, which needs SQLAlchemy); a file store in the run directory, like the other trackers'
        # (mlflow 3 keeps the file store, "in maintenance mode", behind an opt-in)
        os.environ["MLFLOW_TRACKING_URI"] = _MLFLOW_URI_SET = (Path(run_dir).resolve() / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return {"log_with": names, "project_dir": str(run_dir)} if names else {}


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with plain values (bool, int, float, str) that every tracker accepts as hyper-parameters."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def start_tracking(accelerator: Accelerator, recipe: Recipe) -> None:
    """Start the trackers (when the run has any) with the recipe as hyper-parameters."""
    if accelerator.log_with:
        name = Path(recipe.runtime.out or "run").name
        accelerator.init_trackers(PROJECT_NAME, config=flatten_config(recipe.to_dict()),
                                  init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name}})


def epoch_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``log.csv`` row as tracker values (every column but ``epoch``, which is the step)."""
    return {EPOCH_KEYS.get(k, k): v for k, v in row.items() if k != "epoch"}


def log_epoch(accelerator: Accelerator, row: Mapping[str, Any]) -> None:
    """One epoch's row at step = epoch (a no-op without trackers)."""
    if accelerator.trackers:
        accelerator.log(epoch_values(row), step=int(row["epoch"]))


def log_update(accelerator: Accelerator, step: int, loss: torch.Tensor, lr: float) -> None:
    """One optimizer update's loss and head LR at step = updates so far. Without trackers (and on
    every process but the main one) it returns at once: no ``.item()`` sync per step."""
    if accelerator.trackers:
        accelerator.log({"train/step_loss": loss.item(), "lr/head_step": lr}, step=step)


def end_tracking(accelerator: Accelerator) -> None:
    """Finish the trackers (files flushed and closed), what ``accelerator.end_training()`` does except
    that it keeps the process group: a process may run several fits (``task: convert``, notebooks)."""
    trackers, accelerator.trackers = accelerator.trackers, []
    for tracker in trackers:
        tracker.finish()
