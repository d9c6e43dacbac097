"""Test-time augmentation (``--tta``, horizontal flip) of ``finetune eval`` and ``finetune predict``
on a real tiny run: the TTA output is the mean softmax over each image and its mirror image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.data import eval_loader, scan_labelled
from finetune.data.demo import write_demo_folder
from finetune.inference import evaluate, predict, predict_logits
from finetune.rundir import load_model, read_run_meta
from helpers import run_finetune


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_folder(tmp_path_factory.mktemp("tta") / "data", train_per_class=8, val_per_class=3)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tta_run") / "run"
    result = run_finetune("train", "--data", str(data), "--model", "mobilenetv2_100", "--weights", "offline",
                          "--epochs", "1", "--img-size", "32", "--memory-format", "contiguous", "--no-progress",
                          "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _independent(run: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain logits and mean(softmax(image), softmax(flipped image)), computed here, and the labels."""
    model, data_config = load_model(run)
    model.eval()
    _, samples, _ = scan_labelled(data, classes=list(read_run_meta(run)["classes"]))
    plain, probs, labels = [], [], []
    with torch.no_grad():
        for images, targets in eval_loader(samples, data_config, 8):
            logits = model(images).float()
            flipped = model(torch.flip(images, dims=[3])).float()
            plain.append(logits)
            probs.append((logits.softmax(1) + flipped.softmax(1)) / 2)
            labels.append(targets)
    return torch.cat(plain), torch.cat(probs), torch.cat(labels)


def test_tta_logits_are_the_mean_softmax_of_image_and_flip(run, data):
    plain, probs, labels = _independent(run, data)
    model, data_config = load_model(run)
    _, samples, _ = scan_labelled(data, classes=list(read_run_meta(run)["classes"]))
    loader = eval_loader(samples, data_config, 8)
    tta, tta_labels = predict_logits(model, loader, torch.device("cpu"), tta=True)
    assert torch.equal(tta_labels, labels)
    assert torch.equal(tta, probs.log())  # bit for bit: log of the mean of the two softmaxes
    torch.testing.assert_close(tta.softmax(1), probs, rtol=0, atol=1e-6)
    without, _ = predict_logits(model, loader, torch.device("cpu"))
    assert torch.equal(without, plain)
    assert not torch.allclose(tta.softmax(1), plain.softmax(1))  # the flip changes something


def test_evaluate_tta_reports_both_figures(run, data, tmp_path):
    plain, probs, labels = _independent(run, data)
    metrics = evaluate(run, data, out=tmp_path / "eval", batch_size=8, tta=True)
    assert metrics["tta"] == "hflip"
    expected_top1 = (probs.argmax(1) == labels).float().mean().item()
    assert metrics["top1"] == pytest.approx(expected_top1)
    assert metrics["plain"]["top1"] == pytest.approx((plain.argmax(1) == labels).float().mean().item())
    nll = torch.nn.functional.nll_loss(probs.log(), labels).item()
    assert metrics["loss"] == pytest.approx(nll, rel=1e-5)
    assert metrics["plain"]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(plain, labels).item(), rel=1e-5)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["tta"] == "hflip" and written["plain"]["top1"] == metrics["plain"]["top1"]
    assert "plain" not in evaluate(run, data, out=tmp_path / "eval_plain", batch_size=8)


def test_cli_eval_tta_json_and_text(run, data, tmp_path):
    result = run_finetune("eval", str(run), "--data", str(data), "--tta", "--json", "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["tta"] == "hflip"
    assert {"top1", "loss"} <= metrics.keys() and {"top1", "loss"} <= metrics["plain"].keys()
    text = run_finetune("eval", str(run), "--data", str(data), "--tta", "--out", str(tmp_path / "t"))
    assert text.returncode == 0, text.stderr
    assert "without TTA" in text.stdout and "top-1" in text.stdout


def test_predict_tta(run, data):
    _, probs, _ = _independent(run, data)
    _, samples, _ = scan_labelled(data, classes=list(read_run_meta(run)["classes"]))
    classes = list(read_run_meta(run)["classes"])
    results = predict(run, [s.path for s in samples], top_k=3, batch_size=8, tta=True)
    assert [r.path for r in results] == [s.path for s in samples]
    for r, p in zip(results, probs):
        top = p.topk(3)
        assert r.labels == [classes[i] for i in top.indices.tolist()]
        assert r.probs == pytest.approx(top.values.tolist(), abs=1e-6)
    cli = run_finetune("predict", str(run), str(samples[0].path), "--tta", "--json", "--top-k", "2")
    assert cli.returncode == 0, cli.stderr
    row = json.loads(cli.stdout)[0]
    assert row["labels"] == results[0].labels[:2] and row["probs"] == pytest.approx(results[0].probs[:2], abs=1e-5)


def test_five_crop_is_the_mean_softmax_of_ten_views(run, data):
    """``--tta five-crop``: the corners and centre of the eval-resized image (timm's ``img_size / crop_pct``),
    each with its flip; the plain figure of the same pass is the centre crop = the usual eval view."""
    from torchvision.transforms import functional as TF

    from finetune.data import ImageDataset, build_transform
    from finetune.data.dataset import FiveCrop

    model, data_config = load_model(run)
    model.eval()
    _, samples, _ = scan_labelled(data, classes=list(read_run_meta(run)["classes"]))
    samples = samples[::5]
    plain_tf = build_transform(data_config, train=False)
    five = ImageDataset(samples, FiveCrop(plain_tf))
    raw = ImageDataset(samples)
    size = plain_tf.transforms[1].size
    expected_probs = []
    with torch.no_grad():
        for i in range(len(samples)):
            crops, _ = five[i]
            resized = TF.normalize(TF.to_tensor(plain_tf.transforms[0](raw[i][0])), data_config["mean"],
                                   data_config["std"])
            assert torch.allclose(crops[0], resized[:, :size[0], :size[1]])  # top-left corner
            assert torch.allclose(crops[4], plain_tf(raw[i][0]))  # centre = the plain eval view
            views = torch.cat([crops, torch.flip(crops, dims=[3])])
            expected_probs.append(torch.stack([model(v[None]).softmax(1)[0] for v in views]).mean(0))
    loader = eval_loader(samples, data_config, 4, five_crop=True)
    tta, labels = predict_logits(model, loader, torch.device("cpu"), tta=True)
    torch.testing.assert_close(tta.exp(), torch.stack(expected_probs), rtol=0, atol=1e-5)
    assert labels.tolist() == [s.label for s in samples]
    metrics = evaluate(run, data, batch_size=8, tta="five-crop", out=run.parent / "eval-five")
    assert metrics["tta"] == "five-crop+hflip"
    assert metrics["plain"]["top1"] == pytest.approx(evaluate(run, data, batch_size=8, out=run.parent / "e")["top1"])
