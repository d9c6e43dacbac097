"""``report.html`` of a real run: one self-contained file (every image inlined, no script, no network),
its gallery holds the most confidently wrong validation images, it opens in headless Chromium with no
console message, and it renders (non-blank screenshot); ``eval`` and ``finetune report`` write it too."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.demo import write_demo_folder
from helpers import run_finetune

TRAIN = ["--model", "mobilenetv2_100", "--weights", "offline", "--epochs", "1", "--img-size", "32",
         "--memory-format", "contiguous", "--no-progress"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def ok(*args: str) -> subprocess.CompletedProcess:
    result = run_finetune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    data = write_demo_folder(tmp_path_factory.mktemp("report") / "data", train_per_class=8, val_per_class=4)
    (data / "train" / "bag" / "broken.png").write_bytes(b"not a png")
    out = tmp_path_factory.mktemp("run") / "run"
    ok("train", "--data", str(data), *TRAIN, "--out", str(out))
    return out


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]*)"', page)


def test_the_report_is_one_offline_file_with_the_gallery_of_confident_mistakes(run_dir):
    page = (run_dir / "report.html").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "<script" not in page and "http://" not in page and "https://" not in page
    sources = _images(page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    for source in sources:  # every inlined image decodes
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    wrong = round(metrics["num_samples"] * (1 - metrics["top1"]))
    assert f"{wrong} of {metrics['num_samples']} images are misclassified" in page
    assert page.count("<figure>") == min(wrong, 24)
    confidences = [float(c) for c in re.findall(r"</b> \((\d\.\d\d)\)<br>", page)]
    assert confidences == sorted(confidences, reverse=True), "gallery not most-confident first"
    for heading in ("Training curves", "Confusion matrix", "Per class", "Calibration", "Recipe"):
        assert f"<h2>{heading}</h2>" in page
    assert "broken.png" in page and f"<td>ECE (15 bins)</td><td>{metrics['ece']:.4f}</td>" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it: apt-get install chromium)")
def test_the_report_opens_in_headless_chromium_without_console_messages_and_renders(run_dir, tmp_path):
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", "--window-size=1200,3000", f"--screenshot={shot}",
                           (run_dir / "report.html").resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert "CONSOLE" not in proc.stderr, [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.05, "the page rendered (nearly) blank"


def test_eval_and_finetune_report_write_it_too(run_dir, tmp_path):
    data = json.loads((run_dir / "model.json").read_text())["data"]["root"]
    ok("eval", str(run_dir), "--data", str(Path(data) / "val"), "--out", str(tmp_path / "eval"))
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Most confidently wrong" in page and all(s.startswith("data:") for s in _images(page))
    original = (run_dir / "report.html").read_text()
    (run_dir / "report.html").unlink()
    ok("report", str(run_dir))
    again = (run_dir / "report.html").read_text()
    top1 = json.loads((run_dir / "metrics.json").read_text())["top1"]
    assert f"<td>top-1</td><td>{top1:.4f}</td>" in again and again.count("<figure>") == original.count("<figure>")
