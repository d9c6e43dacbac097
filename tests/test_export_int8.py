"""Static int8 export (finetune/export/quantize.py, biascorr.py), on a really trained run.

The run: mobilenetv2_100 with its offline ImageNet weights, fine-tuned for 2 epochs at 32 px on
160 embedded Fashion-MNIST images (80 validation images, split as given by DATA/train + DATA/val).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.cli import main
from finetune.data import eval_loader, scan_folder
from finetune.data.demo import write_demo_folder
from finetune.export import INT8_FILE, quantize_run
from finetune.export.biascorr import correct_biases
from finetune.export.quantize import quantize_onnx
from finetune.io import read_json
from finetune.rundir import load_model
from tests.helpers import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_folder(tmp_path_factory.mktemp("int8") / "data", train_per_class=16, val_per_class=8)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_run") / "run"
    result = run_finetune("train", "--data", str(data), "--model", "mobilenetv2_100", "--weights", "offline",
                          "--epochs", "2", "--img-size", "32", "--memory-format", "contiguous", "--no-progress",
                          "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def black(tmp_path_factory):
    """Calibration images that are all black: activation ranges far too narrow for real images."""
    folder = tmp_path_factory.mktemp("black")
    for i in range(4):
        Image.new("RGB", (32, 32)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return quantize_run(run, out=tmp_path_factory.mktemp("int8_out") / "export", calib_images=64, latency=False)


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_int8_written_smaller_and_measured(exported, run, data):
    out = exported.model_path.parent
    assert exported.written and not exported.forced
    assert {p.name for p in out.iterdir()} == {"model.onnx", INT8_FILE, "preprocessing.json", "int8.json"}
    assert exported.model_path.stat().st_size < 0.4 * exported.fp32_path.stat().st_size
    # the figures, recomputed here on the validation split the run used (DATA/val)
    split = scan_folder(data)
    _, data_config = load_model(run)
    x, labels = zip(*[(images.numpy(), y.numpy()) for images, y in eval_loader(split.val, data_config, 32)])
    fp32 = np.concatenate([_session(exported.fp32_path).run(None, {"input": b})[0] for b in x])
    int8 = np.concatenate([_session(exported.model_path).run(None, {"input": b})[0] for b in x])
    labels = np.concatenate(labels)
    assert exported.val_images == len(split.val) == 80
    assert exported.fp32_top1 == pytest.approx(float((fp32.argmax(1) == labels).mean()))
    assert exported.int8_top1 == pytest.approx(float((int8.argmax(1) == labels).mean()))
    assert exported.agreement == pytest.approx(float((fp32.argmax(1) == int8.argmax(1)).mean()))
    assert exported.max_abs_logit_diff == pytest.approx(float(np.abs(fp32 - int8).max()), rel=1e-4)
    assert exported.agreement >= 0.8 and exported.drop_points <= 1.0
    assert "val" in exported.val_source and exported.calib_source == "the run's training split"
    # and in the sidecar and int8.json
    sidecar = read_json(out / "preprocessing.json")
    assert sidecar["int8"]["model_file"] == INT8_FILE
    assert sidecar["int8"]["int8_top1"] == exported.int8_top1
    assert read_json(out / "int8.json")["agreement"] == exported.agreement


def test_cli_int8_prints_latency(run, tmp_path):
    out = tmp_path / "export"
    result = run_finetune("export", str(run), "--int8", "--calib-images", "32", "--calib-method", "percentile",
                          "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "latency batch  1: fp32" in result.stdout and "latency batch 32: fp32" in result.stdout
    assert "1 thread(s)" in result.stdout  # OMP_NUM_THREADS=1 in the test subprocess
    report = read_json(out / "int8.json")
    assert report["calib_method"] == "percentile" and set(report["speedup"]) == {"1", "32"}
    assert {r["model"] for r in report["latency"]} == {"fp32", "int8"}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``finetune ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gate_refuses_and_leaves_nothing(run, black, tmp_path, capsys):
    out = tmp_path / "export"
    code, _, err = _cli(capsys, "export", str(run), "--int8", "--calib-data", str(black), "--no-latency",
                        "--out", str(out))
    assert code == 2
    message = err.strip()
    assert "\n" not in message and "points below fp32" in message and "nothing was written" in message
    assert "limit --max-drop 1)" in message and "--calib-method" in message and "--force" in message
    assert not out.exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".int8-")]  # no partial files left in the run

    forced = quantize_run(run, out=out, calib_data=black, max_drop=0.0, force=True, latency=False)
    assert forced.forced and forced.drop_points > forced.max_drop == 0.0 and forced.model_path.is_file()
    assert read_json(out / "int8.json")["forced"] is True


@pytest.mark.parametrize("args, expected", [
    (["--calib-data", "EMPTY"], "no readable images in calibration folder"),
    (["--calib-data", "MISSING"], "does not exist"),
    (["--max-drop", "-1"], "max_drop must be a number"),
    (["--calib-images", "0"], "calib_images must be a positive"),
    (["--format", "torchscript"], "--int8 writes ONNX"),
])
def test_bad_input_one_line_exit_2(run, tmp_path, capsys, args, expected):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("not an image")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    code, _, err = _cli(capsys, "export", str(run), "--int8", *args, "--out", str(tmp_path / "out"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_onnx_file_as_run_is_one_line(exported, capsys):
    code, _, err = _cli(capsys, "export", str(exported.model_path), "--int8")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a run directory" in err


def test_int8_flags_need_int8(run, black, capsys):
    code, _, err = _cli(capsys, "export", str(run), "--calib-data", str(black))
    assert code == 2 and "--calib-data apply to --int8 only" in err


def test_bias_correction_removes_mean_shift(tmp_path):
    """Per-tensor weights (one coarse scale for very different channels): the corrected int8 model's
    per-channel output means are closer to fp32's."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(8, 16, 3, padding=0).eval()
    with torch.no_grad():
        net.weight.mul_(torch.logspace(-2, 0, 16).view(16, 1, 1, 1))  # channel scales over two decades
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.randn(1, 8, 12, 12),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "b"}}, dynamo=False)
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 8, 12, 12)) + 1.0).astype(np.float32) for _ in range(4)]
    q = quantize_onnx(path, tmp_path / "q.onnx", batches, extra_options={"WeightSymmetric": True})
    # per-tensor: re-quantize without per-channel for a clear weight error
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from finetune.export.quantize import _Reader
    quantize_static(str(path), str(q), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    fp32 = _session(path).run(None, {"input": np.concatenate(batches)})[0].mean((0, 2, 3))
    before = _session(q).run(None, {"input": np.concatenate(batches)})[0].mean((0, 2, 3))
    removed = correct_biases(path, q, batches)
    after = _session(q).run(None, {"input": np.concatenate(batches)})[0].mean((0, 2, 3))
    assert removed
    assert np.abs(after - fp32).mean() < 0.5 * np.abs(before - fp32).mean()


@pytest.mark.slow
def test_bias_correction_option_on_the_run(run, exported, tmp_path):
    corrected = quantize_run(run, out=tmp_path / "bc", calib_images=64, bias_correction=True, latency=False)
    assert corrected.bias_correction and corrected.model_path.is_file()
    assert abs(corrected.drop_points) <= 5 and corrected.agreement >= 0.8


# --------------------------------------------------------------------------------------------
# finetune compress (finetune/tasks/compress.py)
# --------------------------------------------------------------------------------------------

def _check_recommendation(report) -> None:
    for limit in (0.0, 0.5, 1.0, 100.0):
        best = report.best(max_drop=limit)
        assert best["drop_points"] <= limit
        within = [r for r in report.rows if r["drop_points"] <= limit]
        assert all(r["latency_b1_ms"] >= best["latency_b1_ms"] for r in within)


def test_compress_report_and_resume(run, tmp_path):
    from finetune import compress
    from finetune.tasks.compress import CompressReport

    out = tmp_path / "compressed"
    report = compress(run, out=out, variants="fp32,int8", calib_images=32, latency_seconds=0.2)
    assert [r["variant"] for r in report.rows] == ["fp32", "int8"]
    assert {"report.json", "report.csv", "pareto.png"} <= {p.name for p in out.iterdir()}
    assert report.rows[0]["drop_points"] == 0 and report.rows[0]["agreement"] == 1
    assert all(r["threads"] == 1 and r["latency_b32_ms"] > 0 for r in report.rows)
    assert report.rows[1]["size_mb"] < 0.4 * report.rows[0]["size_mb"]
    assert read_json(out / "report.json")["recommendation"] == report.best()["variant"]
    assert (out / "report.csv").read_text().splitlines()[0].startswith("variant,top1,drop_points")
    _check_recommendation(report)

    fp32_stage = out / "variants" / "fp32" / "stage.json"
    stamp = fp32_stage.stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "variants" / "int8")
    again = compress(run, out=out, variants="fp32,int8", calib_images=32, latency_seconds=0.2)
    assert fp32_stage.stat().st_mtime_ns == stamp  # finished stage reused, not rebuilt
    assert (out / "variants" / "int8" / "stage.json").is_file()
    assert again.rows[1]["top1"] == report.rows[1]["top1"]  # same calibration sample, same int8 model
    assert CompressReport.load(out).best()["variant"] == again.best()["variant"]


def test_compress_bad_variant_one_line(run, capsys):
    code, _, err = _cli(capsys, "compress", str(run), "--variants", "fp32,fp16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown variant `fp16`" in err


@pytest.mark.slow
def test_compress_converted_resnet18_survives_sigkill(data, tmp_path):
    """A ResNet-18 run (dense 3x3 convs): default variants include separable ones; SIGKILL mid-way, run again."""
    import time

    from tests.helpers import start_finetune

    r18 = tmp_path / "r18"
    result = run_finetune("train", "--data", str(data), "--model", "resnet18", "--weights", "none", "--epochs", "1",
                          "--img-size", "32", "--memory-format", "contiguous", "--no-progress", "--out", str(r18))
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "c"
    args = ("compress", str(r18), "--out", str(out), "--calib-images", "32", "--no-progress")
    job = start_finetune(*args)
    deadline = time.time() + 300
    while not (out / "variants" / "int8" / "stage.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    job.kill()
    job.communicate()
    stamp = (out / "variants" / "int8" / "stage.json").stat().st_mtime_ns
    result = run_finetune(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "variants" / "int8" / "stage.json").stat().st_mtime_ns == stamp
    from finetune.tasks.compress import CompressReport

    report = CompressReport.load(out)
    assert [r["variant"] for r in report.rows] == ["fp32", "int8", "sep:macs=0.5", "sep:macs=0.5+int8"]
    assert (out / "pareto.png").stat().st_size > 1000 and "recommended" in result.stdout
    _check_recommendation(report)


@pytest.mark.slow
def test_compress_distilled_separable_variant(data, tmp_path):
    """--distill-epochs: the separable variant is distilled from the run on its recipe data, then exported."""
    from finetune import compress

    r18 = tmp_path / "r18"
    result = run_finetune("train", "--data", str(data), "--model", "resnet18", "--weights", "none", "--epochs", "1",
                          "--img-size", "32", "--memory-format", "contiguous", "--no-progress", "--out", str(r18))
    assert result.returncode == 0, result.stderr[-2000:]
    report = compress(r18, out=tmp_path / "c", variants="sep:rank=1", calib_images=32, distill_epochs=1,
                      latency_seconds=0.2)
    assert [r["variant"] for r in report.rows] == ["fp32", "sep:rank=1"]
    stage = tmp_path / "c" / "variants" / "sep-rank=1"
    assert (stage / "distilled" / "model.safetensors").is_file() 
    assert report.rows[1]["source_run"] == "variants/sep-rank=1/distilled"
    assert "distilled for 1 epoch(s)" in report.notes[-1]
