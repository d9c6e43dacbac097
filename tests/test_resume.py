"""Exact resume after a real ``kill -9``, checkpoints that survive kills during saves, refused
pickles, and a non-finite loss that stops the run with its last checkpoint intact.

Every run here is a real ``finetune train`` subprocess; kills are SIGKILL at random moments.
"""

from __future__ import annotations

import csv
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.data.demo import write_demo_folder
from finetune.train.checkpoints import find_checkpoint, load_checkpoint
from helpers import run_finetune, start_finetune

EPOCHS, BATCHES = 2, 5  # 160 training images, batch 32: 10 optimizer updates in all
TRAIN = ["--model", "mobilenetv2_100", "--weights", "offline", "--epochs", str(EPOCHS), "--img-size", "32",
         "--batch-size", "32", "--memory-format", "contiguous", "--checkpoint-every", "1", "--no-progress"]
TIMING = ("epoch_seconds", "train_images_per_s")


finetune, run = start_finetune, run_finetune


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_folder(tmp_path_factory.mktemp("resume") / "data", train_per_class=16, val_per_class=4)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run("train", "--data", str(data), *TRAIN, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(find_checkpoint(run_dir) / "model.safetensors")


def _log(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader((run_dir / "log.csv").open())]


def _latest_updates(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _kill_after(proc: subprocess.Popen, run_dir: Path, updates: int, jitter: float, timeout: float = 240) -> None:
    """SIGKILL ``proc`` a random moment after its checkpoint for ``updates`` updates is named."""
    deadline = time.monotonic() + timeout
    while _latest_updates(run_dir) < updates:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.01)
    time.sleep(jitter)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _final(a), _final(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ after resume"
    best_a, best_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert _log(a) == _log(b)


def _kill_and_resume(data: Path, out: Path, kill_at: int, jitter: float) -> None:
    proc = finetune("train", "--data", str(data), *TRAIN, "--out", str(out))
    _kill_after(proc, out, kill_at, jitter)
    assert proc.returncode == -signal.SIGKILL
    resumed = run("train", str(out / "recipe.yaml"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout


@pytest.mark.parametrize("trial", range(2))
def test_resume_after_sigkill_is_bit_identical(data, reference, tmp_path, trial):
    rng = random.Random(1000 + trial)
    _kill_and_resume(data, tmp_path / "run", kill_at=rng.randint(1, EPOCHS * BATCHES - 1), jitter=rng.uniform(0, 0.3))
    _assert_same_run(reference, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_resume_after_sigkill_ten_random_points(data, reference, tmp_path, trial):
    rng = random.Random(trial)
    _kill_and_resume(data, tmp_path / "run", kill_at=rng.randint(1, EPOCHS * BATCHES - 1), jitter=rng.uniform(0, 0.5))
    _assert_same_run(reference, tmp_path / "run")


def _kill_during_saves(data: Path, out: Path, seed: int) -> None:
    """Kill while a checkpoint is written after every update; the latest named one must load."""
    rng = random.Random(seed)
    proc = finetune("train", "--data", str(data), *TRAIN, "--out", str(out))
    _kill_after(proc, out, rng.randint(1, EPOCHS * BATCHES - 2), rng.uniform(0, 0.2))
    checkpoint = find_checkpoint(out)
    assert checkpoint is not None
    state = load_checkpoint(checkpoint, 0)  # raises on a damaged file
    assert state["model"] and state["optimizer"]["state"]
    assert len([p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")]) <= 2


@pytest.mark.parametrize("trial", range(3))
def test_kill_during_saves_leaves_a_loadable_checkpoint(data, tmp_path, trial):
    _kill_during_saves(data, tmp_path / "run", seed=trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_kill_during_saves_twenty_trials(data, tmp_path, trial):
    _kill_during_saves(data, tmp_path / "run", seed=100 + trial)


# --------------------------------------------------------------------------- refused pickles

class _Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Evil(marker)}, handle)
    return path


def test_malicious_pickles_are_refused_everywhere(data, reference, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_pickle(tmp_path / "evil.pth", marker)
    # a checkpoint whose trainer.pt is the malicious pickle
    evil_run = tmp_path / "evil-run"
    subprocess.run(["cp", "-r", str(reference), str(evil_run)], check=True)
    checkpoint = find_checkpoint(evil_run)
    _evil_pickle(checkpoint / "trainer.pt", marker)
    for rank in checkpoint.glob("rng-rank*.pt"):
        _evil_pickle(rank, marker)
    (evil_run / "recipe.yaml").write_text((evil_run / "recipe.yaml").read_text().replace(str(reference),
                                                                                         str(evil_run)))
    commands = [
        ["train", "--data", str(data), "--weights", str(evil), "--epochs", "1", "--out", str(tmp_path / "a")],
        ["train", str(evil_run / "recipe.yaml"), "--resume"],
        ["train", str(evil_run / "recipe.yaml"), "--resume", str(checkpoint)],
        ["convert", "resnet18", "--weights", str(evil), "--rank", "1", "--out", str(tmp_path / "c")],
        ["convert", "torchvision.models:resnet18", "--weights", str(evil), "--rank", "1", "--out", str(tmp_path / "d")],
    ]
    for argv in commands:
        result = run(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (argv, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("finetune: error: "), (argv, result.stderr[-2000:])
        assert not marker.exists(), f"{argv} ran the pickle's code"


# --------------------------------------------------------------------------- numerical faults

def test_non_finite_loss_stops_at_once_and_keeps_the_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    # an absurd LR for the body phase: the head epoch trains normally and is checkpointed,
    # then the loss blows up within a few body steps
    result = run("train", "--data", str(data), *TRAIN, "--out", str(out), "--lr", "1e-3", "--body-lr-mult", "1e33")
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("finetune: error: loss became") and "step" in message and "lr" in message
    assert "lower --lr" in message
    checkpoint = find_checkpoint(out)
    state = load_checkpoint(checkpoint, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert state["position"].epochs_done >= 1
