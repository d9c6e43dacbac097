"""Tests for finetune.data: scanning, splitting, loading, transforms, weights."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from finetune.data import (
    BadImageWarning,
    ImageDataset,
    Sample,
    Skipped,
    build_transform,
    class_weights,
    list_images,
    load_rgb,
    scan_folder,
    scan_labelled,
    to_rgb,
    write_skipped,
)
from finetune.data import files as data_files
from finetune.errors import FinetuneError

DIGITS = sorted(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
EVAL_CFG = dict(
    input_size=(3, 160, 160),
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    crop_pct=0.95,
    crop_mode="center",
)
MESSY_SKIPPED = {
    "all_bad/zero.png": "empty file",
    "broken/big.png": "decompression bomb (100000000 pixels)",
    "broken/bomb.png": "decompression bomb (10000000000 pixels)",
    "broken/empty.jpg": "empty file",
    "broken/text.jpg": "not an image (cannot identify)",
    "broken/truncated.jpg": "truncated/corrupt: image file is truncated",  # prefix
}


@pytest.fixture(autouse=True, scope="module")
def _scan_cache(tmp_path_factory: pytest.TempPathFactory):
    """Scans here cache their verdicts in a temporary folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def rel(paths, root: Path) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


def make_folder(root: Path, counts: dict[str, int], size=(8, 8)) -> Path:
    """``root/<class>/NN.png`` with ``counts[class]`` small grey PNGs (0 -> empty folder)."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", size, i % 256).save(root / name / f"{i:02d}.png")
    return root


def assert_one_line_error(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# --------------------------------------------------------------------------- split


def test_scan_digits_stratified_split(digits_folder):
    split = scan_folder(digits_folder, val_fraction=0.2, seed=0)
    assert split.classes == DIGITS
    assert split.layout == "class folders (split with val_fraction=0.2, seed=0)"
    assert split.skipped == [] and split.warnings == []
    for label in range(10):
        assert sum(s.label == label for s in split.train) == 32
        assert sum(s.label == label for s in split.val) == 8
    train, val = {s.path for s in split.train}, {s.path for s in split.val}
    assert not train & val
    on_disk = {p for p in digits_folder.rglob("*.png")}
    assert train | val == on_disk
    for s in split.train + split.val:  # label matches folder
        assert split.classes[s.label] == s.path.parent.name


def test_split_deterministic_and_seed_dependent(digits_folder, monkeypatch):
    a = scan_folder(digits_folder, seed=0, check_images=False)
    b = scan_folder(digits_folder, seed=0, check_images=False)
    c = scan_folder(digits_folder, seed=1, check_images=False)
    assert a.train == b.train and a.val == b.val
    assert {s.path for s in a.val} != {s.path for s in c.val}
    assert len(a.val) == len(c.val) == 80
    # independent of the order the filesystem lists entries in
    real_listdir = data_files._listdir
    monkeypatch.setattr(data_files, "_listdir", lambda path: list(reversed(real_listdir(path))))
    d = scan_folder(digits_folder, seed=0, check_images=False)
    assert d.classes == a.classes and d.train == a.train and d.val == a.val


def test_split_small_classes(tmp_path):
    root = make_folder(tmp_path, {"a": 2, "b": 3, "c": 1, "d": 10})
    split = scan_folder(root, val_fraction=0.1)
    val_counts = {c: sum(split.classes[s.label] == c for s in split.val) for c in split.classes}
    assert val_counts == {"a": 1, "b": 1, "c": 0, "d": 1}
    assert any("`c`" in w and "single image" in w for w in split.warnings)
    no_val = scan_folder(root, val_fraction=0.0)
    assert no_val.val == [] and len(no_val.train) == 16


def test_scan_rejects_bad_val_fraction(digits_folder):
    for bad in (1.0, -0.1, 2):
        with pytest.raises(FinetuneError, match="val_fraction") as excinfo:
            scan_folder(digits_folder, val_fraction=bad)
        assert_one_line_error(excinfo, str(bad))


def copy_split(digits_folder: Path, root: Path, val_name: str, classes=DIGITS, val_classes=DIGITS):
    for c in classes:
        files = sorted((digits_folder / c).glob("*.png"))
        (root / "train" / c).mkdir(parents=True)
        for f in files[:30]:
            shutil.copy(f, root / "train" / c / f.name)
        if c in val_classes:
            (root / val_name / c).mkdir(parents=True)
            for f in files[30:]:
                shutil.copy(f, root / val_name / c / f.name)
    return root


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_train_val_layout(digits_folder, tmp_path, val_name):
    classes = DIGITS[:3]
    root = copy_split(digits_folder, tmp_path, val_name, classes, val_classes=classes[:2])
    (root / "test").mkdir()  # extra folder next to train/: ignored with a warning
    (root / "test" / "x").mkdir()
    split = scan_folder(root, check_images=False)
    assert split.layout == "train/val"
    assert split.classes == classes
    assert len(split.train) == 90 and len(split.val) == 20
    assert all(s.path.parts[-3] == "train" for s in split.train)
    assert all(s.path.parts[-3] == val_name for s in split.val)
    assert any(classes[2] in w and "no images" in w for w in split.warnings)  # absent from val
    assert any("`test`" in w for w in split.warnings)


def test_train_without_val_is_split(digits_folder, tmp_path):
    root = copy_split(digits_folder, tmp_path, "unused", DIGITS[:2], val_classes=[])
    split = scan_folder(root, val_fraction=0.2, check_images=False)
    assert split.layout.startswith("class folders (split")
    assert split.classes == DIGITS[:2] and len(split.val) == 12
    assert any("no validation folder" in w for w in split.warnings)


def test_class_named_train_is_a_class(tmp_path):
    root = make_folder(tmp_path, {"train": 3, "bus": 3})  # no sub-folders: it's a class
    assert scan_folder(root).classes == ["bus", "train"]


# --------------------------------------------------------------------------- messy folder


def test_messy_folder_scan(messy_folder):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    filters_before = list(warnings.filters)
    split = scan_folder(messy_folder, val_fraction=0.2, seed=0)
    assert warnings.filters == filters_before  # the bomb filter does not leak
    assert split.classes == ["broken", "colour", "grey"]
    skipped = {s.path.relative_to(messy_folder).as_posix(): s.reason for s in split.skipped}
    assert skipped.keys() == MESSY_SKIPPED.keys()
    for name, reason in MESSY_SKIPPED.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
    used = set(rel([s.path for s in split.train + split.val], messy_folder))
    assert used == {
        "broken/ok.png",
        "colour/cmyk.jpg", "colour/exif_rotated.jpg", "colour/nested/deep.bmp",
        "colour/palette_transparent.png", "colour/photo.webp", "colour/rgb.jpg", "colour/rgba.png",
        "grey/bilevel.png", "grey/float.tif", "grey/frames.gif", "grey/gradient16.png",
        "grey/grey.png",
    }  # hidden files/dirs, .DS_Store, Thumbs.db, .txt: neither used nor skipped
    assert any("`" + str(messy_folder / "empty_class") + "`" in w for w in split.warnings)
    assert any("all_bad" in w and "1 unreadable" in w for w in split.warnings)
    assert split.num_classes == 3 and "3 classes" in split.summary()


def test_messy_folder_without_decoding_skips_only_empty_files(messy_folder):
    split = scan_folder(messy_folder, check_images=False)
    assert {s.path.name: s.reason for s in split.skipped} == {
        "zero.png": "empty file", "empty.jpg": "empty file"
    }


def test_decompression_bomb_limit_is_respected(tmp_path, monkeypatch):
    root = make_folder(tmp_path, {"a": 2, "b": 2}, size=(10, 10))
    Image.new("L", (100, 100)).save(root / "a" / "big.png")
    expected = [Skipped(root / "a" / "big.png", "decompression bomb (10000 pixels)")]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 px: warning tier
    assert scan_folder(root).skipped == expected
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # error tier (> 2x the limit)
    assert scan_folder(root).skipped == expected


def test_symlink_loop_does_not_hang(tmp_path):
    root = make_folder(tmp_path, {"a": 2, "b": 2})
    os.symlink(root / "a", root / "a" / "loop")
    split = scan_folder(root, check_images=False)
    assert len(split.train) + len(split.val) == 4


# --------------------------------------------------------------------------- errors


def error_cases(tmp_path: Path):
    missing = tmp_path / "missing"
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("L", (4, 4)).save(loose / "a.png")
    one = make_folder(tmp_path / "one", {"cats": 3, "dogs": 0})
    no_images = make_folder(tmp_path / "noimg", {"cats": 0, "dogs": 0})
    (no_images / "cats" / "notes.txt").write_text("x")
    extra_val = make_folder(
        tmp_path / "xv", {"train/a": 2, "train/b": 2, "val/a": 1, "val/zebra": 1}
    )
    two_vals = make_folder(tmp_path / "tv", {"train/a": 1, "val/a": 1, "valid/a": 1})
    val_only = make_folder(tmp_path / "vo", {"val/a": 1, "val/b": 1})
    return [
        (missing, ["does not exist", str(missing)]),
        (a_file, ["not a folder", str(a_file)]),
        (empty, ["no class folders", str(empty), "<class>"]),
        (loose, ["no class folders", "1 image(s) directly", "<class>"]),
        (one, ["only one class", "`cats`", "at least 2"]),
        (no_images, ["no images", "`cats`", "`dogs`"]),
        (extra_val, ["`zebra`", str(extra_val / "val"), str(extra_val / "train")]),
        (two_vals, ["more than one validation folder", "`val`", "`valid`"]),
        (val_only, ["no `train/` folder", str(val_only)]),
    ]


def test_scan_errors(tmp_path):
    for root, needles in error_cases(tmp_path):
        with pytest.raises(FinetuneError) as excinfo:
            scan_folder(root)
        assert_one_line_error(excinfo, *needles)


def test_all_images_of_a_class_unreadable(tmp_path):
    root = make_folder(tmp_path, {"a": 2, "b": 0})
    (root / "b" / "bad.jpg").write_text("nope")
    with pytest.raises(FinetuneError) as excinfo:
        scan_folder(root)
    assert_one_line_error(excinfo, "only one class", "`a`")


# --------------------------------------------------------------------------- scan_labelled


def test_scan_labelled_with_model_classes(digits_folder, tmp_path):
    root = copy_split(digits_folder, tmp_path, "valid", DIGITS[:2])
    model_classes = ["zebra", DIGITS[1], DIGITS[0]]  # different order, one extra class
    names, samples, skipped = scan_labelled(root, classes=model_classes)
    assert names == model_classes and skipped == []
    assert len(samples) == 20
    assert all(s.path.parts[-3] == "valid" for s in samples)  # uses the valid/ folder
    assert all(model_classes[s.label] == s.path.parent.name for s in samples)
    names, samples, _ = scan_labelled(root / "train")
    assert names == DIGITS[:2] and len(samples) == 60
    with pytest.raises(FinetuneError) as excinfo:
        scan_labelled(root / "train", classes=[DIGITS[0], "zebra"])
    assert_one_line_error(excinfo, f"`{DIGITS[1]}`", "not classes of the model")


def test_scan_labelled_messy_and_errors(messy_folder, tmp_path):
    names, samples, skipped = scan_labelled(messy_folder)
    assert names == ["broken", "colour", "grey"]  # folders with only bad files are dropped
    assert len(samples) == 13
    assert {s.path.relative_to(messy_folder).as_posix() for s in skipped} == MESSY_SKIPPED.keys()
    with pytest.raises(FinetuneError) as excinfo:
        scan_labelled(tmp_path / "nope")
    assert_one_line_error(excinfo, "does not exist")
    make_folder(tmp_path / "t", {"train/a": 1})
    with pytest.raises(FinetuneError) as excinfo:
        scan_labelled(tmp_path / "t")
    assert_one_line_error(excinfo, "no validation folder")


# --------------------------------------------------------------------------- list_images


def test_list_images_mixed(messy_folder, tmp_path):
    extra = tmp_path / "extra.PNG"  # upper-case extension
    Image.new("RGB", (4, 4)).save(extra, format="PNG")
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    found, skipped = list_images([extra, messy_folder / "colour", txt, extra])
    assert found[0] == extra and found.count(extra) == 1
    assert rel(found[1:], messy_folder) == [
        "colour/cmyk.jpg", "colour/exif_rotated.jpg", "colour/nested/deep.bmp",
        "colour/palette_transparent.png", "colour/photo.webp", "colour/rgb.jpg", "colour/rgba.png",
    ]
    assert skipped == [Skipped(txt, "not an image file extension")]
    found, skipped = list_images([str(messy_folder / "broken")])
    assert rel(found, messy_folder) == ["broken/ok.png"]
    assert len(skipped) == 5
    with pytest.raises(FinetuneError) as excinfo:
        list_images([extra, tmp_path / "missing.jpg"])
    assert_one_line_error(excinfo, "missing.jpg", "does not exist")


# --------------------------------------------------------------------------- load_rgb


@pytest.mark.parametrize(
    "name, size",
    [
        ("colour/rgb.jpg", (40, 30)),
        ("colour/cmyk.jpg", (20, 10)),
        ("colour/exif_rotated.jpg", (20, 40)),  # stored 40x20, EXIF orientation 6
        ("colour/palette_transparent.png", (10, 10)),
        ("colour/rgba.png", (10, 10)),
        ("colour/photo.webp", (12, 12)),
        ("colour/nested/deep.bmp", (9, 7)),
        ("grey/grey.png", (16, 16)),
        ("grey/gradient16.png", (64, 16)),
        ("grey/float.tif", (64, 8)),
        ("grey/bilevel.png", (8, 8)),
        ("grey/frames.gif", (8, 8)),
    ],
)
def test_load_rgb_modes_and_sizes(messy_folder, name, size):
    img = load_rgb(messy_folder / name)
    assert img.mode == "RGB" and img.size == size
    assert img.getpixel((0, 0)) is not None  # loaded: the file is closed, pixels in memory


def test_load_rgb_pixel_values(messy_folder):
    def px(name, xy):
        return load_rgb(messy_folder / name).getpixel(xy)

    assert px("colour/palette_transparent.png", (0, 0)) == (0, 255, 0)
    assert px("colour/palette_transparent.png", (5, 5)) == (255, 255, 255)  # transparent
    assert px("colour/rgba.png", (0, 0)) == (255, 255, 255)
    assert px("colour/rgba.png", (9, 9)) == (255, 0, 0)
    assert px("colour/cmyk.jpg", (5, 5)) == (255, 0, 0)
    assert px("grey/grey.png", (3, 3)) == (77, 77, 77)
    for name in ("grey/gradient16.png", "grey/float.tif"):
        row = np.asarray(load_rgb(messy_folder / name))[0, :, 0].astype(int)
        assert row[0] == 0 and row[-1] == 255 and abs(row[len(row) // 2] - 128) <= 3
        assert np.all(np.diff(row) >= 0) and len(set(row)) > 50  # a ramp, not clipped white


def test_to_rgb_other_modes():
    ramp32 = np.tile(np.arange(0, 64 * 2000, 2000, dtype=np.int32), (2, 1))  # > 16 bits: min-max
    assert np.asarray(to_rgb(Image.fromarray(ramp32)))[0, -1, 0] == 255
    small = Image.fromarray(np.full((2, 2), 200, np.int32))  # mode I holding 8-bit values
    assert to_rgb(small).getpixel((0, 0)) == (200, 200, 200)
    values = np.array([[0, 32896, 65535]], ">u2")
    big_endian = Image.frombytes("I;16B", (3, 1), values.tobytes())
    assert np.asarray(to_rgb(big_endian))[0, :, 0].tolist() == [0, 128, 255]
    floats = Image.fromarray(np.array([[-1.0, 3.0]], np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 255]
    la = Image.new("LA", (2, 2), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_draft_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (400, 300)).save(path)
    assert load_rgb(path, draft_size=64).size == (100, 75)
    assert load_rgb(path).size == (400, 300)


# --------------------------------------------------------------------------- ImageDataset


def test_image_dataset_substitutes_broken_files(tmp_path):
    root = make_folder(tmp_path, {"a": 2, "b": 1})
    split = scan_folder(root, val_fraction=0)
    ds = ImageDataset(split.train, transform=lambda im: im.size)
    assert len(ds) == 3 and ds[2] == ((8, 8), 1)
    split.train[0].path.write_bytes(b"")  # changed on disk after scanning
    with pytest.warns(BadImageWarning, match="00.png"):
        assert ds[0] == ((8, 8), 0)  # the next index (a/01.png) instead
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file only
        assert ds[0] == ((8, 8), 0)
    for s in split.train:
        s.path.unlink()
    with pytest.raises(FinetuneError, match="none of the 3 images"), pytest.warns(BadImageWarning):
        ds[1]


def test_image_dataset_bare_paths(messy_folder, tmp_path):
    paths = [messy_folder / "grey" / "grey.png", str(messy_folder / "colour" / "rgb.jpg")]
    tf = build_transform(EVAL_CFG, train=False, img_size=32)
    ds = ImageDataset(paths, tf)
    x, y = ds[1]
    assert y == -1 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 32, 32) and batch[1].tolist() == [-1, -1]
    gone = tmp_path / "gone.png"
    Image.new("RGB", (4, 4)).save(gone)
    ds = ImageDataset([gone], tf)
    gone.unlink()
    with pytest.raises(FinetuneError) as excinfo:
        ds[0]
    assert_one_line_error(excinfo, str(gone))
    with pytest.raises(TypeError):
        ImageDataset([gone, Sample(gone, 0)], tf)


# --------------------------------------------------------------------------- transforms


def test_build_transform_shapes_and_determinism():
    import timm
    import timm.data

    model = timm.create_model("test_efficientnet", pretrained=False)
    cfg = timm.data.resolve_data_config(model=model)
    img = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    eval_tf = build_transform(cfg, train=False)
    assert eval_tf(img).shape == (3, *cfg["input_size"][1:])
    small = build_transform(cfg, train=False, img_size=32)
    assert small(img).shape == (3, 32, 32)
    assert torch.equal(small(img), small(img))
    train_tf = build_transform(cfg, train=True, img_size=48, color_jitter=0.4)
    torch.manual_seed(0)
    a = train_tf(img)
    b = train_tf(img)
    assert a.shape == b.shape == (3, 48, 48) and not torch.equal(a, b)
    aug = build_transform(cfg, train=True, img_size=32, auto_augment="rand-m9-mstd0.5")
    assert aug(img).shape == (3, 32, 32)
    with pytest.raises(FinetuneError, match="scale"):
        build_transform(cfg, train=True, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="input_size"):
        build_transform({"mean": (0, 0, 0)}, train=False)


# --------------------------------------------------------------------------- weights, files


def test_class_weights():
    samples = [Sample(Path("x"), 0)] * 6 + [Sample(Path("y"), 1)] * 3 + [Sample(Path("z"), 2)]
    w = class_weights(samples, 3)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([1 / 3, 2 / 3, 2.0]))
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    w4 = class_weights(samples, 4)  # class 3 absent: weight 1, mean still 1
    assert torch.allclose(w4, torch.tensor([1 / 3, 2 / 3, 2.0, 1.0]))
    assert torch.isclose(w4.mean(), torch.tensor(1.0))
    with pytest.raises(ValueError):
        class_weights(samples, 2)


def test_write_skipped(tmp_path):
    out = tmp_path / "run" / "skipped.tsv"
    skipped = [Skipped(Path("a/b.jpg"), "empty file"), Skipped(Path("c.png"), "bad\tx\ny")]
    write_skipped(skipped, out)
    assert out.read_text() == "a/b.jpg\tempty file\nc.png\tbad x y\n"
    assert os.listdir(out.parent) == ["skipped.tsv"]  # no temporary left behind
    write_skipped([], out)
    assert out.read_text() == ""
