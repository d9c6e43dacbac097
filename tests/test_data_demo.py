"""The embedded Fashion-MNIST demo subset: arrays, provenance, rebuild, PNG folder."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune.data.demo as demo_data
from finetune.data.demo import DEMO_CLASSES, load_demo_arrays, write_demo_folder
from finetune.errors import FinetuneError

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "build_demo_dataset.py"
ASSET = REPO / "finetune" / "assets" / "fashion_mnist_demo.npz"
TRAIN_PER_CLASS, VAL_PER_CLASS = 300, 100


def _load_tool():
    spec = importlib.util.spec_from_file_location("build_demo_dataset", TOOL)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


tool = _load_tool()
needs_sources = pytest.mark.skipif(
    not all((tool.DEFAULT_SOURCE_DIR / f).is_file() for pair in tool.SPLIT_FILES.values() for f in pair),
    reason=f"Fashion-MNIST IDX files not installed in {tool.DEFAULT_SOURCE_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return load_demo_arrays()


@pytest.fixture(scope="module")
def full_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_folder(tmp_path_factory.mktemp("full") / "demo")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name != root.name)


# --- the arrays --------------------------------------------------------------------------


def test_arrays_shapes_and_dtypes(arrays):
    assert arrays["train_images"].shape == (10 * TRAIN_PER_CLASS, 28, 28)
    assert arrays["val_images"].shape == (10 * VAL_PER_CLASS, 28, 28)
    assert arrays["train_labels"].shape == (10 * TRAIN_PER_CLASS,)
    assert arrays["val_labels"].shape == (10 * VAL_PER_CLASS,)
    for key in ("train_images", "train_labels", "val_images", "val_labels"):
        assert arrays[key].dtype == np.uint8, key
    assert tuple(arrays["classes"].tolist()) == DEMO_CLASSES
    assert len(DEMO_CLASSES) == 10 and len(set(DEMO_CLASSES)) == 10
    assert all(c.replace("-", "").replace("_", "").isalnum() and c.islower() for c in DEMO_CLASSES)


def test_class_balance(arrays):
    assert np.bincount(arrays["train_labels"], minlength=10).tolist() == [TRAIN_PER_CLASS] * 10
    assert np.bincount(arrays["val_labels"], minlength=10).tolist() == [VAL_PER_CLASS] * 10
    assert int(arrays["train_per_class"]) == TRAIN_PER_CLASS
    assert int(arrays["val_per_class"]) == VAL_PER_CLASS


def test_images_are_real_and_distinct(arrays):
    for split in ("train", "val"):
        images = arrays[f"{split}_images"]
        assert images.max() == 255 and images.min() == 0
        assert len({img.tobytes() for img in images}) == len(images)


def test_provenance_val_from_test_split_train_from_train_split(arrays):
    assert str(arrays["train_source_split"]) == "train"
    assert str(arrays["val_source_split"]) == "test"
    train_idx, val_idx = arrays["train_source_indices"], arrays["val_source_indices"]
    assert len(np.unique(train_idx)) == len(train_idx) and train_idx.min() >= 0 and train_idx.max() < 60_000
    assert len(np.unique(val_idx)) == len(val_idx) and val_idx.min() >= 0 and val_idx.max() < 10_000
    files = arrays["source_files"].tolist()
    assert files == list(tool.SPLIT_FILES["train"] + tool.SPLIT_FILES["test"])
    assert arrays["source_raw_sha256"].tolist() == [tool.EXPECTED_RAW_SHA256[f] for f in files]
    assert all(len(h) == 64 for h in arrays["source_sha256"].tolist())
    assert int(arrays["seed"]) == 0
    assert "tools/build_demo_dataset.py" in str(arrays["build_command"])


def test_npz_loads_without_pickle():
    with np.load(ASSET, allow_pickle=False) as npz:
        assert all(npz[key].dtype != object for key in npz.files)


def test_load_returns_fresh_arrays():
    first = load_demo_arrays()
    first["train_images"][:] = 0
    assert load_demo_arrays()["train_images"].max() == 255


def test_license_ships_beside_the_data():
    text = (ASSET.parent / "FASHION_MNIST_LICENSE.txt").read_text()
    assert "Zalando SE" in text and "Permission is hereby granted" in text
    assert "tools/build_demo_dataset.py" in text


def test_idx_parser():
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]) + bytes([1, 2, 3, 4])
    assert tool.parse_idx(raw).tolist() == [[[1, 2]], [[3, 4]]]
    with pytest.raises(ValueError):
        tool.parse_idx(raw[:-1])
    with pytest.raises(ValueError):
        tool.parse_idx(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4))


@needs_sources
def test_subset_is_the_official_pixels(arrays):
    for split, name in (("train", "train"), ("test", "val")):
        images, labels, _ = tool.read_split(tool.DEFAULT_SOURCE_DIR, split)
        idx = arrays[f"{name}_source_indices"]
        np.testing.assert_array_equal(arrays[f"{name}_images"], images[idx])
        np.testing.assert_array_equal(arrays[f"{name}_labels"], labels[idx])


@needs_sources
def test_rebuild_is_reproducible(tmp_path):
    out = tmp_path / "rebuilt.npz"
    assert tool.main(["--out", str(out)]) == 0
    with np.load(ASSET, allow_pickle=False) as shipped, np.load(out, allow_pickle=False) as rebuilt:
        assert sorted(shipped.files) == sorted(rebuilt.files)
        for key in shipped.files:
            assert shipped[key].dtype == rebuilt[key].dtype, key
            np.testing.assert_array_equal(shipped[key], rebuilt[key], err_msg=key)


# --- the PNG folder ----------------------------------------------------------------------


def test_full_folder_file_counts(full_folder):
    assert sorted(p.name for p in full_folder.iterdir()) == ["train", "val"]
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        assert sorted(p.name for p in (full_folder / split).iterdir()) == sorted(DEMO_CLASSES)
        for cls in DEMO_CLASSES:
            assert len(list((full_folder / split / cls).glob("*.png"))) == n, (split, cls)
    assert len(_files(full_folder)) == 10 * (TRAIN_PER_CLASS + VAL_PER_CLASS)
    assert _siblings(full_folder) == []  # no temp folders left behind


def test_pngs_decode_to_stored_pixels(full_folder, arrays):
    for split in ("train", "val"):
        seen = 0
        for cls_index, cls in enumerate(DEMO_CLASSES):
            for png in (full_folder / split / cls).glob("*.png"):
                row = int(png.stem)
                assert arrays[f"{split}_labels"][row] == cls_index
                with Image.open(png) as img:
                    assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
                    np.testing.assert_array_equal(np.asarray(img), arrays[f"{split}_images"][row])
                seen += 1
        assert seen == len(arrays[f"{split}_labels"])


def test_second_call_is_a_no_op(full_folder):
    before = _mtimes(full_folder)
    inode = full_folder.stat().st_ino
    assert write_demo_folder(full_folder) == full_folder
    assert write_demo_folder(str(full_folder), TRAIN_PER_CLASS, VAL_PER_CLASS) == full_folder
    assert _mtimes(full_folder) == before
    assert full_folder.stat().st_ino == inode


def test_per_class_limits(tmp_path, arrays):
    root = write_demo_folder(tmp_path / "small", train_per_class=5, val_per_class=2)
    assert root == tmp_path / "small"
    for split, n in (("train", 5), ("val", 2)):
        labels = arrays[f"{split}_labels"]
        for cls_index, cls in enumerate(DEMO_CLASSES):
            rows = sorted(int(p.stem) for p in (root / split / cls).glob("*.png"))
            assert rows == np.flatnonzero(labels == cls_index)[:n].tolist()  # the first n of the class
    assert len(_files(root)) == 10 * (5 + 2)


def test_other_limits_replace_an_earlier_demo_folder(tmp_path):
    root = write_demo_folder(tmp_path / "demo", train_per_class=3, val_per_class=1)
    write_demo_folder(root, train_per_class=2, val_per_class=2)
    assert len(list(root.glob("train/*/*.png"))) == 20
    assert len(list(root.glob("val/*/*.png"))) == 20
    assert len(_files(root)) == 40
    assert _siblings(root) == []
    before = _mtimes(root)
    write_demo_folder(root, train_per_class=2, val_per_class=2)
    assert _mtimes(root) == before


def test_existing_empty_folder_is_filled(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    write_demo_folder(root, 1, 1)
    assert len(_files(root)) == 20


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "00001.png").write_bytes(b"not ours")
    with pytest.raises(FinetuneError, match="not demo images"):
        write_demo_folder(root, 1, 1)
    assert _files(root) == {"train/cat/00001.png"}
    assert _siblings(root) == []


def test_refuses_a_file_as_root(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FinetuneError, match="not a folder"):
        write_demo_folder(tmp_path / "f", 1, 1)


@pytest.mark.parametrize("kwargs", [
    {"train_per_class": 0}, {"train_per_class": TRAIN_PER_CLASS + 1}, {"val_per_class": VAL_PER_CLASS + 1},
    {"val_per_class": -1}, {"train_per_class": True}, {"val_per_class": 1.5},
])
def test_bad_limits(tmp_path, kwargs):
    with pytest.raises(FinetuneError, match="_per_class"):
        write_demo_folder(tmp_path / "demo", **kwargs)
    assert not (tmp_path / "demo").exists()


def test_crash_leaves_no_partial_dataset(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = Image.Image.save

    def flaky_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        write_demo_folder(tmp_path / "demo", 2, 2)
    assert not (tmp_path / "demo").exists()
    assert list(tmp_path.iterdir()) == []

    # an earlier complete folder survives a crash while rewriting it with other limits
    monkeypatch.setattr(Image.Image, "save", real_save)
    root = write_demo_folder(tmp_path / "demo", 1, 1)
    before = _mtimes(root)
    calls["n"] = 0
    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        write_demo_folder(root, 2, 2)
    assert _mtimes(root) == before
    assert _siblings(root) == []


def test_cli_writes_folder(tmp_path, capsys):
    assert demo_data.main([str(tmp_path / "d"), "--train-per-class", "1", "--val-per-class", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d")
    assert demo_data.main([str(tmp_path / "d"), "--train-per-class", "0"]) == 2


def test_docstring_examples_run():
    result = doctest.testmod(demo_data, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
