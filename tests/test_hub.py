"""Run folders in timm's / the Hub's format: ``timm.create_model("local-dir:RUN", pretrained=True)``
gives the trained model with identical logits and its class names; a generated model card; runs
continued from ``local-dir:``; ``finetune push`` without network is one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch

import finetune
from finetune.data.demo import write_demo_folder
from helpers import run_finetune

TRAIN = ["--weights", "offline", "--epochs", "1", "--img-size", "32", "--batch-size", "32",
         "--memory-format", "contiguous", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_folder(tmp_path_factory.mktemp("hub") / "data", train_per_class=8, val_per_class=3)


@pytest.fixture(scope="module", params=["mobilenetv2_100",
                                        pytest.param("tf_efficientnet_lite0", marks=pytest.mark.slow)])
def run_dir(request, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / request.param
    result = run_finetune("train", "--data", str(data), "--model", request.param, *TRAIN, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_run_folder_loads_in_plain_timm_with_identical_logits_and_labels(run_dir):
    ours, data_config = finetune.load_model(run_dir)
    theirs = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
    images = torch.randn(4, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(images) - ours(images)).abs().max().item() <= 1e-6
    meta = json.loads((run_dir / "model.json").read_text())
    assert theirs.pretrained_cfg["label_names"] == meta["classes"]
    resolved = timm.data.resolve_data_config({}, model=theirs)
    assert resolved["input_size"] == tuple(meta["data_config"]["input_size"])
    assert list(resolved["mean"]) == meta["data_config"]["mean"] and list(resolved["std"]) == meta["data_config"]["std"]
    assert resolved["interpolation"] == meta["data_config"]["interpolation"]


def test_the_model_card_states_data_metrics_split_use_and_recipe(run_dir):
    card = (run_dir / "README.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card.startswith("---\n") and "library_name: timm" in card
    for section in ("## Metrics", "## Intended use and limitations", "## Recipe", "validation split"):
        assert section in card
    assert f"| top-1 | {metrics['top1']:.4f} |" in card
    assert "80 training / 30 validation images" in card
    assert f"local-dir:{run_dir.name}" in card


def test_a_run_continues_from_a_local_dir_model(run_dir, data, tmp_path):
    if run_dir.name != "mobilenetv2_100":
        pytest.skip("one architecture is enough")
    out = tmp_path / "again"
    result = run_finetune("train", "--data", str(data), "--model", f"local-dir:{run_dir}", "--epochs", "1",
                          "--img-size", "32", "--memory-format", "contiguous", "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == "mobilenetv2_100" and f"local-dir:{run_dir}" in meta["weights_source"]
    # same classes: the trained head is kept, so the first epoch starts from the earlier run's accuracy
    first = json.loads((run_dir / "metrics.json").read_text())["top1"]
    assert float((out / "log.csv").read_text().splitlines()[1].split(",")[7]) >= first - 0.1


@pytest.mark.parametrize("argv, named", [
    (["train", "--data", "{data}", "--model", "local-dir:{tmp}"], "not a timm model folder"),
    (["train", "--data", "{data}", "--model", "hf-hub:nobody"], "hf-hub:NAMESPACE/NAME"),
    (["push", "{run}", "--repo-id", "me/photos"], "push to the Hub repository `me/photos` failed"),
    (["push", "{run}", "--repo-id", "photos"], "NAMESPACE/NAME"),
])
def test_hub_mistakes_and_no_network_are_one_line(run_dir, data, tmp_path, argv, named):
    if run_dir.name != "mobilenetv2_100":
        pytest.skip("one architecture is enough")
    argv = [a.format(data=data, tmp=tmp_path, run=run_dir) for a in argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_invalid_for_tests"}
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "finetune.cli", *argv], capture_output=True, text=True,
                          timeout=300, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], proc.stderr[-2000:]
