"""Real multi-process training on CPU (gloo): world size 2 asserted from the run directory, the
same result as one process at the same global batch, exact resume after killing the job, a
killed worker stopping the whole run, and a simulated two-machine run on one host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.data.demo import write_demo_folder
from finetune.train.launch import free_port
from finetune.train.checkpoints import find_checkpoint, load_checkpoint
from helpers import run_finetune, start_finetune

COMMON = ["--model", "mobilenetv2_100", "--weights", "offline", "--epochs", "2", "--img-size", "32",
          "--memory-format", "contiguous", "--no-progress"]


def start(*args: str) -> subprocess.Popen:
    return start_finetune(*args, start_new_session=True)  # its own group: a test can kill the whole job


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = run_finetune(*args, timeout=timeout, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def world_size(run_dir: Path) -> int:
    return json.loads((run_dir / "model.json").read_text())["world_size"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 160 training images: 5 global batches of 32 in every epoch, no ragged last batch
    return write_demo_folder(tmp_path_factory.mktemp("ddp") / "data", train_per_class=16, val_per_class=5)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run("train", "--data", str(data), *COMMON, "--batch-size", "32", "--out", str(out))
    assert world_size(out) == 1
    return out


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    run("train", "--data", str(data), *COMMON, "--batch-size", "16", "--num-processes", "2",
        "--checkpoint-every", "1", "--out", str(out))
    assert world_size(out) == 2, "the two processes did not form one process group"
    return out


def test_two_processes_match_one_process_at_the_same_global_batch(one_process, two_processes):
    m1 = json.loads((one_process / "metrics.json").read_text())
    m2 = json.loads((two_processes / "metrics.json").read_text())
    assert m1["num_samples"] == m2["num_samples"] == 50  # gathered exactly: no padded duplicates
    assert m1["top1"] == m2["top1"]
    # Same images, same augmentations, same updates: only the reduction order differs (measured
    # 1e-4 on the loss); the tolerance stated in the README is 1e-3 on val loss, equal top-1.
    assert abs(m1["loss"] - m2["loss"]) < 1e-3
    w1, w2 = load_file(one_process / "model.safetensors"), load_file(two_processes / "model.safetensors")
    # Adam divides by sqrt(v): for weights whose gradient is ~0, reduction-order noise can flip the
    # step's sign, so a few tensors move apart by up to ~lr per step. Measured: relative difference
    # ||w1 - w2|| / ||w1|| median 6e-6, worst 6e-3 (a 1×1 conv); val loss 1.83121 vs 1.83124.
    rel = sorted(((w1[k] - w2[k]).norm() / w1[k].norm().clamp(min=1e-12)).item()
                 for k in w1 if w1[k].is_floating_point())
    assert rel[len(rel) // 2] < 1e-4 and rel[-1] < 2e-2, (rel[len(rel) // 2], rel[-1])


def test_two_process_run_resumes_bit_identical_after_the_job_is_killed(data, two_processes, tmp_path):
    out = tmp_path / "run"
    job = start("train", "--data", str(data), *COMMON, "--batch-size", "16", "--num-processes", "2",
                "--checkpoint-every", "1", "--out", str(out))
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.is_file() and int(latest.read_text().split("-")[1]) >= 6):
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: launcher and both workers, as a pre-emption would
    job.wait()
    resumed = run("train", str(out / "recipe.yaml"), "--resume", "--num-processes", "2", "--no-progress")
    assert "resuming from" in resumed.stdout and world_size(out) == 2
    a = load_file(find_checkpoint(two_processes) / "model.safetensors")
    b = load_file(find_checkpoint(out) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killing_one_worker_stops_the_run_and_leaves_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    job = start("train", "--data", str(data), *COMMON, "--epochs", "4", "--batch-size", "16",
                "--num-processes", "2", "--checkpoint-every", "1", "--out", str(out))
    deadline = time.monotonic() + 240
    while find_checkpoint(out) is None:
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    os.kill(int(children[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    job.wait(timeout=60)
    assert time.monotonic() - killed_at < 60
    assert job.returncode not in (0, None)
    err = job.stderr.read().strip().splitlines()
    assert err and "process 1 failed" in err[-1] and "--resume" in err[-1], err[-3:]
    state = load_checkpoint(find_checkpoint(out), 0)
    assert state["world_size"] == 2


@pytest.mark.slow
def test_simulated_two_machine_run(data, one_process, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [start("train", "--data", str(data), *COMMON, "--batch-size", "16", "--num-machines", "2",
                   "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1", "--main-process-port", str(port),
                   "--out", str(out)) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert world_size(out) == 2
    m1 = json.loads((one_process / "metrics.json").read_text())
    m2 = json.loads((out / "metrics.json").read_text())
    assert m1["top1"] == m2["top1"] and abs(m1["loss"] - m2["loss"]) < 1e-3


@pytest.mark.parametrize("flags", [["--num-processes", "0"], ["--num-machines", "2", "--machine-rank", "2"]])
def test_impossible_launch_settings_are_one_line_errors(data, flags):
    proc = start("train", "--data", str(data), *flags)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--num-processes" in lines[0], err
