"""`finetune convert` on a trained run: run directory, reload without SVD, eval, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from finetune import TrainConfig, evaluate, fit, load_model, predict
from finetune.conversion import convert_run


@pytest.fixture(scope="module")
def resnet_run(digits_folder, tmp_path_factory):
    """A small ResNet trained on the digits folder: dense 3x3 convs worth converting."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        cfg = TrainConfig(data=str(digits_folder), model="resnet10t", weights="none", epochs=3, img_size=32,
                          batch_size=32, lr=3e-3, out=str(tmp_path_factory.mktemp("runs") / "resnet"))
        return fit(cfg, progress=False)


def test_full_rank_conversion_is_exact_and_reloads(resnet_run, digits_folder, tmp_path):
    result = convert_run(resnet_run.run_dir, tmp_path / "full", rank="full", latency=False)
    assert result["report"]["layers"], "resnet10t has dense 3x3 convs to convert"
    student, _ = load_model(tmp_path / "full")  # rebuilt from the plan in model.json, no SVD
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(x), resnet_run.model(x), rtol=1e-4, atol=1e-4)
    teacher_metrics = evaluate(resnet_run.run_dir, digits_folder, out=tmp_path / "eval-t")
    student_metrics = evaluate(tmp_path / "full", digits_folder, out=tmp_path / "eval-s")
    assert student_metrics["top1"] == pytest.approx(teacher_metrics["top1"], abs=1 / 400)


def test_budget_conversion_with_calibration(resnet_run, digits_folder, tmp_path):
    out = tmp_path / "sep"
    result = convert_run(resnet_run.run_dir, out, macs=0.5, calib_data=digits_folder, calib_images=64)
    saved = json.loads((out / "convert.json").read_text())
    assert saved["report"]["macs_after"] <= 0.5 * saved["report"]["macs_before"] * 1.0001
    assert saved["calibration"]["images"] == 64
    assert 0.0 <= saved["agreement"]["top1_agreement"] <= 1.0
    assert {row["batch_size"] for row in saved["latency"]} == {1, 32}
    assert all(row["teacher_ms"] > 0 and row["student_ms"] > 0 for row in saved["latency"])
    meta = json.loads((out / "model.json").read_text())
    assert meta["separable_plan"] and meta["classes"] == resnet_run.classes
    # the converted run is a run like any other
    preds = predict(out, [digits_folder / "three"], top_k=2)
    assert len(preds) == 40 and all(len(p.labels) == 2 for p in preds)
    reloaded, _ = load_model(out)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in resnet_run.model.parameters())
    assert result["report"]["macs_ratio"] <= 0.5001


def test_nothing_to_convert_is_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "convert", "mobilenetv2_100", "--weights", "none", "--rank", "1",
         "--out", str(tmp_path / "x"), "--no-latency"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune: error:") and "nothing worth converting" in lines[0]
    assert not (tmp_path / "x").exists()
