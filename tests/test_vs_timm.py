"""benchmarks/vs_timm.py: its parsers on canned timm / finetune output (fast), and its --quick run (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_timm.py"
TIMM_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "timm" / "train.py"


def _module():
    spec = importlib.util.spec_from_file_location("vs_timm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Lines copied from a real run of timm 1.0.31's train.py (commit aa4b585; --log-interval 1, batch 16, 2 updates an
# epoch; epoch 1's times edited to round numbers), with the lines around them that must not match.
TIMM_LOG = """\
Training with a single process on 1 device (cpu).
Model mobilenetv2_100 created, param count:2236682
Learning rate (0.00625) calculated from base learning rate (0.1) and effective global batch size (16) with linear scaling.
Scheduled epochs: 2 (epochs + cooldown_epochs). Warmup within epochs when warmup_prefix=False. LR stepped per epoch.
Train: 0 [   0/2 ( 50%)]  Loss: 4.75 (4.75)  Time: 5.584s,    2.87/s  (5.584s,    2.87/s)  LR: 1.000e-05  Data: 0.319 (0.319)
Train: 0 [   1/2 (100%)]  Loss: 5.45 (5.10)  Time: 1.763s,    9.08/s  (3.673s,    4.36/s)  LR: 1.000e-05  Data: 0.011 (0.165)
Test: [   0/1]  Time: 3.234 (3.234)  Loss:   3.560 ( 3.560)  Acc@1:  31.250 ( 31.250)  Acc@5:  56.250 ( 56.250)
Test: [   1/1]  Time: 2.640 (2.937)  Loss:   3.698 ( 3.587)  Acc@1:   0.000 ( 25.000)  Acc@5:  25.000 ( 50.000)
Current checkpoints:
 ('/tmp/vs-timm-work/runs/png-mobilenetv2_100-64-timm_best-0/checkpoint-0.pth.tar', 25.0)
Train: 1 [   0/2 ( 50%)]  Loss: 2.29 (2.29)  Time: 0.500s,   32.00/s  (0.500s,   32.00/s)  LR: 1.258e-03  Data: 0.100 (0.100)
Train: 1 [   1/2 (100%)]  Loss: 2.21 (2.25)  Time: 0.300s,   53.33/s  (0.400s,   40.00/s)  LR: 1.258e-03  Data: 0.050 (0.075)
*** Best metric: 25.0 (epoch 0)
"""

TIMM_SUMMARY = """\
epoch,train_loss,eval_loss,eval_top1,eval_top5,lr
0,2.4058,2.3018,18.75,50.0,1e-05
1,2.2497,2.2711,31.25,62.5,0.020005
"""

FINETUNE_LOG = """\
epoch,phase,lr_head,lr_body,train_loss,train_top1,val_loss,val_top1,val_macro_f1,epoch_seconds,train_images_per_s
1,head,0.0009,0.0,1.9,0.4,1.5,0.61,0.55,12.5,400.0
2,body,0.0005,0.00015,1.2,0.7,0.9,0.81,0.80,30.0,24.0
"""


def test_parse_timm_updates_and_epochs():
    vs = _module()
    updates = vs.parse_timm_updates(TIMM_LOG.splitlines())
    assert [(u["epoch"], u["idx"], u["updates"]) for u in updates] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert updates[0]["images"] == 16 and updates[0]["time_s"] == pytest.approx(5.584)
    assert updates[0]["data_s"] == pytest.approx(0.319) and updates[1]["loss"] == pytest.approx(5.45)
    epochs = vs.timm_epochs(updates)
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[1]["images"] == 32 and epochs[1]["seconds"] == pytest.approx(0.8)
    assert epochs[1]["loader_s"] == pytest.approx(0.15) and epochs[1]["images_per_s"] == pytest.approx(40.0)
    run = {"steady": vs.steady(epochs, 0)}
    assert vs.rate(run) == pytest.approx(40.0)
    split = vs.loader_split(run)
    assert split["loader_ms_per_img"] == pytest.approx(150 / 32)
    assert split["step_ms_per_img"] == pytest.approx(650 / 32) and split["loader_share"] == pytest.approx(0.1875)


def test_parse_summaries_and_time_to_target(tmp_path):
    vs = _module()
    (tmp_path / "summary.csv").write_text(TIMM_SUMMARY)
    (tmp_path / "log.csv").write_text(FINETUNE_LOG)
    timm_rows = vs.parse_timm_summary(tmp_path / "summary.csv")
    assert [r["val_top1"] for r in timm_rows] == pytest.approx([0.1875, 0.3125])  # percentages → fractions
    ours = vs.parse_finetune_log(tmp_path / "log.csv")
    assert [(r["epoch"], r["phase"]) for r in ours] == [(1, "head"), (2, "body")]
    assert ours[1]["train_images_per_s"] == 24.0 and ours[0]["epoch_seconds"] == 12.5
    assert vs.time_to_target([r["val_top1"] for r in ours], [20.0, 51.0], 0.8) == (51.0, 2)
    assert vs.time_to_target([0.1, 0.2], [1.0, 2.0], 0.8) == (None, None)
    assert vs.count_rows(tmp_path / "log.csv") == 2 and vs.count_rows(tmp_path / "missing.csv") == 0


def test_steady_keeps_all_epochs_when_there_is_one():
    vs = _module()
    assert vs.steady([{"epoch": 1}], 1) == [{"epoch": 1}]
    assert vs.steady([{"epoch": 1}, {"epoch": 2}], 1) == [{"epoch": 2}]


def test_missing_train_py_says_where_to_get_it(tmp_path):
    vs = _module()
    with pytest.raises(SystemExit, match="github.com/huggingface/pytorch-image-models at tag v"):
        vs.find_timm_train(str(tmp_path / "nope.py"))


def test_commands_match_for_both_tools(tmp_path):
    vs = _module()
    timm = vs.timm_command(Path("train.py"), tmp_path, "mobilenetv2_100", 128, 32, 2, tmp_path / "o" / "x", 2,
                           ["--channels-last"])
    ours = vs.finetune_command(tmp_path, "mobilenetv2_100", 128, 32, 2, tmp_path / "run")
    for flag, value in (("--img-size", "128"), ("--epochs", "2"), ("--model", "mobilenetv2_100")):
        assert timm[timm.index(flag) + 1] == value == ours[ours.index(flag) + 1]
    assert timm[timm.index("-b") + 1] == ours[ours.index("--batch-size") + 1] == "32"
    assert "--channels-last" in timm and "--val-split" in timm and timm[timm.index("--val-split") + 1] == "validation"


@pytest.mark.slow
def test_quick_run(tmp_path):
    if not TIMM_TRAIN.is_file():
        pytest.skip(f"timm's train.py is not at {TIMM_TRAIN} (see benchmarks/vs_timm.py for where to get it)")
    out = tmp_path / "vs_timm.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--timm-train", str(TIMM_TRAIN), "--threads",
                             "2", "--out", str(out), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["throughput"], report
    for row in report["throughput"]:
        for column in ("timm_default", "timm_best", "finetune"):
            assert row[column] > 0, (column, row)
    assert {r["data"] for r in report["throughput"]} == {"png", "camera"}
    assert {r["tool"] for r in report["time_to_target"]} == {"timm_best", "finetune"}
    assert "| data | model | px |" in report["table"]


def test_summary_row_and_table():
    vs = _module()

    def run(rate: float) -> dict:
        return {"images_per_s": rate, "loader_ms_per_img": 1.0, "step_ms_per_img": 9.0, "loader_share": 0.1,
                "other_cpu_share": 0.02}

    row = {"data": "camera", "model": "mobilenetv2_100", "px": 128, "train_per_class": 60, "val_per_class": 10,
           "runs": {"timm_default": [run(20.0), run(22.0), run(30.0)], "timm_best": [run(25.0), run(30.0), run(20.0)],
                    "finetune": [run(30.0), run(30.0), run(30.0)]}}
    vs.summarise_row(row)
    assert row["timm_best"] == 25.0 and row["finetune"] == 30.0 and row["timm_default"] == 22.0
    assert row["finetune_over_timm_best"] == pytest.approx(1.2)
    assert row["finetune_over_timm_best_paired"] == pytest.approx([1.0, 1.5])  # 30/30 and 30/20
    table = vs.tables([row], [], 1.25)
    assert "| 600 JPEGs of 1600×1200 px | mobilenetv2_100 | 128 | 22.0 | 25.0 | 30.0 | 1.20 [1.00–1.50] |" in table
    assert "MISSES" in table and "warning" not in table
    assert "— (smoke)" in vs.tables([row], [], 1.25, smoke=True)
