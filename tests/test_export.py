"""ONNX / TorchScript export of run directories (finetune/export/).

Run directories are written by hand here (model.safetensors + model.json), at 64 px, with random
BatchNorm statistics (so no BN is an identity) and the head scaled to logits of at most 8 on the
check images, like a fine-tuned run's; parity is always measured on real images.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from finetune.io import model_state_dict, read_json, save_weights, write_json
from finetune.data import build_transform
from finetune.data.demo import load_demo_arrays, write_demo_folder
from finetune.errors import FinetuneError
from finetune.export import ROUNDING_FACTOR, describe_preprocessing, export_run
from finetune.models import resolve_data_config
from finetune.rundir import RUN_FORMAT, RUN_META, RUN_WEIGHTS, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True)
ort = pytest.importorskip("onnxruntime")
IMG = 64
TOL = 1e-4


def _write_run(model: torch.nn.Module, run_dir: Path, data_config: dict, **extra) -> Path:
    """A minimal run directory in the format `finetune train` writes."""
    classes = [f"class_{i}" for i in range(model.num_classes)][::-1]  # not sorted: order must survive
    meta = {"format": RUN_FORMAT, "architecture": extra.pop("architecture"), "num_classes": len(classes),
            "classes": classes,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}, **extra}
    save_weights(model_state_dict(model), run_dir / RUN_WEIGHTS)
    write_json(run_dir / RUN_META, meta)
    return run_dir


def _realistic(model: torch.nn.Module, data_config: dict, seed: int = 0) -> torch.nn.Module:
    """Random BN affine + statistics near 1 (timm's init makes BN an identity), and a head giving
    logits of at most 8 on real images (a random head gives ~30, where float32 rounding in eager
    PyTorch itself reaches 1e-4; see the module docstring of finetune.export)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.4 + 0.8)
        model.eval()
        scale = 8.0 / model(_demo_batch(data_config, 16, offset=0)).abs().max()
        head = model.get_classifier()
        head.weight.mul_(scale), head.bias.mul_(scale)
    return model


def _timm_run(name: str, run_dir: Path, **config) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    data_config = {**resolve_data_config(model, IMG), **config}
    return _write_run(_realistic(model, data_config), run_dir, data_config, architecture=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        # bilinear and crop_pct 0.95 (not timm's defaults): the sidecar must follow the run
        "mobilenetv2_100": _timm_run("mobilenetv2_100", root / "mnv2", interpolation="bilinear", crop_pct=0.95),
        # tf_ models pad TF-"SAME" in forward (timm Conv2dSame) from the input size
        "tf_efficientnet_lite0": _timm_run("tf_efficientnet_lite0", root / "lite0"),
    }


@pytest.fixture(scope="module")
def onnx_exports(runs, tmp_path_factory):
    return {name: export_run(run, "onnx", out=tmp_path_factory.mktemp(name)) for name, run in runs.items()}


def _demo_batch(data_config: dict, n: int, offset: int = 100) -> torch.Tensor:
    transform = build_transform(data_config, train=False)
    pixels = load_demo_arrays()["val_images"][offset:offset + n]
    return torch.stack([transform(Image.fromarray(p).convert("RGB")) for p in pixels])


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _by_hand(img: Image.Image, spec: dict) -> np.ndarray:
    """Apply a sidecar's `preprocessing` with PIL + numpy only (what a non-Python user would do)."""
    img = img.convert("RGB")
    resize = spec["resize"]
    w, h = img.size
    if resize["mode"] == "shorter_side":
        s = resize["size"]
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    else:
        new_h, new_w = resize["size"]
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), getattr(Image.Resampling, resize["pil_filter"].rsplit(".", 1)[1]))
    crop_h, crop_w = spec["center_crop"]["size"]
    top, left = round((new_h - crop_h) / 2), round((new_w - crop_w) / 2)
    img = img.crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(img, dtype=np.float32) / np.float32(spec["scale"]["divide_by"])
    x = (x - np.asarray(spec["normalize"]["mean"], np.float32)) / np.asarray(spec["normalize"]["std"], np.float32)
    assert spec["layout"] == "NCHW" and spec["channel_order"] == "RGB" and spec["dtype"] == "float32"
    return x.transpose(2, 0, 1)


def _test_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((37, 50, 3)) * 255).astype(np.uint8)),   # landscape, crop top 4.5 -> 4
            Image.fromarray((rng.random((91, 40, 3)) * 255).astype(np.uint8)),   # portrait
            Image.fromarray(load_demo_arrays()["val_images"][3])]                # real grey 28x28, upscaled


# ------------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("name", ["mobilenetv2_100", "tf_efficientnet_lite0"])
def test_onnx_parity_and_dynamic_batch(name, runs, onnx_exports):
    report = onnx_exports[name]
    assert report.max_abs_diff <= TOL and report.images_checked == 16 and report.batch_sizes == (1, 5, 16)
    assert report.float32_error is None and report.tolerance == TOL  # no rounding allowance needed
    assert report.format == "onnx" and isinstance(report.opset, int) and report.model_path.is_file()
    model, data_config = load_model(runs[name])
    session = _session(report.model_path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, IMG, IMG]
    images = _demo_batch(data_config, 5)  # other images than the export's own check
    with torch.no_grad():
        eager = model(images).numpy()
    for batch in (images[:1], images):
        got = session.run(None, {"input": batch.numpy()})[0]
        assert got.shape == (len(batch), 7)
        assert np.abs(got - eager[: len(batch)]).max() <= TOL
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # H, W are fixed (TF 'SAME' pads baked in)
        session.run(None, {"input": np.zeros((1, 3, IMG + 8, IMG + 8), np.float32)})
    if name.startswith("tf_"):
        assert any(type(m).__name__ == "Conv2dSame" for m in model.modules())


@pytest.mark.parametrize("name", ["mobilenetv2_100", "tf_efficientnet_lite0"])
def test_sidecar_describes_the_eval_transform(name, runs, onnx_exports):
    report = onnx_exports[name]
    sidecar = read_json(report.preprocessing_path)
    meta = read_json(runs[name] / RUN_META)
    config = meta["data_config"]
    spec = sidecar["preprocessing"]
    assert sidecar["classes"] == meta["classes"] == report.classes
    assert sidecar["model_file"] == "model.onnx" and sidecar["input"]["name"] == "input"
    assert sidecar["input"]["shape"] == ["batch", 3, IMG, IMG] and sidecar["output"]["shape"] == ["batch", 7]
    assert spec["input_size"] == [3, IMG, IMG] and spec["mean"] == config["mean"] and spec["std"] == config["std"]
    assert spec["interpolation"] == config["interpolation"] and spec["crop_pct"] == config["crop_pct"]
    assert sidecar["export"]["parity"]["max_abs_diff"] == report.max_abs_diff
    # the proof: the sidecar applied by hand gives the eval transform's tensor, and the ONNX logits
    transform = build_transform(config, train=False)
    model, _ = load_model(runs[name])
    session = _session(report.model_path)
    for img in _test_images():
        expected = transform(img.convert("RGB")).numpy()
        x = _by_hand(img, spec)
        assert x.shape == expected.shape and np.abs(x - expected).max() <= 1e-6
        with torch.no_grad():
            eager = model(torch.from_numpy(expected)[None]).numpy()
        assert np.abs(session.run(None, {"input": x[None]})[0] - eager).max() <= TOL


@pytest.mark.parametrize("config", [
    dict(crop_pct=0.875, interpolation="bicubic"),
    dict(crop_pct=1.0, interpolation="nearest", crop_mode="center"),
    dict(crop_pct=0.9, interpolation="bilinear", crop_mode="squash"),
])
def test_describe_preprocessing_matches_transform(config):
    data_config = dict(input_size=(3, 48, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **config)
    spec = describe_preprocessing(data_config)
    transform = build_transform(data_config, train=False)
    for img in _test_images():
        assert np.abs(_by_hand(img, spec) - transform(img.convert("RGB")).numpy()).max() <= 1e-6


def test_legacy_exporter_with_given_images(runs, tmp_path):
    folder = write_demo_folder(tmp_path / "demo", train_per_class=1, val_per_class=1)  # 20 real images
    report = export_run(runs["tf_efficientnet_lite0"], out=tmp_path / "a", images=folder, exporter="legacy")
    assert report.max_abs_diff <= TOL and report.images_checked == 16 and "legacy" in report.exporter
    files = sorted(folder.glob("val/*/*.png"))[:3]
    report = export_run(runs["tf_efficientnet_lite0"], out=tmp_path / "b", images=files, exporter="legacy", opset=17)
    assert report.images_checked == 3 and report.batch_sizes == (1, 3) and report.opset == 17


def test_rounding_allowance_is_measured_and_reported(runs, tmp_path):
    # a tolerance below float32 rounding: eager float64 is run and the limit becomes 5x eager's own error
    report = export_run(runs["tf_efficientnet_lite0"], out=tmp_path, exporter="legacy", tolerance=1e-9)
    assert 0 < report.float32_error < 1e-4 and report.tolerance == ROUNDING_FACTOR * report.float32_error
    assert report.max_abs_diff <= report.tolerance and "float32 error" in report.summary()
    parity = read_json(report.preprocessing_path)["export"]["parity"]
    assert parity["float32_error"] == report.float32_error and parity["requested_tolerance"] == 1e-9


# ------------------------------------------------------------------------------- TorchScript


def test_torchscript_parity_default_out(runs):
    run = runs["tf_efficientnet_lite0"]
    report = export_run(run, "torchscript")
    assert report.model_path == run / "export" / "model.pt" and report.opset is None
    assert report.max_abs_diff <= TOL
    assert read_json(run / "export" / "preprocessing.json")["model_file"] == "model.pt"
    model, data_config = load_model(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        loaded = torch.jit.load(str(report.model_path))
    images = _demo_batch(data_config, 5)
    with torch.no_grad():
        for batch in (images[:1], images):
            assert (loaded(batch) - model(batch)).abs().max() <= TOL


# --------------------------------------------------------------------------------- converted


def test_converted_run_exports(tmp_path):
    from finetune.convert import SeparableConv2d, convert_to_separable

    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=7)
    data_config = resolve_data_config(teacher, IMG)
    student = convert_to_separable(teacher, rank=4, example_input=torch.randn(1, 3, IMG, IMG))
    assert {entry["form"] for entry in student.separable_plan} == {"A", "B"}
    run = _write_run(_realistic(student, data_config), tmp_path / "sep", data_config, architecture="resnet18",
                     separable_plan=student.separable_plan)
    model, _ = load_model(run)
    assert any(isinstance(m, SeparableConv2d) for m in model.modules())
    report = export_run(run, out=tmp_path / "onnx")
    assert report.max_abs_diff <= TOL and report.batch_sizes == (1, 5, 16)
    import onnx

    graph = onnx.load(str(report.model_path)).graph
    groups = [a.i for node in graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "group"]
    assert max(groups) > 1  # the depthwise convolutions are in the graph


# ------------------------------------------------------------------------------------ errors


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_errors_name_the_problem_and_the_fix(runs, tmp_path, monkeypatch):
    run = runs["mobilenetv2_100"]
    with pytest.raises(FinetuneError, match="not a run directory") as excinfo:
        export_run(tmp_path)
    _one_line_error(excinfo)
    with pytest.raises(FinetuneError, match="does not exist"):
        export_run(tmp_path / "missing")
    with pytest.raises(FinetuneError, match="unknown export format `tflite`; choose one of onnx, torchscript"):
        export_run(run, "tflite")
    with pytest.raises(FinetuneError, match="unknown ONNX exporter"):
        export_run(run, exporter="fx")
    with pytest.raises(FinetuneError, match="opset applies to ONNX"):
        export_run(run, "torchscript", opset=17)
    with pytest.raises(FinetuneError, match="writes opset 18 or newer, not 17; pass exporter legacy"):
        export_run(run, opset=17)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="no readable images"):
        export_run(run, out=tmp_path / "x", images=tmp_path / "empty", exporter="legacy")
    bad = tmp_path / "border"
    _timm_run("mobilenetv2_100", bad, crop_mode="border")
    with pytest.raises(FinetuneError, match="crop_mode `border`"):
        export_run(bad, out=tmp_path / "x")

    for package, exporter in (("onnxscript", "dynamo"), ("onnxruntime", "legacy"), ("onnx", "legacy")):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, package, None)  # import fails as if not installed
            with pytest.raises(FinetuneError, match=f"needs the `{package}` package.*pip install {package}") as excinfo:
                export_run(run, out=tmp_path / "x", exporter=exporter)
            _one_line_error(excinfo)
    assert not (tmp_path / "x").exists()


def test_failed_parity_writes_nothing(runs, tmp_path, monkeypatch):
    import finetune.export.runner as export

    real = export._onnx_runner
    monkeypatch.setattr(export, "_onnx_runner", lambda path: (lambda x, run=real(path): run(x) + 1e-3))
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=r"differs from PyTorch by 1\.0\de-03 \(> 1\.\de-04; PyTorch's own "
                                            r"float32 error is .*\) on 16 images, so nothing was written") as excinfo:
        export_run(runs["mobilenetv2_100"], out=out, exporter="legacy")
    _one_line_error(excinfo)
    assert list(out.iterdir()) == []  # not even a temporary file is left


def test_module_doctests():
    import doctest

    import finetune.export.runner as runner
    import finetune.export.sidecar as sidecar

    for module in (runner, sidecar):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
    assert doctest.testmod(sidecar).attempted > 0
