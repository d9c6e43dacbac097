"""Tests for finetune.metrics: numbers against scikit-learn, ECE by hand, plots, log reading."""

from __future__ import annotations

import csv
import doctest
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sk = pytest.importorskip("sklearn.metrics")

import finetune.metrics as fm  # noqa: E402
from finetune.metrics import (  # noqa: E402
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    per_class_metrics,
    plot_confusion,
    plot_curves,
    read_log_csv,
    topk_accuracy,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]


def random_case(num_classes: int, n: int = 300, seed: int = 0, absent: int | None = None):
    """Logits that are right more often than chance; class ``absent`` never occurs as a label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    if absent is not None:
        labels[labels == absent] = (absent + 1) % num_classes
    logits = torch.randn(n, num_classes, generator=g)
    logits[torch.arange(n), labels] += 1.0
    return logits, labels


def names(c: int) -> list[str]:
    return [f"class_{i}" for i in range(c)]


def assert_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def only_file(directory: Path, name: str) -> None:
    """Nothing but ``name`` in ``directory``: no leftover temp files."""
    assert sorted(p.name for p in directory.iterdir()) == [name]


# --------------------------------------------------------------------------- vs scikit-learn

CLASS_COUNTS = [3, 7, 12]


@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_topk_matches_sklearn(c):
    logits, labels = random_case(c, absent=c - 1)
    ks = [k for k in (1, 2, 3, 5) if k < c]
    got = topk_accuracy(logits, labels, ks)
    assert list(got) == ks
    for k in ks:
        want = sk.top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=np.arange(c))
        assert got[k] == pytest.approx(want, abs=1e-12)


def test_topk_k_at_least_num_classes_is_one():
    logits, labels = random_case(3)
    assert topk_accuracy(logits, labels, (3, 5)) == {3: 1.0, 5: 1.0}


@pytest.mark.parametrize("c", [2, *CLASS_COUNTS])
def test_confusion_matches_sklearn(c):
    logits, labels = random_case(c, seed=1, absent=c - 1)
    preds = logits.argmax(1)
    got = confusion_matrix(preds, labels, c)
    assert got.dtype == torch.int64
    assert got.shape == (c, c)
    want = sk.confusion_matrix(labels.numpy(), preds.numpy(), labels=np.arange(c))
    np.testing.assert_array_equal(got.numpy(), want)
    assert int(got[c - 1].sum()) == 0  # the absent class has an empty row


@pytest.mark.parametrize("c", [2, *CLASS_COUNTS])
def test_per_class_matches_sklearn(c):
    logits, labels = random_case(c, seed=2, absent=c - 1)
    preds = logits.argmax(1)
    got = per_class_metrics(confusion_matrix(preds, labels, c), names(c))
    p, r, f, s = sk.precision_recall_fscore_support(
        labels.numpy(), preds.numpy(), labels=np.arange(c), zero_division=0
    )
    assert list(got) == names(c)
    for i, name in enumerate(names(c)):
        assert got[name]["precision"] == pytest.approx(p[i], abs=1e-12)
        assert got[name]["recall"] == pytest.approx(r[i], abs=1e-12)
        assert got[name]["f1"] == pytest.approx(f[i], abs=1e-12)
        assert got[name]["support"] == s[i]
    assert got[names(c)[-1]]["support"] == 0
    assert got[names(c)[-1]]["recall"] == 0.0


@pytest.mark.parametrize("c", [2, *CLASS_COUNTS])
@pytest.mark.parametrize("absent", [False, True])
def test_classification_metrics_matches_sklearn(c, absent):
    logits, labels = random_case(c, seed=3, absent=(c - 1) if absent else None)
    y, s = labels.numpy(), logits.numpy()
    preds = s.argmax(1)
    probs = torch.softmax(logits, 1).numpy()
    m = classification_metrics(logits, labels, names(c))

    assert m["num_samples"] == len(y)
    assert m["top1"] == pytest.approx(sk.accuracy_score(y, preds), abs=1e-12)
    assert m["loss"] == pytest.approx(sk.log_loss(y, probs, labels=np.arange(c)), rel=1e-5)
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, preds, average="macro", zero_division=0), abs=1e-12)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" when a class is absent
        warnings.simplefilter("ignore", UserWarning)
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, preds), abs=1e-12)
    if c >= 5:
        assert m["top5"] == pytest.approx(sk.top_k_accuracy_score(y, s, k=5, labels=np.arange(c)), abs=1e-12)
    np.testing.assert_array_equal(np.array(m["confusion"]), sk.confusion_matrix(y, preds, labels=np.arange(c)))
    assert m["classes"] == names(c)
    assert 0.0 <= m["ece"] <= 1.0


def test_classification_metrics_is_json_ready_with_zero_support_class():
    c = 6
    logits, labels = random_case(c, n=50, seed=4, absent=2)
    logits[:, 2] = -10.0  # never predicted either: precision, recall and F1 are all undefined
    m = classification_metrics(logits, labels, names(c))
    assert m["per_class"]["class_2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    text = json.dumps(m, allow_nan=False)  # plain types, no NaN anywhere
    assert json.loads(text) == m
    assert list(m) == ["num_samples", "loss", "top1", "top5", "macro_f1", "balanced_accuracy", "ece",
                       "per_class", "confusion", "classes"]
    # A class that neither occurs nor is predicted does not drag the averages down.
    f1s = [v["f1"] for k, v in m["per_class"].items() if k != "class_2"]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))


@pytest.mark.parametrize("c, has_top5", [(2, False), (4, False), (5, True), (10, True)])
def test_top5_only_with_five_or_more_classes(c, has_top5):
    logits, labels = random_case(c, n=40)
    assert ("top5" in classification_metrics(logits, labels, names(c))) is has_top5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype):
    logits, labels = random_case(8, n=200, seed=5)
    low = logits.to(dtype)
    got = classification_metrics(low, labels, names(8))
    want = classification_metrics(low.float(), labels, names(8))  # same values, computed in float32
    assert got == want
    assert isinstance(got["loss"], float) and math.isfinite(got["loss"])
    assert topk_accuracy(low, labels, (1, 5)) == topk_accuracy(low.float(), labels, (1, 5))
    probs = torch.softmax(logits, 1)
    assert expected_calibration_error(probs.to(dtype), labels) == pytest.approx(
        expected_calibration_error(probs, labels), abs=0.02
    )


# --------------------------------------------------------------------------- ECE


def two_class_probs(conf: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict class 0 with the given confidence; the label is 0 when ``correct``."""
    c = torch.tensor(conf, dtype=torch.float64)
    probs = torch.stack([c, 1 - c], 1)
    labels = torch.tensor([0 if ok else 1 for ok in correct])
    return probs, labels


def test_ece_perfectly_calibrated_is_zero():
    # Confidence 0.8 and 8 of 10 right; confidence 0.65 (well inside its bin) and 13 of 20 right.
    probs, labels = two_class_probs([0.8] * 10 + [0.65] * 20, [True] * 8 + [False] * 2 + [True] * 13 + [False] * 7)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.eye(4)[torch.tensor([0, 1, 2, 3, 1])]
    assert expected_calibration_error(one_hot, torch.tensor([0, 1, 2, 3, 1])) == pytest.approx(0.0, abs=1e-7)


def test_ece_calibrated_in_expectation_is_small():
    g = torch.Generator().manual_seed(6)
    conf = 0.5 + 0.5 * torch.rand(200_000, generator=g, dtype=torch.float64)
    correct = torch.rand(200_000, generator=g, dtype=torch.float64) < conf
    probs, labels = two_class_probs(conf.tolist(), correct.tolist())
    assert expected_calibration_error(probs, labels) < 0.01


def test_ece_overconfident_known_values():
    # Always 95% sure, right half the time: ECE = 0.45.
    probs, labels = two_class_probs([0.95] * 10, [True, False] * 5)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.45, abs=1e-6)
    # Two bins: 4 samples at 0.95 (2 right, gap 0.45), 2 at 0.65 (both right, gap 0.35).
    probs, labels = two_class_probs([0.95] * 4 + [0.65] * 2, [True, False, True, False, True, True])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(4 / 6 * 0.45 + 2 / 6 * 0.35, abs=1e-6)


def test_ece_binning():
    # 0.72 (right) and 0.78 (wrong) share the bin (0.7, 0.8] with 10 bins: |0.5 - 0.75| = 0.25.
    probs, labels = two_class_probs([0.72, 0.78], [True, False])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.25, abs=1e-6)
    # With 20 bins they are separate: (0.28 + 0.78) / 2.
    assert expected_calibration_error(probs, labels, n_bins=20) == pytest.approx(0.53, abs=1e-6)
    # One bin: |accuracy - mean confidence|.
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.25, abs=1e-6)


def test_ece_bin_edges_are_right_closed():
    # Bins are (lo, hi]: confidence exactly 0.5 falls in the first of two bins, apart from 0.75.
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.75, 0.125, 0.125]])
    labels = torch.tensor([0, 1])  # first right, second wrong
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.5 * 0.5 + 0.5 * 0.75)


def test_ece_matches_reference_loop():
    logits, labels = random_case(5, n=500, seed=7)
    probs = torch.softmax(2 * logits, 1).double()
    conf, pred = probs.max(1)
    n_bins = 15
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            acc = (pred[in_bin] == labels[in_bin]).double().mean()
            total += in_bin.double().mean().item() * abs(acc.item() - conf[in_bin].mean().item())
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(total, abs=1e-9)


def test_ece_rejects_logits_and_bad_bins():
    logits, labels = random_case(4, n=20)
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error(logits, labels)
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(torch.full((3, 4), 0.1), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.softmax(logits, 1), labels, n_bins=0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: topk_accuracy(torch.empty(0, 3), torch.empty(0, dtype=torch.long)), "empty"),
        (lambda: classification_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.long), names(3)), "empty"),
        (lambda: confusion_matrix(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 3), "empty"),
        (lambda: expected_calibration_error(torch.empty(0, 3), torch.empty(0, dtype=torch.long)), "empty"),
        (lambda: topk_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 2, 3])), "class index 3"),
        (lambda: topk_accuracy(torch.randn(4, 3), torch.tensor([0, -1, 2, 1])), "class index -1"),
        (lambda: confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3), "preds contains class index 5"),
        (lambda: confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3), "labels contains class index 3"),
        (lambda: confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 3), "3 entries"),
        (lambda: classification_metrics(torch.randn(4, 3), torch.tensor([0, 1, 2]), names(3)), "3 entries"),
        (lambda: classification_metrics(torch.randn(4, 3), torch.tensor([0.0, 1, 2, 1]), names(3)), "integer"),
        (lambda: classification_metrics(torch.randn(4), torch.tensor([0, 1, 2, 1]), names(3)), r"\[N, C\]"),
        (lambda: classification_metrics(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), names(4)), "4 class names"),
        (lambda: classification_metrics(torch.randn(2, 2), torch.tensor([0, 1]), ["a", "a"]), "unique"),
        (lambda: classification_metrics(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), ["a", "b"]), "NaN"),
        (lambda: topk_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), (0,)), "positive"),
        (lambda: topk_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), ()), "ks is empty"),
        (lambda: per_class_metrics(torch.ones(2, 3, dtype=torch.long), names(2)), "square"),
        (lambda: per_class_metrics(torch.tensor([[1, -1], [0, 1]]), names(2)), "negative"),
        (lambda: confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0), "num_classes"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- plots


def test_plot_confusion_writes_png(tmp_path):
    c = 6
    logits, labels = random_case(c, n=120, absent=3)
    conf = confusion_matrix(logits.argmax(1), labels, c)
    out = tmp_path / "confusion.png"
    plot_confusion(conf, [f"a rather long class name {i}" for i in range(c)], out, title="val")
    w, h = assert_png(out)
    assert w > 400 and h > 400
    only_file(tmp_path, "confusion.png")


def test_plot_confusion_accepts_json_lists_and_grows_with_classes(tmp_path):
    sizes = {}
    for c in (3, 30):  # 30 > 20: no per-cell annotations, still fine
        logits, labels = random_case(c, n=10 * c)
        m = classification_metrics(logits, labels, names(c))
        out = tmp_path / f"cm{c}.png"
        plot_confusion(json.loads(json.dumps(m["confusion"])), m["classes"], out)
        sizes[c] = assert_png(out)
    assert sizes[30][0] > sizes[3][0] and sizes[30][1] > sizes[3][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm3.png", "cm30.png"]


def test_plot_confusion_bad_input(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        plot_confusion(torch.eye(3, dtype=torch.long), names(2), tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        plot_confusion([[1, 2, 3]], names(3), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_plot_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "confusion.png"
    out.write_bytes(b"previous")

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fm.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_confusion(torch.eye(2, dtype=torch.long), names(2), out)
    assert out.read_bytes() == b"previous"
    only_file(tmp_path, "confusion.png")


def test_plots_do_not_import_pyplot(tmp_path):
    code = (
        "import sys, torch, finetune.metrics as m\n"
        f"m.plot_confusion(torch.eye(2, dtype=torch.long), ['a', 'b'], {str(tmp_path / 'c.png')!r})\n"
        f"m.plot_curves([{{'epoch': 1, 'train_loss': 1.0}}], {str(tmp_path / 'l.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env)


def log_rows(with_lr: bool = True) -> list[dict[str, str]]:
    """Rows as a CSV reader returns them: strings, fractional epochs, val only every 4th row."""
    rows = []
    for i in range(12):
        row = {"epoch": f"{(i + 1) / 4:g}", "train_loss": f"{2 / (i + 1):.4f}",
               "val_loss": f"{1.5 / (i + 1):.4f}" if i % 4 == 3 else "",
               "val_top1": f"{i / 12:.4f}" if i % 4 == 3 else "", "train_top1": f"{i / 11:.4f}"}
        if with_lr:
            row["lr"] = f"{1e-3 * (1 - i / 12):.6g}"
        rows.append(row)
    return rows


def test_plot_curves_writes_png_with_lr_panel(tmp_path):
    with_lr, without_lr = tmp_path / "with.png", tmp_path / "without.png"
    plot_curves(log_rows(with_lr=True), with_lr)
    plot_curves(log_rows(with_lr=False), without_lr)
    (w3, h3), (w2, h2) = assert_png(with_lr), assert_png(without_lr)
    assert w3 > w2 * 1.3  # three panels vs two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["with.png", "without.png"]


def test_plot_curves_per_group_lr_columns(tmp_path):
    # train.py logs "lr_head" / "lr_body" rather than "lr": they still get the third panel.
    rows = [{**r, "lr_head": r["lr"], "lr_body": "0.0" if i < 4 else r["lr"]} for i, r in enumerate(log_rows())]
    for r in rows:
        del r["lr"]
    plot_curves(rows, tmp_path / "groups.png")
    plot_curves(log_rows(with_lr=False), tmp_path / "none.png")
    assert assert_png(tmp_path / "groups.png")[0] > assert_png(tmp_path / "none.png")[0] * 1.3


@pytest.mark.parametrize(
    "rows",
    [
        [{"epoch": 1.0, "train_loss": 0.9}, {"epoch": 2.0, "train_loss": 0.5}],  # no val, no lr
        [{"train_loss": "0.9", "val_top1": "0.5"}, {"train_loss": "0.7", "val_top1": "0.6"}],  # no epoch
        [{"epoch": "1", "note": "warmup", "val_loss": "nan"}, {"epoch": "2", "note": "", "val_loss": ""}],
        [{"something_else": 1.0}],
    ],
)
def test_plot_curves_tolerates_missing_columns(tmp_path, rows):
    out = tmp_path / "curves.png"
    plot_curves(rows, out)
    assert_png(out)
    only_file(tmp_path, "curves.png")


def test_plot_curves_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="sequence of dicts"):
        plot_curves({"epoch": 1}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- log.csv


def test_read_log_csv_round_trip(tmp_path):
    path = tmp_path / "log.csv"
    fields = ["epoch", "train_loss", "val_top1", "lr", "phase"]
    written = [
        {"epoch": 1, "train_loss": 0.6931, "val_top1": "", "lr": 1e-3, "phase": "warmup"},
        {"epoch": 1.5, "train_loss": 0.25, "val_top1": 0.875, "lr": 2.5e-05, "phase": "main"},
    ]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(written)
    rows = read_log_csv(path)
    assert rows == [
        {"epoch": 1.0, "train_loss": 0.6931, "val_top1": "", "lr": 0.001, "phase": "warmup"},
        {"epoch": 1.5, "train_loss": 0.25, "val_top1": 0.875, "lr": 2.5e-05, "phase": "main"},
    ]
    assert all(isinstance(v, float) for v in (rows[0]["epoch"], rows[1]["lr"]))
    plot_curves(rows, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


def test_read_log_csv_short_rows_empty_file_and_extra_fields(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("epoch,train_loss,val_loss\n1,0.5\n", encoding="utf-8")
    assert read_log_csv(short) == [{"epoch": 1.0, "train_loss": 0.5, "val_loss": ""}]
    header_only = tmp_path / "header.csv"
    header_only.write_text("epoch,train_loss\n", encoding="utf-8")
    assert read_log_csv(header_only) == []
    extra = tmp_path / "extra.csv"
    extra.write_text("epoch,train_loss\n1,0.5,oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_log_csv(extra)


def test_docstring_examples():
    result = doctest.testmod(fm, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
