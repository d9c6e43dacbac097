"""`finetune convert` on a trained run: run directory, reload without SVD, eval, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from finetune import Recipe, evaluate, fit, load_model, predict
from finetune.tasks.convert import convert_run


@pytest.fixture(scope="module")
def resnet_run(digits_folder, tmp_path_factory):
    """A small ResNet trained on the digits folder: dense 3x3 convs worth converting."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        cfg = Recipe(data=str(digits_folder), model="resnet10t", weights="none", epochs=3, img_size=32,
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
    assert saved["calibration"]["images"] == 64 and saved["calibration"]["refit"] is True
    converted = [layer for layer in saved["report"]["layers"] if layer["form"] != "dense"]
    assert converted and all(layer["output_error"] >= 0 for layer in converted)
    assert all(v["after"] < v["before"] for v in saved["refit"].values())  # the refit lowers every layer's error
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


def test_distill_converted_student_from_its_teacher(resnet_run, digits_folder, tmp_path):
    """convert (rank 1) → distill through the `finetune train` loop → a run that reloads separable."""
    import csv

    from finetune.convert import SeparableConv2d

    convert_run(resnet_run.run_dir, tmp_path / "sep", rank=1, calib_data=digits_folder, calib_images=64,
                latency=False)
    cfg = Recipe(data=str(digits_folder), model=str(tmp_path / "sep"), teacher=str(resnet_run.run_dir),
                      epochs=3, img_size=32, batch_size=32, lr=3e-4, out=str(tmp_path / "kd"))
    assert cfg.resolved_strategy == "full"  # a run already has its head
    result = fit(cfg, progress=False)
    report = result.metrics["distillation"]
    # the teacher figure is the teacher's own accuracy on the same validation split
    assert report["teacher_top1"] == pytest.approx(resnet_run.metrics["top1"], abs=1e-6)
    assert report["student_after_top1"] == result.metrics["top1"]
    rows = list(csv.DictReader((tmp_path / "kd" / "log.csv").open()))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # the KD objective goes down
    student, _ = load_model(tmp_path / "kd")
    assert any(isinstance(m, SeparableConv2d) for m in student.modules())
    assert json.loads((tmp_path / "kd" / "model.json").read_text())["teacher"] == str(resnet_run.run_dir)
    again = evaluate(tmp_path / "kd", digits_folder, out=tmp_path / "eval")
    assert again["num_samples"] == 400


def test_distill_with_other_classes_is_refused(resnet_run, messy_folder, tmp_path):
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="trained on classes"):
        fit(Recipe(data=str(messy_folder), model=str(resnet_run.run_dir), teacher=str(resnet_run.run_dir),
                        epochs=1, out=str(tmp_path / "x")), progress=False)


def test_latency_objective_keeps_no_slower_layer(resnet_run, tmp_path):
    convert_run(resnet_run.run_dir, tmp_path / "lat", rank=1, objective="latency", latency=False)
    report = json.loads((tmp_path / "lat" / "convert.json").read_text())["report"]
    assert report["objective"] == "latency"
    for layer in report["layers"]:
        if layer["form"] != "dense":  # its own measurement says the separable variant is faster
            assert layer["separable_ms"] <= layer["dense_ms"]
        else:
            assert layer["reason"]
    load_model(tmp_path / "lat")  # the plan (possibly with dense layers left) reloads


def test_compare_standard_vs_separable_twin(digits_folder, messy_folder, tmp_path, monkeypatch):
    """`finetune compare`: both trained from scratch, evaluated on held-out images, side by side."""
    from finetune.tasks.compare import compare, format_rows
    from finetune.convert import SeparableConv2d

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    rows = compare(digits_folder, model="resnet10t", rank=1, epochs=3, img_size=32, batch_size=16,
                   out=tmp_path / "cmp", test_data=digits_folder)
    dense, twin = rows
    assert twin["params"] < 0.5 * dense["params"] and twin["macs"] < 0.5 * dense["macs"]
    # 10 classes (chance 0.10); 3 epochs from scratch on 320 images: measured 0.94 / 0.89 here
    assert all(r["top1"] > 0.5 and r["latency_b1_ms"] > 0 for r in rows)
    net, _ = load_model(twin["run_dir"])
    assert any(isinstance(m, SeparableConv2d) for m in net.modules())
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"] == rows
    assert "separable (rank 1)" in format_rows(rows)


def test_distill_on_unlabelled_folder(resnet_run, digits_folder, tmp_path):
    """Loose images, no class folders: KD (+ features) only; validation = agreement with the teacher."""
    import csv
    import shutil

    loose = tmp_path / "loose"
    loose.mkdir()
    for i, path in enumerate(sorted(digits_folder.glob("*/*.png"))[::3]):
        shutil.copy(path, loose / f"{i:04d}.png")
    convert_run(resnet_run.run_dir, tmp_path / "sep", rank=1, calib_data=loose, calib_images=64, latency=False)
    cfg = Recipe(data=str(loose), model=str(tmp_path / "sep"), teacher=str(resnet_run.run_dir), epochs=3,
                      img_size=32, batch_size=16, out=str(tmp_path / "kd"))
    result = fit(cfg, progress=False)
    report = result.metrics["distillation"]
    assert report["teacher_top1"] == 1.0  # the teacher agrees with its own predictions
    assert 0.0 <= report["student_after_top1"] <= 1.0
    assert result.classes == resnet_run.classes
    rows = list(csv.DictReader((tmp_path / "kd" / "log.csv").open()))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    meta = json.loads((tmp_path / "kd" / "model.json").read_text())
    assert "agreement" in meta["data"]["val_labels"] and meta["classes"] == resnet_run.classes


def test_unlabelled_folder_needs_a_student_run(resnet_run, tmp_path):
    from PIL import Image

    from finetune.errors import FinetuneError

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(loose / f"{i}.png")
    with pytest.raises(FinetuneError, match="--student RUN_DIR"):
        fit(Recipe(data=str(loose), model="resnet18", weights="none", teacher=str(resnet_run.run_dir),
                        epochs=1, out=str(tmp_path / "x")), progress=False)
