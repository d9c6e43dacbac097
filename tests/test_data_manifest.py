"""Labels from a CSV / JSON Lines manifest (finetune.data.manifest): same split and weights as folders."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from finetune.config import Recipe
from finetune.data import scan_folder, scan_manifest, scan_manifest_labelled
from finetune.data.demo import write_demo_folder
from finetune.errors import FinetuneError
from finetune.rundir import RUN_RECIPE, RUN_SKIPPED, RUN_WEIGHTS
from finetune.train.outputs import recipe_for_disk
from tests.helpers import run_finetune

TRAIN = ["--model", "mobilenetv2_050", "--weights", "none", "--epochs", "1", "--strategy", "full",
         "--img-size", "32", "--batch-size", "8", "--num-workers", "0", "--memory-format", "contiguous",
         "--no-progress", "--seed", "3"]


def _flat(tmp_path: Path) -> Path:
    """The demo's train/ classes as a flat class-folder root."""
    demo = write_demo_folder(tmp_path / "demo", train_per_class=8, val_per_class=3)
    flat = tmp_path / "flat"
    shutil.copytree(demo / "train", flat)
    return flat


def _rows(root: Path, with_split: bool = False) -> list[tuple[str, str, str]]:
    """(path relative to root, class, split) for root/[split/]<class>/<file>."""
    rows = []
    for p in sorted(root.rglob("*.png")):
        rel = p.relative_to(root)
        rows.append((rel.as_posix(), rel.parts[-2], rel.parts[0] if with_split else ""))
    return rows


def _write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def _same(a, b) -> bool:
    return (a.classes == b.classes and [(str(s.path), s.label) for s in a.train] == [(str(s.path), s.label) for s in b.train]
            and [(str(s.path), s.label) for s in a.val] == [(str(s.path), s.label) for s in b.val])


@pytest.mark.parametrize("seed", [0, 7])
def test_manifest_without_split_column_splits_like_the_folder(tmp_path, seed):
    flat = _flat(tmp_path)
    labels = _write_csv(tmp_path / "labels.csv", "path,label", [f"{p},{c}" for p, c, _ in _rows(flat)[::-1]])
    folder = scan_folder(flat, val_fraction=0.25, seed=seed)
    manifest = scan_manifest(flat, labels, val_fraction=0.25, seed=seed)
    assert _same(folder, manifest)
    assert manifest.layout.startswith("manifest labels.csv (path column `path`, label column `label`; split with")
    assert not manifest.skipped and not manifest.warnings


def test_manifest_split_column_matches_train_val_folder_and_leaves_test_out(tmp_path):
    demo = write_demo_folder(tmp_path / "demo", train_per_class=8, val_per_class=3)
    rows = [f"{p},{c},{s}" for p, c, s in _rows(demo, with_split=True)]
    labels = _write_csv(tmp_path / "m.csv", "path,label,split", rows + ["test/x.png,bird,test"])
    manifest = scan_manifest(demo, labels)
    assert _same(scan_folder(demo), manifest)
    assert "split column `split`" in manifest.layout
    assert any("left out 1 row(s)" in w and "test: 1" in w for w in manifest.warnings)


def test_columns_are_auto_detected_and_jsonl_and_absolute_paths_work(tmp_path):
    flat = _flat(tmp_path)
    rows = _rows(flat)
    csv_file = _write_csv(tmp_path / "a.csv", "Filename,Class", [f"{p},{c}" for p, c, _ in rows])
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"image": str(flat / p), "category": c}) + "\n" for p, c, _ in rows))
    a, b = scan_manifest(flat, csv_file), scan_manifest(flat, jsonl)
    assert _same(a, b) and _same(a, scan_folder(flat))
    assert "path column `Filename`, label column `Class`" in a.layout
    assert "path column `image`, label column `category`" in b.layout
    custom = _write_csv(tmp_path / "c.csv", "img_id,species", [f"{p},{c}" for p, c, _ in rows])
    c = scan_manifest(flat, custom, path_column="img_id", label_column="species")
    assert _same(a, c)


def test_missing_files_empty_labels_and_broken_images_are_skipped_and_counted(tmp_path):
    flat = _flat(tmp_path)
    listed = _rows(flat)
    rows = [f"{p},{c}" for p, c, _ in listed]
    (flat / "broken.png").write_text("not an image")
    extra = ["gone/nowhere.png,trouser", "broken.png,trouser", f"{listed[0][0]},", ",trouser", rows[1]]
    split = scan_manifest(flat, _write_csv(tmp_path / "m.csv", "path,label", rows + extra))
    reasons = sorted(s.reason.split(" (")[0] for s in split.skipped)
    assert reasons == ["empty label", f"line {len(rows) + 5}: empty path", "missing file", "not an image"], reasons
    assert len(split.train) + len(split.val) == len(rows)  # the extra rows are all skipped or duplicates
    assert any("1 duplicate row(s)" in w for w in split.warnings)


@pytest.mark.parametrize("case, match", [
    ("no_path", r"has no path column `path` \(columns found: `name`, `label`\)"),
    ("empty", "is empty"),
    ("no_labels", "label column `label` .* has no labels"),
    ("not_found", "not found"),
    ("no_root", "does not exist"),
    ("val_only_class", "val row\\(s\\) of class\\(es\\) `bird`"),
    ("one_class", "fewer than 2 classes"),
])
def test_bad_manifest_is_one_line(tmp_path, case, match):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(root / f"{name}.png")
    texts = {"no_path": "name,label\na.png,cat\n", "empty": "path,label\n", "no_labels": "path,label\na.png,\nb.png,\n",
             "val_only_class": "path,label,split\na.png,cat,train\nb.png,dog,train\nc.png,bird,val\n",
             "one_class": "path,label\na.png,cat\nb.png,cat\n"}
    labels = tmp_path / "m.csv"
    if case in texts:
        labels.write_text(texts[case])
    with pytest.raises(FinetuneError, match=match) as info:
        scan_manifest(root if case != "no_root" else tmp_path / "nope", labels)
    assert "\n" not in str(info.value)


def test_second_scan_of_a_manifest_comes_from_the_scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    flat = _flat(tmp_path)
    for p in flat.rglob("*.png"):
        os.utime(p, (time.time() - 60,) * 2)
    labels = _write_csv(tmp_path / "m.csv", "path,label", [f"{p},{c}" for p, c, _ in _rows(flat)])
    first, second = scan_manifest(flat, labels).scan, scan_manifest(flat, labels).scan
    assert (first.decoded, second.decoded, second.cached) == (first.images, 0, first.images)


def test_recipe_stores_labels_absolute_and_relative_to_data(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("path,label\n")
    monkeypatch.chdir(tmp_path)
    recipe = Recipe.from_dict({}, overrides=["data.root=data", "data.labels=labels.csv"])
    saved = recipe_for_disk(recipe, tmp_path / "run")
    assert saved.data.labels == str((tmp_path / "data" / "labels.csv").resolve())
    assert Recipe(data="data", labels="x.csv").data.labels == "x.csv"


def test_eval_scan_of_a_manifest(tmp_path):
    flat = _flat(tmp_path)
    labels = _write_csv(tmp_path / "t.csv", "path,label", [f"{p},{c}" for p, c, _ in _rows(flat)])
    classes = scan_folder(flat).classes
    names, samples, skipped = scan_manifest_labelled(flat, labels, classes=classes)
    assert names == classes and len(samples) == len(_rows(flat)) and not skipped
    with pytest.raises(FinetuneError, match="not classes of the model"):
        scan_manifest_labelled(flat, labels, classes=classes[:1] + ["zzz"])


def test_train_from_manifest_gives_bit_identical_weights_to_folder(tmp_path):
    flat = _flat(tmp_path)
    rows = [f"{p},{c}" for p, c, _ in _rows(flat)]
    labels = _write_csv(tmp_path / "labels.csv", "filename,class", rows + ["missing.png,trouser"])
    folder = run_finetune("train", "--data", str(flat), *TRAIN, "--out", str(tmp_path / "folder"), timeout=600)
    assert folder.returncode == 0, folder.stderr[-3000:]
    manifest = run_finetune("train", "--data", str(flat), "--labels", str(labels), *TRAIN,
                            "--out", str(tmp_path / "manifest"), timeout=600)
    assert manifest.returncode == 0, manifest.stderr[-3000:]
    assert "manifest labels.csv (path column `filename`, label column `class`" in manifest.stdout
    a, b = load_file(tmp_path / "folder" / RUN_WEIGHTS), load_file(tmp_path / "manifest" / RUN_WEIGHTS)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert "missing file" in (tmp_path / "manifest" / RUN_SKIPPED).read_text()
    assert Recipe.from_yaml(tmp_path / "manifest" / RUN_RECIPE).data.labels == str(labels.resolve())
    by_folder = run_finetune("eval", str(tmp_path / "manifest"), "--data", str(flat), "--json",
                             "--out", str(tmp_path / "eval-folder"))
    by_manifest = run_finetune("eval", str(tmp_path / "manifest"), "--data", str(flat), "--labels", str(labels),
                               "--json", "--out", str(tmp_path / "eval-manifest"))
    assert by_folder.returncode == 0 and by_manifest.returncode == 0, by_manifest.stderr[-2000:]
    m1, m2 = json.loads(by_folder.stdout), json.loads(by_manifest.stdout)
    assert (m1["top1"], m1["num_samples"], m2["skipped_images"]) == (m2["top1"], m2["num_samples"], 1)


@pytest.mark.parametrize("case", ["no_path_column", "no_manifest"])
def test_cli_bad_manifest_exits_2_with_one_line(tmp_path, case):
    flat = tmp_path / "flat"
    flat.mkdir()
    labels = tmp_path / "m.csv"
    if case == "no_path_column":
        labels.write_text("name,label\na.png,cat\n")
    result = run_finetune("train", "--data", str(flat), "--labels", str(labels), *TRAIN,
                          "--out", str(tmp_path / "run"), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("columns found: `name`, `label`" if case == "no_path_column" else "not found") in result.stderr
