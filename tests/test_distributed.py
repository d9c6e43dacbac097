"""Real multi-process training on CPU (gloo) under torch's elastic agent: world size 2 asserted from
the run directory, the same result as one process at the same global batch, the same weights through
``torchrun``, a killed worker restarting the group and finishing bit-identical (``--max-restarts``),
a killed job resuming bit-identical, SIGTERM to the launcher checkpointing every worker, and a
simulated two-machine run (c10d rendezvous) on one host."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.data.demo import write_demo_folder
from finetune.train.checkpoints import find_checkpoint, load_checkpoint
from finetune.train.launch import EXIT_PREEMPTED, free_port
from helpers import run_finetune, start_finetune, wait_for_checkpoint

COMMON = ["--model", "mobilenetv2_100", "--weights", "offline", "--epochs", "2", "--img-size", "32",
          "--memory-format", "contiguous", "--no-progress"]
TWO = [*COMMON, "--batch-size", "16", "--num-processes", "2", "--checkpoint-every", "1"]
UPDATES = 10  # 2 epochs × 5 global batches of 32


def start(*args: str) -> subprocess.Popen:
    return start_finetune(*args, start_new_session=True)  # its own group: a test can kill the whole job


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = run_finetune(*args, timeout=timeout, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def world_size(run_dir: Path) -> int:
    return json.loads((run_dir / "model.json").read_text())["world_size"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(find_checkpoint(run_dir) / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    best_a, best_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def workers(job: subprocess.Popen) -> list[int]:
    """The worker processes the launcher (the elastic agent) started."""
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                                           text=True).stdout.split()]


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
    run("train", "--data", str(data), *TWO, "--out", str(out))
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


@pytest.mark.slow
def test_torchrun_gives_the_same_weights_as_the_launcher(data, two_processes, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "finetune.cli", "train", "--data", str(data), *COMMON, "--batch-size", "16",
                           "--checkpoint-every", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert world_size(out) == 2
    assert_same_weights(two_processes, out)


def _kill_a_worker_and_finish(data: Path, out: Path, kill_at: int, jitter: float) -> subprocess.CompletedProcess:
    job = start("train", "--data", str(data), *TWO, "--max-restarts", "1", "--out", str(out))
    wait_for_checkpoint(job, out, kill_at)
    time.sleep(jitter)
    pids = workers(job)
    assert len(pids) == 2, pids
    os.kill(random.Random(kill_at).choice(pids), signal.SIGKILL)  # one worker dies mid-epoch
    stdout, stderr = job.communicate(timeout=300)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def test_a_killed_worker_restarts_the_group_which_finishes_bit_identical(data, two_processes, tmp_path):
    result = _kill_a_worker_and_finish(data, tmp_path / "run", kill_at=4, jitter=0.05)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restarting the group" in result.stderr and "resuming from" in result.stdout
    assert_same_weights(two_processes, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_a_killed_worker_restarts_bit_identical_ten_random_points(data, two_processes, tmp_path, trial):
    rng = random.Random(2000 + trial)
    result = _kill_a_worker_and_finish(data, tmp_path / "run", kill_at=rng.randint(1, UPDATES - 1),
                                       jitter=rng.uniform(0, 0.3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(two_processes, tmp_path / "run")


@pytest.mark.slow
def test_two_process_run_resumes_bit_identical_after_the_job_is_killed(data, two_processes, tmp_path):
    out = tmp_path / "run"
    job = start("train", "--data", str(data), *TWO, "--out", str(out))
    wait_for_checkpoint(job, out, 6)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: launcher and both workers, as a node failure would
    job.wait()
    resumed = run("train", str(out / "recipe.yaml"), "--resume", "--num-processes", "2", "--no-progress")
    assert "resuming from" in resumed.stdout and world_size(out) == 2
    assert_same_weights(two_processes, out)


def test_sigterm_to_the_launcher_checkpoints_every_worker_and_resume_is_bit_identical(data, two_processes,
                                                                                       tmp_path):
    out = tmp_path / "run"
    job = start("train", "--data", str(data), *TWO, "--out", str(out))
    wait_for_checkpoint(job, out, 3)
    signalled = time.monotonic()
    job.send_signal(signal.SIGTERM)  # the launcher only, as Kubernetes signals a container's first process
    _, stderr = job.communicate(timeout=60)
    assert time.monotonic() - signalled < 60
    assert job.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "SIGTERM" in stderr and "--resume" in stderr.strip().splitlines()[-1]
    stopped_at = load_checkpoint(find_checkpoint(out), 0)["position"]
    assert 3 <= stopped_at.total_updates < UPDATES, "the workers did not checkpoint before stopping"
    run("train", str(out / "recipe.yaml"), "--resume", "--num-processes", "2", "--no-progress")
    assert_same_weights(two_processes, out)


def test_killing_one_worker_without_restarts_stops_the_run_and_leaves_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    job = start("train", "--data", str(data), *TWO, "--epochs", "4", "--out", str(out))
    wait_for_checkpoint(job, out, 1)
    pids = workers(job)
    assert len(pids) == 2
    os.kill(max(pids), signal.SIGKILL)
    killed_at = time.monotonic()
    job.wait(timeout=60)
    assert time.monotonic() - killed_at < 60
    assert job.returncode not in (0, None)
    err = job.stderr.read().strip().splitlines()
    assert err and "failed (killed by SIGKILL)" in err[-1] and "--resume" in err[-1], err[-3:]
    state = load_checkpoint(find_checkpoint(out), 0)
    assert state["world_size"] == 2


@pytest.mark.slow
def test_simulated_two_machine_run(data, one_process, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [start("train", "--data", str(data), *COMMON, "--batch-size", "16", "--num-machines", "2",
                   "--machine-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}", "--out", str(out))
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert world_size(out) == 2
    m1 = json.loads((one_process / "metrics.json").read_text())
    m2 = json.loads((out / "metrics.json").read_text())
    assert m1["top1"] == m2["top1"] and abs(m1["loss"] - m2["loss"]) < 1e-3


@pytest.mark.parametrize("flags, named", [(["--num-processes", "0"], "--num-processes"),
                                          (["--num-machines", "2", "--machine-rank", "2"], "--num-processes"),
                                          (["--num-processes", "2", "--max-restarts", "-1"], "--max-restarts"),
                                          (["--num-machines", "2"], "--rdzv-endpoint"),
                                          (["--num-processes", "2", "--rdzv-endpoint", "nohost"], "--rdzv-endpoint")])
def test_impossible_launch_settings_are_one_line_errors(data, flags, named):
    proc = start("train", "--data", str(data), *flags)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], err
