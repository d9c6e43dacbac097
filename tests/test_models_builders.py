"""Builder refs (``package.module:callable``): non-timm models in run directories.

A converted torchvision or user-defined model is saved with :func:`finetune.save_run` (or written by
``finetune convert BUILDER_REF --weights W``) and reloads from the builder + separable plan +
model.safetensors, with no SVD; ``evaluate``/``predict`` and the CLI take such a run like any other.
"""

from __future__ import annotations

import doctest
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import builder_nets
import finetune
import finetune.models.builders as builders_module
from finetune.models.builders import build_model, builder_ref, is_builder_ref, parse_builder_ref, resolve_builder
from finetune.errors import FinetuneError
from helpers import randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero"]
R18 = "torchvision.models:resnet18"


def one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def forbid_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any SVD from here on fails the test: reloading must rebuild from the plan only."""
    import finetune.convert.layers as layers
    import finetune.convert.surgery as surgery

    def boom(*args, **kwargs):
        raise AssertionError("an SVD ran while reloading a converted run")

    monkeypatch.setattr(torch.linalg, "svd", boom)
    monkeypatch.setattr(layers, "channel_svd", boom)
    monkeypatch.setattr(surgery, "channel_svd", boom)


# ------------------------------------------------------------------------------------- refs

@pytest.mark.parametrize("text, expected", [
    ("torchvision.models:resnet18", True), ("builder_nets:TinyCNN", True), ("pkg.mod:Class.build", True),
    ("resnet18", False), ("hf-hub:timm/resnet18", False), ("runs/photos", False), ("C:\\runs\\x", False),
    ("a:b:c", False), (":f", False), ("mod:", False), ("mod: f", False), (None, False),
])
def test_is_builder_ref(text, expected):
    assert is_builder_ref(text) is expected


def test_parse_and_resolve():
    assert parse_builder_ref(R18) == ("torchvision.models", "resnet18")
    assert resolve_builder("builder_nets:make_tiny_cnn") is builder_nets.make_tiny_cnn
    assert resolve_builder("builder_nets:TinyCNN.__init__") is builder_nets.TinyCNN.__init__  # dotted attribute
    net = build_model("builder_nets:make_tiny_cnn", {"num_classes": 3, "width": 4})
    assert isinstance(net, builder_nets.TinyCNN) and net.head.out_features == 3


@pytest.mark.parametrize("ref, words", [
    ("no_such_pkg_xyz.nets:make", ["`no_such_pkg_xyz.nets:make`", "no module named `no_such_pkg_xyz`", "PYTHONPATH"]),
    ("builder_nets:nope", ["`builder_nets:nope`", "has no attribute `nope`"]),
    ("builder_nets:TinyCNN.nope", ["`builder_nets.TinyCNN` has no attribute `nope`"]),
    ("builder_nets:NOT_CALLABLE", ["is a int, not a function or class"]),
    ("builder_nets.make_tiny_cnn", ["is not `package.module:callable`", "torchvision.models:resnet18"]),
    ("os:system", ["standard library"]),
    ("builtins:exec", ["standard library"]),
])
def test_resolve_errors_are_one_line(ref, words):
    with pytest.raises(FinetuneError) as excinfo:
        resolve_builder(ref)
    one_line_error(excinfo, *words)


def test_build_model_errors():
    with pytest.raises(FinetuneError) as excinfo:
        build_model("builder_nets:not_a_model")
    one_line_error(excinfo, "returned a dict, not a torch.nn.Module")
    with pytest.raises(FinetuneError) as excinfo:
        build_model("builder_nets:make_tiny_cnn", {"depth": 3})
    one_line_error(excinfo, "TypeError", "depth", "--builder-kwargs")
    with pytest.raises(FinetuneError) as excinfo:
        build_model("builder_nets:make_tiny_cnn", {"num_classes": torch.tensor(3)})
    one_line_error(excinfo, "JSON values")


def test_builder_ref_of_functions():
    assert builder_ref(builder_nets.make_tiny_cnn) == "builder_nets:make_tiny_cnn"
    assert builder_ref(builder_nets.TinyCNN) == "builder_nets:TinyCNN"
    assert builder_ref(" torchvision.models:resnet18 ") == R18

    def local_builder():
        return nn.Linear(2, 2)

    def in_main():
        return nn.Linear(2, 2)
    in_main.__module__, in_main.__qualname__ = "__main__", "in_main"

    cases = [(lambda: nn.Linear(2, 2), "lambda"), (local_builder, "inside another function"),
             (in_main, "`__main__`"), (functools.partial(builder_nets.make_tiny_cnn, 3), "no importable name")]
    for fn, words in cases:
        with pytest.raises(FinetuneError) as excinfo:
            builder_ref(fn)
        one_line_error(excinfo, words, "importable module")


def test_builders_doctests():
    assert doctest.testmod(builders_module).failed == 0


# ------------------------------------------------------------------------ save_run / load_model

@pytest.fixture(scope="module")
def resnet18_sep():
    """torchvision resnet18, 10 classes, random weights + random BN, converted to 0.4 of its MACs at 32 px."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    sep = finetune.convert_to_separable(dense, macs=0.4, example_input=torch.randn(1, 3, 32, 32))
    assert sep.separable_plan and sep.conversion_report.macs_ratio <= 0.4001
    return dense, sep


def test_torchvision_save_run_reloads_without_svd(resnet18_sep, tmp_path, monkeypatch):
    _, sep = resnet18_sep
    out = finetune.save_run(sep, tmp_path / "r18-sep", classes=DIGITS, builder=R18,
                            builder_kwargs={"num_classes": 10}, input_size=32)
    meta = json.loads((out / "model.json").read_text())
    assert meta["builder"] == R18 and meta["builder_kwargs"] == {"num_classes": 10}
    assert meta["architecture"] == R18 and meta["classes"] == DIGITS
    assert meta["separable_plan"] == sep.separable_plan
    assert meta["data_config"]["input_size"] == [3, 32, 32] and meta["data_config"]["crop_pct"] == 1.0

    forbid_svd(monkeypatch)
    model, cfg = finetune.load_model(out)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), sep(x))
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["label_names"] == DIGITS
    assert type(model).__module__.startswith("torchvision")


def test_user_module_run_predicts_and_evaluates(digits_folder, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = randomize_bn(builder_nets.make_tiny_cnn(num_classes=10)).eval()
    sep = finetune.convert_to_separable(net, rank=2, example_input=torch.randn(1, 3, 32, 32))
    out = finetune.save_run(sep, tmp_path / "tiny-sep", classes=DIGITS, builder=builder_nets.make_tiny_cnn,
                            builder_kwargs={"num_classes": 10}, input_size=32,
                            data_config={"mean": (0.5,) * 3, "std": (0.5,) * 3}, extra_meta={"note": "mine"})
    meta = json.loads((out / "model.json").read_text())
    assert meta["builder"] == "builder_nets:make_tiny_cnn" and meta["note"] == "mine"
    assert meta["data_config"]["mean"] == [0.5, 0.5, 0.5]

    forbid_svd(monkeypatch)
    preds = finetune.predict(out, [digits_folder / "three"], top_k=2)
    assert len(preds) == 40 and all(len(p.labels) == 2 and p.labels[0] in DIGITS for p in preds)
    metrics = finetune.evaluate(out, digits_folder, out=tmp_path / "eval")
    assert metrics["num_samples"] == 400 and 0.0 <= metrics["top1"] <= 1.0
    model, _ = finetune.load_model(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), sep(x))


def test_save_run_unconverted_timm_model(tmp_path):
    import timm

    net = timm.create_model("resnet10t", num_classes=3).eval()
    out = finetune.save_run(net, tmp_path / "timm", classes=["a", "b", "c"], input_size=32)
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == "resnet10t" and "builder" not in meta and "separable_plan" not in meta
    model, cfg = finetune.load_model(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    assert cfg["input_size"] == (3, 32, 32)


def test_save_run_refuses_what_would_not_reload(tmp_path):
    net = builder_nets.make_tiny_cnn(num_classes=10).eval()
    cases = [
        (dict(classes=DIGITS), ["cannot tell how to rebuild a `TinyCNN`", "builder="]),
        (dict(classes=DIGITS, builder=lambda: net), ["lambda"]),
        (dict(classes=DIGITS, builder="builder_nets:make_tiny_cnn", builder_kwargs={"num_classes": 5}),
         ["does not match builder `builder_nets:make_tiny_cnn` with {\"num_classes\": 5}"]),
        (dict(classes=DIGITS[:4], builder="builder_nets:make_tiny_cnn"), ["4 classes were given"]),
        (dict(classes=["a", "a"], builder="builder_nets:make_tiny_cnn"), ["appears twice"]),
        (dict(classes=DIGITS, builder="builder_nets:make_tiny_cnn", input_size=(32, 32)), ["input_size"]),
        (dict(classes=DIGITS, builder_kwargs={"num_classes": 10}), ["without builder"]),
    ]
    for kwargs, words in cases:
        kwargs.setdefault("input_size", 32)
        with pytest.raises(FinetuneError) as excinfo:
            finetune.save_run(net, tmp_path / "bad", **kwargs)
        one_line_error(excinfo, *words)
    assert not (tmp_path / "bad").exists()

    swapped = builder_nets.make_tiny_cnn(num_classes=10).eval()
    swapped.features[2] = nn.GELU()  # no weights: invisible in the state dict, caught by the output check
    with pytest.raises(FinetuneError) as excinfo:
        finetune.save_run(swapped, tmp_path / "bad", classes=DIGITS, builder="builder_nets:make_tiny_cnn",
                          input_size=32)
    one_line_error(excinfo, "does not rebuild this model", "outputs differ")

    out = finetune.save_run(net, tmp_path / "ok", classes=10, builder="builder_nets:make_tiny_cnn", input_size=32)
    assert json.loads((out / "model.json").read_text())["classes"][0] == "class_0"
    with pytest.raises(FinetuneError) as excinfo:
        finetune.save_run(net, out, classes=10, builder="builder_nets:make_tiny_cnn", input_size=32)
    one_line_error(excinfo, "already holds a run", "overwrite=True")
    finetune.save_run(net, out, classes=10, builder="builder_nets:make_tiny_cnn", input_size=32, overwrite=True)


def test_run_with_a_missing_builder_module_is_one_line(tmp_path):
    net = builder_nets.make_tiny_cnn(num_classes=10).eval()
    out = finetune.save_run(net, tmp_path / "run", classes=DIGITS, builder="builder_nets:make_tiny_cnn", input_size=32)
    meta = json.loads((out / "model.json").read_text())
    meta["builder"] = "moved_away_pkg.nets:make_tiny_cnn"
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FinetuneError) as excinfo:
        finetune.load_model(out)
    one_line_error(excinfo, "no module named `moved_away_pkg`")


# ----------------------------------------------------------------------------------------- CLI

def test_cli_convert_builder_ref_with_weights(resnet18_sep, digits_folder, tmp_path, capsys, monkeypatch):
    from finetune.cli import main

    dense, _ = resnet18_sep
    weights = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(weights))
    out = tmp_path / "r18-sep"
    code = main(["convert", R18, "--builder-kwargs", '{"num_classes": 10}', "--weights", str(weights),
                 "--classes", ",".join(DIGITS), "--macs", "0.4", "--img-size", "32", "--no-latency",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "model.json").read_text())
    assert meta["builder"] == R18 and meta["builder_kwargs"] == {"num_classes": 10}
    assert meta["classes"] == DIGITS and meta["separable_plan"] and meta["converted_from"] == R18
    assert meta["weights_source"] == f"weights from file `{weights}`"

    forbid_svd(monkeypatch)
    capsys.readouterr()
    assert main(["predict", str(out), str(digits_folder / "three"), "--json", "--top-k", "1"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 40 and all(p["labels"][0] in DIGITS for p in preds)
    assert main(["eval", str(out), "--data", str(digits_folder), "--out", str(tmp_path / "eval"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 400

    # the same conversion in Python gives the same converted model: same weights in, same plan out
    model, _ = finetune.load_model(out)
    monkeypatch.undo()
    python_sep = finetune.convert_to_separable(dense, macs=0.4, example_input=torch.randn(1, 3, 32, 32))
    assert model.separable_plan == python_sep.separable_plan


def test_cli_convert_user_builder_from_pth_and_fresh_process(digits_folder, tmp_path, capsys):
    from finetune.cli import main

    net = randomize_bn(builder_nets.make_tiny_cnn(num_classes=10)).eval()
    weights = tmp_path / "tiny.pth"
    torch.save({"state_dict": net.state_dict()}, weights)
    out = tmp_path / "tiny-sep"
    assert main(["convert", "builder_nets:make_tiny_cnn", "--weights", str(weights), "--rank", "full",
                 "--img-size", "32", "--no-latency", "--out", str(out)]) == 0, capsys.readouterr().err
    model, _ = finetune.load_model(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-4)  # full rank: exact
    assert json.loads((out / "model.json").read_text())["classes"][:2] == ["class_0", "class_1"]

    # a fresh `finetune predict` process imports the builder again (tests/ on PYTHONPATH, as a user's project)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "predict", str(out), str(digits_folder / "one"),
                           "--json", "--top-k", "1"], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 40


@pytest.mark.parametrize("args, words", [
    (["no_such_pkg_xyz.nets:make", "--rank", "2"], ["no module named `no_such_pkg_xyz`"]),
    (["builder_nets:make_tiny_cnn", "--rank", "2", "--builder-kwargs", "{num_classes: 3}"], ["is not JSON"]),
    (["builder_nets:make_tiny_cnn", "--rank", "2", "--builder-kwargs", "[3]"], ["JSON list; give an object"]),
    (["builder_nets:make_tiny_cnn", "--rank", "2", "--num-classes", "3"], ["put the head size in --builder-kwargs"]),
    (["builder_nets:make_tiny_cnn", "--rank", "2", "--weights", "hub"], ["for timm names"]),
    (["builder_nets:make_tiny_cnn", "--rank", "2", "--weights", "missing.pth"], ["does not exist"]),
    (["builder_nets:make_tiny_cnn", "--rank", "2", "--classes", "a,b"], ["2 class names given", "10 outputs"]),
    (["resnet18", "--rank", "2", "--builder-kwargs", "{}"], ["--builder-kwargs is for a builder ref"]),
])
def test_cli_convert_mistakes_are_one_line(args, words, tmp_path, capsys, monkeypatch):
    from finetune.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    try:
        code = main(["convert", *args, "--no-latency", "--img-size", "32", "--out", str(out)])
    except SystemExit as exc:  # argparse type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_cli_convert_weights_of_another_architecture(tmp_path, capsys):
    from finetune.cli import main

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in builder_nets.make_tiny_cnn(num_classes=3).state_dict().items()},
              str(weights))
    code = main(["convert", "builder_nets:make_tiny_cnn", "--weights", str(weights), "--rank", "2",
                 "--no-latency", "--img-size", "32", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "does not match builder `builder_nets:make_tiny_cnn`" in err and "head.weight" in err, err
