"""Training checkpoints that survive ``kill -9`` at any instant, and exact resume from them.

A checkpoint is a directory ``RUN/checkpoints/step-<updates>/`` holding

* ``model.safetensors`` (the training model, LoRA wrappers included), ``ema.safetensors``;
* ``trainer.pt``: optimizer, LR-scheduler and fp16 grad-scaler state, the data position (phase, epochs done,
  batches consumed in the current epoch, optimizer updates), the running epoch sums, the
  history so far and the best epoch; loaded with ``torch.load(weights_only=True)`` only;
* ``rng-rank<r>.pt``: every process's torch, Python and NumPy generator states.

It is written into ``step-<n>.tmp/``, each file fsynced, then renamed into place (a directory
rename is atomic on POSIX) and only then named in ``checkpoints/latest``; older checkpoints are
deleted after that, keeping the newest ``keep``. A kill at any instant therefore leaves either
the previous checkpoint or the new one complete and named, never a half-written one.

>>> from finetune.train.checkpoints import find_checkpoint                  # doctest: +SKIP
>>> find_checkpoint("runs/photos")                             # doctest: +SKIP
PosixPath('runs/photos/checkpoints/step-00000120')
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.io import atomic_path, fsync_dir, model_state_dict, safe_torch_load, save_weights, write_text
from finetune.errors import FinetuneError, UnsafeFileError, one_line
from finetune.rundir import RUN_CHECKPOINTS

CHECKPOINTS = RUN_CHECKPOINTS
LATEST = "latest"
COMPLETE = "trainer.pt"  # written last: a directory without it is not a checkpoint


@dataclass
class Position:
    """Where training stands: resume continues from exactly here."""

    phase: int = 0                # index into plan_phases(recipe)
    epochs_done: int = 0          # whole epochs finished (over all phases)
    batches: int = 0              # batches of epoch ``epochs_done + 1`` already trained
    updates: int = 0              # optimizer updates in the current phase (the LR schedule's step)
    total_updates: int = 0        # optimizer updates over the run (the EMA's step)


def rng_state() -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                        int(has_gauss), float(gauss)),
             "python": (version, list(internal), gauss_next)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states :func:`rng_state` returned (CUDA ones only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`~finetune.io.atomic_path` (written, fsynced, renamed)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(run_dir: Path, accelerator, *, model: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, scheduler: Any, position: Position,
                    extra: dict[str, Any], rank_state: dict[str, Any], keep: int = 2,
                    keep_epoch: int | None = None) -> Path:
    """Write a checkpoint atomically (every process calls this; rank 0 writes the shared files).

    ``rank_state`` is this process's own state besides its RNGs (its running epoch sums). The
    newest ``keep`` checkpoints stay, and the end-of-epoch one of epoch ``keep_epoch`` (the best).
    """
    root = run_dir / CHECKPOINTS
    name = f"step-{position.total_updates:08d}-e{position.epochs_done:03d}b{position.batches:05d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob("step-*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_torch({**rng_state(), "rank_state": rank_state}, tmp / f"rng-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_weights(model_state_dict(model), tmp / "model.safetensors")
        if ema is not None:
            save_weights(model_state_dict(ema), tmp / "ema.safetensors")
        trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "position": asdict(position), "world_size": accelerator.num_processes, **extra}
        _save_torch(trainer, tmp / COMPLETE)  # every file in tmp is now fsynced, the folder too
        if final.exists():  # the same position saved twice (epoch end right after a step save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        write_text(root / LATEST, name + "\n")
        kept = f"-e{keep_epoch:03d}b00000" if keep_epoch is not None else None
        complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-keep]:  # the previous ones go only once the new one is named
            if kept is None or not old.name.endswith(kept):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run's complete checkpoints, newest first (the one ``checkpoints/latest`` names leads)."""
    root = Path(run_dir) / CHECKPOINTS
    found = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                    and (p / COMPLETE).is_file()), reverse=True)
    latest = root / LATEST
    try:
        named = root / latest.read_text().strip() if latest.is_file() else None
    except (OSError, UnicodeDecodeError):  # a torn `latest`: the names in the folder still order them
        named = None
    if named in found:
        found.remove(named)
        found.insert(0, named)
    return found


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (``checkpoints/latest``, else the newest complete one)."""
    found = complete_checkpoints(run_dir)
    return found[0] if found else None


def checkpoint_size(path: Path) -> int:
    """Bytes on disk of one checkpoint directory."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def load_latest_checkpoint(run_dir: str | os.PathLike, process_index: int,
                           warn: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that reads back whole, and its state; an unreadable newer one (truncated by
    a full disk, or torn on a filesystem without atomic rename) is passed over with a warning.

    Every file of a candidate is read, every process's RNG file included, so all processes of a
    run (reading the same files) settle on the same checkpoint.
    """
    for path in complete_checkpoints(run_dir):
        try:
            state = load_checkpoint(path, process_index)
            for rng_file in path.glob("rng-rank*.pt"):
                safe_torch_load(rng_file, "checkpoint")
            return path, state
        except UnsafeFileError:  # pickled code is refused, not passed over
            raise
        except Exception as error:  # noqa: BLE001 -- any damage means: try the previous checkpoint
            warn(f"warning: checkpoint {path.name} is unreadable ({one_line(error)}); falling back to the "
                 "previous one")
    raise FinetuneError(f"--resume: no readable checkpoint in {Path(run_dir) / CHECKPOINTS}; start the run again "
                        "with --overwrite")


def load_checkpoint(path: Path, process_index: int) -> dict[str, Any]:
    """Read a checkpoint: tensors via safetensors, the rest with ``weights_only=True``."""
    if not (path / COMPLETE).is_file():
        raise FinetuneError(f"`{path}` is not a complete checkpoint (no {COMPLETE}); pass a "
                            f"checkpoints/step-* directory or --resume latest")
    trainer = safe_torch_load(path / COMPLETE, "checkpoint")
    rng_file = path / f"rng-rank{process_index}.pt"
    rng = safe_torch_load(rng_file, "checkpoint") if rng_file.is_file() else None
    state = {**trainer, "rng": rng, "model": load_file(path / "model.safetensors")}
    if (path / "ema.safetensors").is_file():
        state["ema"] = load_file(path / "ema.safetensors")
    state["position"] = Position(**trainer["position"])
    return state
