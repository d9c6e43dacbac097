"""Helpers shared by several test modules."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn


def start_finetune(*args: str, **popen_kwargs) -> subprocess.Popen:
    """``python -m finetune.cli ARGS`` in a real subprocess (one thread, output captured as text)."""
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            **popen_kwargs)


def run_finetune(*args: str, timeout: float = 300, **popen_kwargs) -> subprocess.CompletedProcess:
    """:func:`start_finetune` and wait for it."""
    proc = start_finetune(*args, **popen_kwargs)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def latest_updates(run_dir) -> int:
    """Optimizer updates of the checkpoint ``RUN/checkpoints/latest`` names (0 while there is none)."""
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def wait_for_checkpoint(job: subprocess.Popen, run_dir, updates: int, timeout: float = 240) -> None:
    """Poll until ``job`` has named a checkpoint of at least ``updates`` updates (fail if it ends first)."""
    import time

    deadline = time.monotonic() + timeout
    while latest_updates(run_dir) < updates:
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine + running stats: timm zero-inits the last BN of each residual block,
    which would hide any error in the conv before it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())
