"""Experiment trackers through accelerate (``runtime.report_to`` / ``--report-to``): a real run
logged to TensorBoard, read back and compared with ``log.csv``; the one-line errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from accelerate.utils import LoggerType

from finetune import Recipe, fit
from finetune.cli import main
from finetune.config import TRACKERS
from finetune.data import scan_folder
from finetune.errors import FinetuneError
from finetune.train import tracking
from finetune.train.tracking import EPOCH_KEYS, PROJECT_NAME


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _scalars(folder):
    """Every scalar TensorBoard holds under ``folder`` (its sub-folders too): tag → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def test_tensorboard_gets_every_log_column_the_steps_and_the_recipe(digits_folder, tmp_path):
    pytest.importorskip("tensorboard")
    import yaml

    epochs, batch_size = 2, 32
    recipe = Recipe(data=str(digits_folder), model="mobilenetv2_100", weights="offline", epochs=epochs,
                    strategy="probe", img_size=32, batch_size=batch_size,
                    memory_format="contiguous", out=str(tmp_path / "run"),
                    report_to="tensorboard")
    result = fit(recipe, progress=False)
    logs = result.run_dir / PROJECT_NAME
    scalars = _scalars(logs)

    rows = list(csv.DictReader((result.run_dir / "log.csv").open()))  # the CSV log stays
    assert len(rows) == epochs
    for column, key in EPOCH_KEYS.items():
        if column == "phase":  # text, not a scalar
            continue
        logged = dict(scalars[key])
        assert sorted(logged) == [int(r["epoch"]) for r in rows]
        for row, exact in zip(rows, result.history):
            value = logged[int(row["epoch"])]
            assert value == pytest.approx(exact[column], rel=1e-7, abs=1e-30), key  # float32 of the value
            assert value == pytest.approx(float(row[column]), rel=6e-6, abs=1e-30), key  # log.csv: 6 digits

    train_images = len(scan_folder(digits_folder, val_fraction=0.2, seed=0).train)
    updates = epochs * math.ceil(train_images / batch_size)
    for key in ("train/step_loss", "lr/head_step"):
        assert [step for step, _ in scalars[key]] == list(range(1, updates + 1)), key
    assert all(v > 0 for _, v in scalars["train/step_loss"])

    # the recipe as hyper-parameters: accelerate's hparams.yml next to the event files
    (hparams_file,) = logs.rglob("hparams.yml")
    hparams = yaml.safe_load(hparams_file.read_text())
    assert hparams["model.name"] == "mobilenetv2_100"
    assert hparams["optim.epochs"] == epochs and hparams["runtime.report_to"] == "tensorboard"
    assert hparams["data.root"] == str(digits_folder.resolve())
    assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())


def test_mlflow_file_store_in_the_run_gets_the_recipe_and_every_log_column(digits_folder, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = Recipe(data=str(digits_folder), model="mobilenetv2_100", weights="offline", epochs=2, strategy="probe",
                    img_size=32, batch_size=32, memory_format="contiguous", out=str(tmp_path / "run"),
                    report_to="mlflow")
    result = fit(recipe, progress=False)
    store = result.run_dir / "mlruns"
    assert store.is_dir() and not (Path.cwd() / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == PROJECT_NAME]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model.name"] == "mobilenetv2_100" and run.data.params["optim.epochs"] == "2"
    rows = list(csv.DictReader((result.run_dir / "log.csv").open()))
    for column, key in EPOCH_KEYS.items():
        if column == "phase":
            continue
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert sorted(history) == [int(r["epoch"]) for r in rows], key
        for row in rows:
            assert history[int(row["epoch"])] == pytest.approx(float(row[column]), rel=6e-6, abs=1e-30), key


def test_missing_tracker_is_one_line_before_anything_is_scanned(digits_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "is_mlflow_available", lambda: False)

    def no_scan(*args, **kwargs):
        raise AssertionError("the data folder was scanned")

    monkeypatch.setattr("finetune.train.trainer.scan_data", no_scan)
    out = tmp_path / "run"
    code = main(["train", "--data", str(digits_folder), "--model", "mobilenetv2_100", "--weights", "offline",
                 "--report-to", "tensorboard,mlflow", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "mlflow" in err and "pip install mlflow" in err
    assert "finetune-vision[mlflow]" in err
    assert not out.exists()


def test_unknown_tracker_is_a_recipe_error_with_a_suggestion():
    with pytest.raises(FinetuneError, match=r"runtime.report_to: `tensorbord` .*did you mean `tensorboard`\?"):
        Recipe(report_to="tensorbord")
    with pytest.raises(FinetuneError) as info:
        Recipe(report_to="nonsense")
    assert "\n" not in str(info.value) and "runtime.report_to" in str(info.value)
    assert Recipe(report_to=" TensorBoard,mlflow ").runtime.report_to == "tensorboard,mlflow"
    assert Recipe().runtime.report_to == "none"


def test_tracker_names_are_accelerates(capsys):
    assert set(TRACKERS) == {t.value for t in LoggerType if t != LoggerType.ALL}
    assert set(TRACKERS) == set(tracking.INSTALL)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--report-to" in capsys.readouterr().out
