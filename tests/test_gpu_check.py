"""benchmarks/gpu_check.py: its --help (fast) and its whole --cpu-smoke run (slow), so that the script a
GPU machine gets for a few minutes is known to run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ("environment", "finetune_steps", "memory_format", "ddp", "resume", "compile")


def _leaves(value, path="") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _leaves(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _leaves(v, f"{path}[{i}]")]
    return [(path, value)]


def _not_finite(report: dict) -> list[str]:
    """Paths of non-finite numbers (the script writes them as the strings "nan" / "inf")."""
    return [p for p, v in _leaves(report) if (isinstance(v, float) and not math.isfinite(v))
            or v in ("nan", "inf", "-inf")]


def test_help():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--cpu-smoke" in result.stdout and "--budget-s" in result.stdout


@pytest.mark.slow
def test_cpu_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    # ~2 min on 2 idle cores, but a shared machine can make it 5-10x slower: the budget only stops a hang
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--budget-s", "900", "--out", str(out),
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=1200)
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == list(SECTIONS)
    failed = {name: r.get("error") for name, r in sections.items() if r.get("ok") is not True}
    assert not failed, f"{failed}\n{result.stdout[-3000:]}"
    assert result.returncode == 0 and report["all_ok"] is True
    assert not _not_finite(report)
    steps = sections["finetune_steps"]["runs"]
    assert set(steps) == {f"{m}/{p}" for m in ("tf_efficientnet_lite0", "mobilenetv2_100") for p in ("bf16", "fp16")}
    assert all(r["finite"] and r["decreased"] and r["img_per_s"] > 0 for r in steps.values())
    assert sections["ddp"]["world_size"] == 1 and sections["ddp"]["backend"] == "gloo"
    assert sections["resume"]["identical"] is True  # on CPU resume is exact (tests/test_resume.py)
    assert sections["compile"]["models"]["tiny_cnn"]["compile_s"] > 0
