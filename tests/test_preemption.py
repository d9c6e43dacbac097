"""Pre-emption, early stopping and damaged checkpoints, each with a real ``finetune train`` subprocess:
SIGTERM/SIGUSR1 make the run checkpoint and exit 75, ``--resume`` continues bit-identically; a run
whose validation loss rises stops after ``--patience`` epochs with the best epoch kept, and a resume
after it trains nothing; a truncated latest checkpoint falls back to the previous one."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.data.demo import write_demo_folder
from finetune.train.checkpoints import complete_checkpoints, find_checkpoint, load_checkpoint
from finetune.train.launch import EXIT_PREEMPTED
from helpers import run_finetune, start_finetune, wait_for_checkpoint

TRAIN = ["--model", "mobilenetv2_100", "--weights", "offline", "--epochs", "2", "--img-size", "32",
         "--batch-size", "32", "--memory-format", "contiguous", "--checkpoint-every", "1", "--no-progress"]
UPDATES = 10  # 160 training images, batch 32, 2 epochs


def ok(*args: str) -> None:
    result = run_finetune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def same_final_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(find_checkpoint(r) / "model.safetensors") for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "log.csv").open()))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_folder(tmp_path_factory.mktemp("preempt") / "data", train_per_class=16, val_per_class=4)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    ok("train", "--data", str(data), *TRAIN, "--out", str(out))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_signal_checkpoints_exits_75_and_resume_is_bit_identical(data, reference, tmp_path, sig):
    out = tmp_path / "run"
    job = start_finetune("train", "--data", str(data), *TRAIN, "--out", str(out))
    wait_for_checkpoint(job, out, 2)
    signalled = time.monotonic()
    job.send_signal(sig)
    _, stderr = job.communicate(timeout=60)
    assert time.monotonic() - signalled < 60
    assert job.returncode == EXIT_PREEMPTED, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert sig.name in last and "--resume" in last and "checkpoint" in last, last
    position = load_checkpoint(find_checkpoint(out), 0)["position"]
    assert 2 <= position.total_updates < UPDATES
    assert json.loads((out / "model.json").read_text())["status"] == "running"
    resumed = ok("train", str(out / "recipe.yaml"), "--resume", "--no-progress")
    assert "resuming from" in resumed.stdout
    assert same_final_weights(reference, out), "weights differ from an uninterrupted run"
    assert [r["val_loss"] for r in log_rows(out)] == [r["val_loss"] for r in log_rows(reference)]


@pytest.fixture(scope="module")
def mislabelled(tmp_path_factory) -> Path:
    """A folder whose validation labels are a permutation of the training ones: the better the model
    learns the training classes, the higher its validation loss."""
    root = write_demo_folder(tmp_path_factory.mktemp("rising") / "data", train_per_class=16, val_per_class=4)
    classes = sorted(p.name for p in (root / "val").iterdir())
    for name in classes:
        (root / "val" / name).rename(root / "val" / f"{name}.tmp")
    for i, name in enumerate(classes):
        (root / "val" / f"{name}.tmp").rename(root / "val" / classes[(i + 1) % len(classes)])
    return root


def test_early_stopping_stops_at_the_right_epoch_keeps_the_best_and_resume_trains_nothing(mislabelled,
                                                                                           tmp_path):
    out = tmp_path / "run"
    result = ok("train", "--data", str(mislabelled), *TRAIN, "--epochs", "8",
                "--monitor", "val_loss", "--patience", "2", "--keep-checkpoints", "1",
                "--set", "runtime.keep_best_checkpoint=true", "--out", str(out))
    rows = log_rows(out)
    losses = [float(r["val_loss"]) for r in rows]
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    # the rule, checked against the log: stop once 2 epochs in a row did not beat the best loss
    assert len(rows) == best + 2 < 8, losses
    meta = json.loads((out / "model.json").read_text())
    assert meta["best_epoch"] == best and meta["stopped_early"]["after_epoch"] == best + 2
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == best
    assert "early stopping: val_loss has not improved for 2 epoch(s)" in result.stdout
    # the newest checkpoint and the best epoch's are kept
    kept = [p.name for p in complete_checkpoints(out)]
    assert len(kept) == 2 and kept[1].endswith(f"-e{best:03d}b00000"), kept
    best_checkpoint = load_file(complete_checkpoints(out)[1] / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], best_checkpoint[k]) for k in saved), "model.safetensors is not the best epoch"
    again = ok("train", str(out / "recipe.yaml"), "--resume", "--no-progress")
    assert "early stopping" in again.stdout and len(log_rows(out)) == len(rows)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(data, reference, tmp_path):
    out = tmp_path / "run"
    job = start_finetune("train", "--data", str(data), *TRAIN, "--out", str(out))
    wait_for_checkpoint(job, out, 7)
    job.send_signal(signal.SIGKILL)
    job.wait()
    newest, previous = complete_checkpoints(out)[:2]
    weights = newest / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a disk that filled up mid-write
    resumed = ok("train", str(out / "recipe.yaml"), "--resume", "--no-progress")
    assert f"checkpoint {newest.name} is unreadable" in resumed.stdout and "falling back" in resumed.stdout
    assert f"resuming from {previous}" in resumed.stdout
    assert same_final_weights(reference, out)


def test_monitor_and_patience_are_checked(data):
    for flags, named in ((["--monitor", "val_acc"], "optim.monitor"), (["--patience", "-1"], "optim.patience")):
        result = run_finetune("train", "--data", str(data), *flags)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr


def test_the_slurm_example_is_valid_bash_and_starts_a_shipped_recipe():
    import subprocess

    from finetune.config.lookup import find_recipe

    script = Path(__file__).resolve().parents[1] / "recipes" / "slurm" / "finetune.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--signal=B:USR1@" in text and "scontrol requeue" in text and "--resume" in text
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text and "SIGUSR1" in text
    default_recipe = text.split("RECIPE=${RECIPE:-", 1)[1].split("}", 1)[0]
    assert find_recipe(default_recipe).is_file()
