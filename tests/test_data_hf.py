"""Hugging Face data sets (finetune.data.hf, ``--data hf:DIR``) and five-crop TTA, on the embedded
Fashion-MNIST images: the same images as class folders and as a saved ``datasets.Dataset`` split and
train the same; eval reads ``hf:``; mistakes are one line with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.config import Recipe
from finetune.data import scan_folder, scan_labelled
from finetune.data.demo import write_demo_folder
from finetune.data.hf import normalise_source, parse_row, scan_hf, scan_hf_labelled
from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.inference import evaluate, predict, report_run
from finetune.rundir import RUN_RECIPE, RUN_SKIPPED, RUN_WEIGHTS
from tests.helpers import run_finetune

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

TRAIN = ["--model", "mobilenetv2_050", "--weights", "none", "--epochs", "1", "--strategy", "full",
         "--img-size", "32", "--batch-size", "8", "--num-workers", "0", "--memory-format", "contiguous",
         "--no-progress", "--seed", "3"]


def _features(names: list[str]) -> "datasets.Features":
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})


def _interleaved(folder: Path) -> tuple[list[Path], list[str]]:
    """The files of ``folder/<class>/*.png`` with classes interleaved (row i: the i-th file of each
    class in turn); within a class, sorted file order -- the order the folder scan sorts them in."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    per_class = [sorted((folder / c).glob("*.png")) for c in classes]
    files = [fs[i] for i in range(max(map(len, per_class))) for fs in per_class if i < len(fs)]
    return files, classes


def _dataset(files: list[Path], classes: list[str], **extra_rows) -> "datasets.Dataset":
    """A Dataset whose image column holds the files' own bytes (images live in the arrow file)."""
    images = [{"bytes": f.read_bytes(), "path": None} for f in files]
    labels = [classes.index(f.parent.name) for f in files]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=_features(classes))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_folder(tmp_path_factory.mktemp("hf") / "demo", train_per_class=8, val_per_class=3)


@pytest.fixture(scope="module")
def flat(demo) -> Path:
    return demo / "train"


@pytest.fixture(scope="module")
def saved(flat, tmp_path_factory) -> tuple[Path, list[Path]]:
    """``flat``'s images as one Dataset saved with save_to_disk, and the file each row came from."""
    files, classes = _interleaved(flat)
    out = tmp_path_factory.mktemp("hf_saved") / "fashion"
    _dataset(files, classes).save_to_disk(out)
    return out, files


def _files(samples, files: list[Path]) -> list[tuple[str, int]]:
    return [(str(files[parse_row(s.path)[3]]), s.label) for s in samples]


@pytest.mark.parametrize("seed", [0, 7])
def test_saved_dataset_splits_like_the_class_folders(flat, saved, seed):
    out, files = saved
    folder = scan_folder(flat, val_fraction=0.25, seed=seed)
    hf = scan_hf(f"hf:{out}", val_fraction=0.25, seed=seed)
    assert hf.classes == folder.classes
    assert _files(hf.train, files) == [(str(s.path), s.label) for s in folder.train]
    assert _files(hf.val, files) == [(str(s.path), s.label) for s in folder.val]
    assert "divided with val_fraction=0.25" in hf.layout and not hf.skipped
    assert str(hf.train[0].path).startswith(f"hf:{out}::all/image/")


def test_dataset_dict_splits_string_labels_and_bad_rows(demo, tmp_path):
    train_files, classes = _interleaved(demo / "train")
    val_files, _ = _interleaved(demo / "val")
    rows = lambda fs: {"picture": [{"bytes": f.read_bytes(), "path": None} for f in fs],  # noqa: E731
                       "kind": [f.parent.name for f in fs]}
    train = rows(train_files)
    train["picture"] += [{"bytes": b"not an image", "path": None}, None]
    train["kind"] += [classes[0], classes[1]]
    train["kind"][2] = ""  # a row without a label
    feats = datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")})
    dd = datasets.DatasetDict(train=datasets.Dataset.from_dict(train, features=feats),
                              validation=datasets.Dataset.from_dict(rows(val_files), features=feats),
                              test=datasets.Dataset.from_dict(rows(val_files[:5]), features=feats))
    dd.save_to_disk(tmp_path / "dd")
    split = scan_hf(f"hf:{tmp_path}/dd", image_column="picture", label_column="kind")
    assert split.classes == sorted(classes)  # string labels without ClassLabel: sorted unique
    assert len(split.train) == len(train_files) - 1 and len(split.val) == len(val_files)
    assert "splits train/validation" in split.layout and any("`test` left out" in w for w in split.warnings)
    reasons = {parse_row(s.path)[3]: s.reason for s in split.skipped}
    n = len(train_files)
    assert reasons == {2: "no label", n: "not an image (cannot identify)", n + 1: "no image in this row"}
    names, samples, skipped = scan_hf_labelled(f"hf:{tmp_path}/dd", classes=split.classes, image_column="picture",
                                               label_column="kind")
    assert names == split.classes and len(samples) == 5 and not skipped  # eval reads the test split
    assert all(parse_row(s.path)[1] == "test" for s in samples)
    auto = scan_hf(f"hf:{tmp_path}/dd", label_column="kind")  # default `image` absent: the Image feature
    assert "image column `picture`" in auto.layout
    with pytest.raises(FinetuneError, match=r"no image column `photo` \(columns: `picture` \(Image\), `kind` "):
        scan_hf(f"hf:{tmp_path}/dd", image_column="photo", label_column="kind")


def test_imagefolder_source(flat, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    split = scan_hf(f"hf:imagefolder:{flat}", val_fraction=0.25, seed=0)
    folder = scan_folder(flat, val_fraction=0.25, seed=0)
    assert split.classes == folder.classes and len(split.train) == len(folder.train)
    assert len(split.val) == len(folder.val)


@pytest.mark.parametrize("case", ["missing_folder", "missing_column", "not_installed", "not_a_dataset"])
def test_cli_bad_input_exits_2_with_one_line(saved, tmp_path, case, monkeypatch, capsys):
    out, _ = saved
    data, extra = f"hf:{out}", []
    if case == "missing_folder":
        data = f"hf:{tmp_path}/nothing"
    elif case == "missing_column":
        extra = ["--label-column", "klass"]
    elif case == "not_a_dataset":
        (tmp_path / "plain").mkdir()
        data = f"hf:{tmp_path}/plain"
    else:  # `import datasets` fails (a folder not opened before, so nothing comes from this process's cache)
        monkeypatch.setitem(sys.modules, "datasets", None)
        (tmp_path / "ds").mkdir()
        data = f"hf:{tmp_path}/ds"
    code = main(["train", "--data", data, *TRAIN, *extra, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert len(err.strip().splitlines()) == 1, err
    expected = {"missing_folder": "does not exist", "not_installed": "pip install finetune-vision[hf]",
                "missing_column": "no label column `klass` (columns: `image` (Image), `label` (ClassLabel))",
                "not_a_dataset": "is not a data set written by save_to_disk"}[case]
    assert expected in err


@pytest.fixture(scope="module")
def runs(flat, saved, tmp_path_factory) -> tuple[Path, Path]:
    out, _ = saved
    base = tmp_path_factory.mktemp("hf_runs")
    folder = run_finetune("train", "--data", str(flat), *TRAIN, "--out", str(base / "folder"), timeout=600)
    assert folder.returncode == 0, folder.stderr[-3000:]
    hf = run_finetune("train", "--data", f"hf:{out}", "--image-column", "image", "--label-column", "label", *TRAIN,
                      "--out", str(base / "hf"), timeout=600)
    assert hf.returncode == 0, hf.stderr[-3000:]
    assert "hugging face data set (split `all` divided with val_fraction=0.2, seed=3" in hf.stdout
    return base / "folder", base / "hf"


def test_training_from_hf_gives_bit_identical_weights_to_folders(runs, saved):
    folder, hf = runs
    a, b = load_file(folder / RUN_WEIGHTS), load_file(hf / RUN_WEIGHTS)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((folder / "metrics.json").read_text())["top1"] == json.loads(
        (hf / "metrics.json").read_text())["top1"]
    assert Recipe.from_yaml(hf / RUN_RECIPE).data.root == f"hf:{saved[0]}"
    assert not (hf / RUN_SKIPPED).exists()
    assert "data:image/jpeg;base64" in (hf / "report.html").read_text()  # gallery thumbnails read the rows
    (hf / "report.html").unlink()
    assert report_run(hf) == hf / "report.html"  # `finetune report` re-reads the split (scan_data_section)


def test_sources_are_normalised_and_labels_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert normalise_source("hf:~/ds/../ds") == f"hf:{tmp_path}/ds"
    assert normalise_source("hf:imagefolder:~/pics") == f"hf:imagefolder:{tmp_path}/pics"
    with pytest.raises(FinetuneError, match="cannot be combined with the Hugging Face data set"):
        Recipe(data="hf:~/ds", labels="labels.csv")


def test_eval_on_hf_matches_eval_on_folders_and_five_crop_tta(runs, flat, saved, tmp_path):
    _, hf = runs
    by_folder = evaluate(hf, flat, out=tmp_path / "f", batch_size=32)
    by_hf = evaluate(hf, f"hf:{saved[0]}", out=tmp_path / "h", batch_size=32)
    assert by_hf["data"] == f"hf:{saved[0]}" and (tmp_path / "h" / "predictions.csv").is_file()
    for key in ("top1", "num_samples", "loss"):
        assert by_hf[key] == pytest.approx(by_folder[key])
    five = evaluate(hf, f"hf:{saved[0]}", out=tmp_path / "t", batch_size=32, tta="five-crop")
    assert five["tta"] == "five-crop+hflip" and 0 <= five["top1"] <= 1
    assert five["plain"]["top1"] == pytest.approx(by_hf["top1"])  # the centre crop is the plain view
    assert five["plain"]["loss"] == pytest.approx(by_hf["loss"], rel=1e-4)
    assert five["loss"] != pytest.approx(by_hf["loss"], rel=1e-4)
    text = run_finetune("eval", str(hf), "--data", f"hf:{saved[0]}", "--five-crop", "--out", str(tmp_path / "x"))
    assert text.returncode == 0, text.stderr[-2000:]
    assert "without TTA" in text.stdout and "five-crop+hflip" in text.stdout
    _, samples, _ = scan_labelled(flat)
    results = predict(hf, [samples[0].path], top_k=2, tta="five-crop")
    assert len(results[0].labels) == 2 and results[0].error is None
