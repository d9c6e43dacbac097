"""Image folders: scan and validate, split, load, transform.

A user's data is a folder with one sub-folder per class, either

* ``root/<class>/**/<image>`` -- split here into train/val, stratified per class, or
* ``root/train/<class>/...`` + ``root/<val|valid|validation>/<class>/...`` -- used as given.

Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``...), ``Thumbs.db``, ``__MACOSX``
and files without an image extension are ignored silently. Files with an image extension that
cannot be decoded (empty, truncated, not an image, decompression bombs) are reported as
:class:`Skipped` with a one-phrase reason instead of crashing an epoch later. Mistakes in the
folder itself raise :class:`~finetune.errors.FinetuneError` with a one-line message.

>>> import tempfile, pathlib
>>> from PIL import Image
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("cat", "dog"):
...     (root / name).mkdir()
...     for i in range(5):
...         Image.new("RGB", (8, 8)).save(root / name / f"{i}.png")
>>> split = scan_folder(root, val_fraction=0.2, seed=0)
>>> split.classes, len(split.train), len(split.val)
(['cat', 'dog'], 8, 2)
"""

from __future__ import annotations

import math
import os
import random
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import timm.data
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.io import write_text
from finetune.errors import FinetuneError

__all__ = [
    "IMAGE_EXTENSIONS",
    "VAL_DIR_NAMES",
    "BadImageWarning",
    "FolderSplit",
    "ImageDataset",
    "Sample",
    "Skipped",
    "build_transform",
    "class_weights",
    "list_images",
    "load_rgb",
    "scan_folder",
    "scan_labelled",
    "to_rgb",
    "write_skipped",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
VAL_DIR_NAMES = ("val", "valid", "validation")
TRAIN_DIR_NAME = "train"

# Junk that operating systems and tools leave in folders; compared lower-case. Anything whose
# name starts with "." (.DS_Store, ._foo.jpg, .ipynb_checkpoints) is ignored as well.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin"})
_CHECK_SIZE = (64, 64)  # JPEGs are decoded at reduced scale (>= this size) when checking
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class BadImageWarning(UserWarning):
    """An image failed to load during training and another sample was used instead."""


class _UnsupportedMode(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    """One labelled image: ``label`` indexes the class list it came with."""

    path: Path
    label: int


@dataclass(frozen=True)
class Skipped:
    """A file with an image extension that cannot be used, and why (one short phrase)."""

    path: Path
    reason: str


@dataclass
class FolderSplit:
    """The result of :func:`scan_folder`: classes, train/val samples, skipped files, warnings."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[Skipped]
    layout: str
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        """A few human-readable lines: layout, counts per split, skipped files, warnings."""
        lines = [
            f"{self.root}: {self.num_classes} classes, {len(self.train)} train / "
            f"{len(self.val)} val images ({self.layout})"
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------- listing files


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def _has_image_ext(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _listdir(path: Path) -> list[os.DirEntry]:
    """Directory entries in whatever order the filesystem gives (callers sort)."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError as exc:
        raise FinetuneError(
            f"cannot read folder `{path}` ({exc.strerror or exc}); check that it exists "
            "and that you have permission to read it"
        ) from exc


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in _listdir(path) if not _is_ignored(e.name) and e.is_dir())


def _walk_images(top: Path) -> list[Path]:
    """Files with an image extension under ``top`` (recursive, sorted, junk ignored).

    Symlinked folders are followed, each real folder once (no loops).
    """
    found: list[Path] = []
    seen: set[str] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        for entry in _listdir(folder):
            if _is_ignored(entry.name):
                continue
            if entry.is_dir():
                stack.append(Path(entry.path))
            elif _has_image_ext(entry.name):
                found.append(Path(entry.path))  # includes broken links: reported as Skipped
    return sorted(found)


def _loose_images(folder: Path) -> int:
    return sum(
        1
        for e in _listdir(folder)
        if not _is_ignored(e.name) and not e.is_dir() and _has_image_ext(e.name)
    )


def _is_split_dir(path: Path) -> bool:
    """``train``/``val`` are split folders when they hold class folders (else it's a class)."""
    return path.is_dir() and bool(_subdirs(path))


# --------------------------------------------------------------------------- checking images


def _one_line(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """Map a decoding failure to a short phrase for :class:`Skipped`."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        match = _BOMB_PIXELS.search(str(exc))
        return f"decompression bomb ({match.group(1)} pixels)" if match else "decompression bomb"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (cannot identify)"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"unreadable: {exc.strerror or exc}"
    if isinstance(exc, _UnsupportedMode) or (
        isinstance(exc, OSError) and "not available" in str(exc)
    ):
        return f"unsupported: {_one_line(exc)}"
    if isinstance(exc, MemoryError):
        return "too large to decode (out of memory)"
    return f"truncated/corrupt: {_one_line(exc)}"


def _check_file(path: Path, decode: bool) -> str | None:
    """None if ``path`` is a usable image, else the reason it is not."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return _reason(exc)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file"
    if not decode:
        return None
    try:
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            pixels = img.size[0] * img.size[1]
            if limit and pixels > limit:  # also when the warnings filter was changed under us
                return f"decompression bomb ({pixels} pixels)"
            if img.format == "JPEG":
                # Reduced-scale IDCT: much cheaper, but the whole entropy-coded stream is
                # still read, so truncation is still detected.
                img.draft("RGB", _CHECK_SIZE)
            img.load()
            to_rgb(img)
    except Exception as exc:  # noqa: BLE001 -- every decoder failure becomes a Skipped
        return _reason(exc)
    return None


def _check_files(paths: Sequence[Path], check_images: bool) -> dict[Path, str]:
    """``{path: reason}`` for the unusable files among ``paths``, checked in a thread pool.

    PIL releases the GIL while decoding, so threads scale on both I/O and CPU. The
    decompression-bomb warning is turned into an error for the duration of the scan.
    """
    if not paths:
        return {}
    workers = min(32, (os.cpu_count() or 1) + 4, len(paths))
    Image.init()  # register every plugin before threads race to do it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
            reasons = list(pool.map(lambda p: _check_file(p, check_images), paths))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


# --------------------------------------------------------------------------- scanning folders


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FinetuneError(
            f"data folder `{path}` does not exist; pass the folder that holds one sub-folder "
            "per class (e.g. data/ with data/cat/*.jpg and data/dog/*.jpg)"
        )
    if not path.is_dir():
        raise FinetuneError(
            f"data folder `{path}` is a file, not a folder; pass the folder that holds one "
            "sub-folder per class (e.g. data/ with data/cat/*.jpg and data/dog/*.jpg)"
        )
    return path


def _expected_layout(root: Path) -> str:
    return (
        f"expected `{root}/<class>/*.jpg` (one folder per class) or "
        f"`{root}/train/<class>/` + `{root}/val/<class>/`"
    )


def _class_files(folder: Path) -> dict[str, list[Path]]:
    return {name: _walk_images(folder / name) for name in _subdirs(folder)}


def _names(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{x}`" for x in list(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _detect_layout(root: Path) -> tuple[Path, Path | None, list[str]]:
    """(train folder, val folder or None, warnings) for ``root``."""
    subdirs = _subdirs(root)
    has_train = TRAIN_DIR_NAME in subdirs and _is_split_dir(root / TRAIN_DIR_NAME)
    vals = [n for n in VAL_DIR_NAMES if n in subdirs and _is_split_dir(root / n)]
    if len(vals) > 1:
        raise FinetuneError(
            f"`{root}` has more than one validation folder ({_names(vals)}); "
            "keep exactly one of them"
        )
    if vals and not has_train:
        raise FinetuneError(
            f"`{root}` has a `{vals[0]}/` folder but no `train/` folder; put the training "
            f"images in `{root}/train/<class>/`"
        )
    if not has_train:
        return root, None, []
    extra = [n for n in subdirs if n not in (TRAIN_DIR_NAME, *vals)]
    notes = [f"ignoring folder(s) {_names(extra)} next to `train/`"] if extra else []
    if not vals:
        notes.append(
            f"`{root}/train/` has no validation folder ({'/, '.join(VAL_DIR_NAMES)}/) next "
            "to it; holding out part of train/ for validation"
        )
        return root / TRAIN_DIR_NAME, None, notes
    return root / TRAIN_DIR_NAME, root / vals[0], notes


def _stratified_split(
    files: Sequence[Path], label: int, key: str, val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    order = sorted(files)
    n = len(order)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))
    # Seeded per class (string seeds hash deterministically), so a class's split does not
    # change when another class gains images.
    random.Random(f"{seed}/{key}").shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [Sample(p, label) for p in train], [Sample(p, label) for p in val]


def scan_folder(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    check_images: bool = True,
) -> FolderSplit:
    """Scan an image folder, skip unreadable files and split it into train/val.

    ``root/train/<class>`` + ``root/<val|valid|validation>/<class>`` is used as given;
    otherwise ``root/<class>/**`` is split per class (stratified, deterministic given
    ``seed``; every class with >= 2 images gets at least one val image when
    ``val_fraction > 0``). Class names are the sorted folder names of the train part.
    ``check_images`` decodes every file (JPEGs at reduced scale) in a thread pool and
    reports undecodable ones in ``skipped``; without it only empty files are caught.

    Raises :class:`FinetuneError` for a missing root, no images, fewer than two classes, or
    a val class that train lacks. Empty class folders and train classes missing from val
    are only warnings (``FolderSplit.warnings``).

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for split, n in (("train", 4), ("val", 1)):
    ...     for name in ("ant", "bee"):
    ...         (root / split / name).mkdir(parents=True)
    ...         for i in range(n):
    ...             Image.new("L", (8, 8)).save(root / split / name / f"{i}.png")
    >>> s = scan_folder(root)
    >>> s.layout, s.classes, len(s.train), len(s.val)
    ('train/val', ['ant', 'bee'], 8, 2)
    """
    root = _check_root(root)
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise FinetuneError(f"val_fraction must be a number in [0, 1), got `{val_fraction}`")
    train_dir, val_dir, notes = _detect_layout(root)
    train_files = _class_files(train_dir)
    val_files = _class_files(val_dir) if val_dir is not None else {}

    if not train_files:
        loose = _loose_images(train_dir)
        found = f" (found {loose} image(s) directly in it)" if loose else ""
        raise FinetuneError(f"no class folders in `{train_dir}`{found}; {_expected_layout(root)}")
    if val_dir is not None:
        unknown = sorted(set(val_files) - set(train_files))
        if unknown:
            raise FinetuneError(
                f"validation folder `{val_dir}` has class(es) {_names(unknown)} that "
                f"`{train_dir}` lacks; add `{train_dir}/{unknown[0]}/` with training images "
                f"or remove `{val_dir}/{unknown[0]}/`"
            )
    loose = _loose_images(train_dir)
    if loose:
        notes.append(f"ignoring {loose} image(s) directly in `{train_dir}` (not in a class folder)")

    all_paths = [p for files in (*train_files.values(), *val_files.values()) for p in files]
    bad = _check_files(all_paths, check_images)
    skipped = [Skipped(p, bad[p]) for p in sorted(bad)]
    good = {c: [p for p in fs if p not in bad] for c, fs in train_files.items()}
    good_val = {c: [p for p in fs if p not in bad] for c, fs in val_files.items()}

    empty = [c for c in sorted(good) if not good[c]]
    classes = [c for c in sorted(good) if good[c]]
    if not classes:
        why = f"; {len(skipped)} file(s) could not be read, see `skipped`" if skipped else ""
        raise FinetuneError(
            f"no images in `{train_dir}`: the class folders {_names(sorted(good))} hold no "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files{why}; {_expected_layout(root)}"
        )
    if len(classes) < 2:
        raise FinetuneError(
            f"only one class (`{classes[0]}`) has images in `{train_dir}`; a classifier needs "
            f"at least 2 class folders, e.g. `{train_dir}/cat/` and `{train_dir}/dog/`"
        )
    for c in empty:
        n_bad = sum(p in bad for p in train_files[c])
        why = f" ({n_bad} unreadable file(s) skipped)" if n_bad else ""
        n_val = len(good_val.get(c, []))
        also = f"; its {n_val} val image(s) are not used" if n_val else ""
        notes.append(
            f"class folder `{train_dir / c}` has no usable images{why}; class dropped{also}"
        )

    train: list[Sample] = []
    val: list[Sample] = []
    if val_dir is not None:
        layout = "train/val"
        for label, c in enumerate(classes):
            train += [Sample(p, label) for p in good[c]]
            val += [Sample(p, label) for p in good_val.get(c, [])]
        missing = [c for c in classes if not good_val.get(c)]
        if missing:
            notes.append(f"class(es) {_names(missing)} have no images in `{val_dir}`")
    else:
        layout = f"class folders (split with val_fraction={val_fraction}, seed={seed})"
        for label, c in enumerate(classes):
            t, v = _stratified_split(good[c], label, c, val_fraction, seed)
            train += t
            val += v
        if val_fraction > 0:
            single = [c for c in classes if len(good[c]) == 1]
            if single:
                notes.append(
                    f"class(es) {_names(single)} have a single image; nothing held out for val"
                )
    return FolderSplit(root, classes, train, val, skipped, layout, notes)


def scan_labelled(
    root: str | os.PathLike,
    classes: list[str] | None = None,
    check_images: bool = True,
) -> tuple[list[str], list[Sample], list[Skipped]]:
    """Every image under ``root/<class>/`` with its label, for evaluation.

    If ``root`` has a ``val``/``valid``/``validation`` folder of class folders, that is
    used. With ``classes`` (the trained model's class list) labels index into it and a
    folder class the model does not know raises :class:`FinetuneError`; model classes
    missing from the folder are fine. Without it the classes are the sorted folder names.
    Returns ``(classes, samples, skipped)``.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "dog").mkdir()
    >>> Image.new("RGB", (8, 8)).save(root / "dog" / "a.png")
    >>> names, samples, skipped = scan_labelled(root, classes=["cat", "dog"])
    >>> names, [s.label for s in samples], skipped
    (['cat', 'dog'], [1], [])
    """
    root = _check_root(root)
    subdirs = _subdirs(root)
    vals = [n for n in VAL_DIR_NAMES if n in subdirs and _is_split_dir(root / n)]
    if len(vals) > 1:
        raise FinetuneError(
            f"`{root}` has more than one validation folder ({_names(vals)}); "
            "keep one of them or pass the one to evaluate"
        )
    folder = root / vals[0] if vals else root
    if not vals and TRAIN_DIR_NAME in subdirs and _is_split_dir(root / TRAIN_DIR_NAME):
        raise FinetuneError(
            f"`{root}` has a `train/` folder but no validation folder; pass the folder that "
            f"holds the evaluation class folders (e.g. `{root}/test`)"
        )
    files = _class_files(folder)
    all_paths = [p for fs in files.values() for p in fs]
    if not all_paths:
        raise FinetuneError(f"no images in class folders of `{folder}`; {_expected_layout(folder)}")
    if classes is not None:  # before decoding anything: fail fast on a foreign class
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate names in classes: {classes}")
        unknown = sorted(c for c, fs in files.items() if fs and c not in classes)
        if unknown:
            raise FinetuneError(
                f"class folder(s) {_names(unknown)} in `{folder}` are not classes of the model "
                f"(which knows {_names(classes)}); remove or rename them"
            )
    bad = _check_files(all_paths, check_images)
    good = {c: [p for p in fs if p not in bad] for c, fs in files.items()}
    good = {c: fs for c, fs in good.items() if fs}
    if not good:
        raise FinetuneError(
            f"none of the {len(all_paths)} image file(s) in `{folder}` can be read "
            f"(e.g. `{min(bad)}`: {bad[min(bad)]})"
        )
    names = sorted(good) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(names)}
    samples = [Sample(p, index[c]) for c in sorted(good, key=index.get) for p in good[c]]
    return names, samples, [Skipped(p, bad[p]) for p in sorted(bad)]


def is_unlabelled_folder(root: str | os.PathLike) -> bool:
    """True for a folder of loose images with no class sub-folders (usable for distillation).

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8)).save(d / "a.png")
    >>> is_unlabelled_folder(d)
    True
    """
    root = Path(root).expanduser()
    return root.is_dir() and not _subdirs(root) and _loose_images(root) > 0


def scan_unlabelled(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0,
                    check_images: bool = True) -> FolderSplit:
    """Split a folder of loose images (labels ``-1``) into train/val, seeded (for distillation)."""
    root = _check_root(root)
    paths, skipped = list_images([root], check_images=check_images)
    if len(paths) < 2:
        raise FinetuneError(f"`{root}` holds {len(paths)} readable image(s); distillation needs at least 2")
    order = list(paths)
    random.Random(f"{seed}/unlabelled").shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    return FolderSplit(root=root, classes=[], train=[Sample(p, -1) for p in train],
                       val=[Sample(p, -1) for p in val], skipped=list(skipped),
                       layout=f"unlabelled images (split with val_fraction={val_fraction}, seed={seed})")


def list_images(
    paths: Sequence[str | os.PathLike], check_images: bool = True
) -> tuple[list[Path], list[Skipped]]:
    """Image files from files and folders (folders recursively, sorted), for prediction.

    Hidden files and files without an image extension inside folders are ignored; a file
    named explicitly without an image extension, or one that cannot be decoded
    (``check_images``), is returned in the skipped list. Duplicates are listed once, in
    the order given. A path that does not exist raises :class:`FinetuneError`.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8)).save(d / "a.png")
    >>> _ = (d / "notes.txt").write_text("hi")
    >>> found, skipped = list_images([d])
    >>> [p.name for p in found], skipped
    (['a.png'], [])
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    candidates: list[Path] = []
    skipped: list[Skipped] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            candidates += _walk_images(path)
        elif path.exists() or path.is_symlink():
            if _has_image_ext(path.name):
                candidates.append(path)
            else:
                skipped.append(Skipped(path, "not an image file extension"))
        else:
            raise FinetuneError(f"`{path}` does not exist; pass image files or folders of images")
    candidates = list(dict.fromkeys(candidates))
    bad = _check_files(candidates, check_images)
    skipped += [Skipped(p, bad[p]) for p in candidates if p in bad]
    return [p for p in candidates if p not in bad], skipped


def write_skipped(skipped: Sequence[Skipped], path: str | os.PathLike) -> None:
    """Atomically write one ``path<TAB>reason`` line per skipped file.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "skipped.tsv"
    >>> write_skipped([Skipped(pathlib.Path("a.jpg"), "empty file")], out)
    >>> out.read_text()
    'a.jpg\\tempty file\\n'
    """

    def clean(text: str) -> str:
        return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")

    write_text(path, "".join(f"{clean(str(s.path))}\t{clean(s.reason)}\n" for s in skipped))


# --------------------------------------------------------------------------- loading images


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16/32-bit integer or float single-channel image to 0..255 without clipping.

    ``I;16*`` use the full 16-bit range (/257). ``I`` is read as 8-bit if it fits, as 16-bit
    if it fits, else min-max scaled; ``F`` in [0, 1] is multiplied by 255, in [0, 255] kept,
    else min-max scaled.
    """
    a = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif img.mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (transparency composited on white).

    Palette/grey/RGB images with transparency and RGBA/LA/PA are alpha-composited on a
    white background, CMYK/YCbCr/L/1 converted, 16-bit and float images scaled to 8 bits.
    May return ``img`` itself when it is already RGB.

    >>> from PIL import Image
    >>> to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0))
    (255, 255, 255)
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(img)).convert("RGB")
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise _UnsupportedMode(f"cannot convert image mode `{mode}` to RGB") from exc


def load_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open an image as a loaded 8-bit RGB image, EXIF orientation applied (see :func:`to_rgb`).

    ``draft_size`` lets JPEGs decode at a reduced scale (1/2, 1/4, 1/8) as long as both
    sides stay >= ``draft_size`` -- a large speed-up for big photos fed to a small model.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "g.png"
    >>> Image.new("L", (6, 4), 128).save(p)
    >>> img = load_rgb(p)
    >>> img.mode, img.size, img.getpixel((0, 0))
    ('RGB', (6, 4), (128, 128, 128))
    """
    with Image.open(path) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        try:
            oriented = ImageOps.exif_transpose(img)  # a new image, transposed or copied
        except Exception:  # noqa: BLE001 -- malformed EXIF: keep the pixels as stored
            oriented = img.copy()
    return to_rgb(oriented)


class ImageDataset(torch.utils.data.Dataset):
    """``(transform(load_rgb(path)), label)`` pairs from :class:`Sample` s or bare paths.

    Bare paths get label -1. If a file fails to load (it changed on disk after scanning),
    the default for samples (``on_error="substitute"``) is not to crash the epoch: a
    :class:`BadImageWarning` is issued once per file (per worker process) and the next
    loadable index (wrapping around) is returned instead; the file is not retried. For bare
    paths (prediction) the default is ``on_error="raise"``: a :class:`FinetuneError` naming
    the file, since a substitute would be reported under the wrong path.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
    >>> Image.new("RGB", (8, 8)).save(p)
    >>> ds = ImageDataset([Sample(p, 3)], transform=lambda im: im.size)
    >>> ds[0]
    ((8, 8), 3)
    """

    def __init__(
        self,
        items: Sequence[Sample] | Sequence[str | os.PathLike],
        transform: Callable | None = None,
        *,
        draft_size: int | None = None,
        on_error: str | None = None,
    ) -> None:
        items = list(items)
        if all(isinstance(x, Sample) for x in items):
            self.paths = [Path(s.path) for s in items]
            self.labels = [int(s.label) for s in items]
            default = "substitute"
        elif all(isinstance(x, (str, os.PathLike)) for x in items):
            self.paths = [Path(x) for x in items]
            self.labels = [-1] * len(items)
            default = "raise"
        else:
            raise TypeError("items must be all Sample objects or all paths")
        on_error = on_error or default
        if on_error not in ("substitute", "raise"):
            raise ValueError(f"on_error must be 'substitute' or 'raise', got {on_error!r}")
        self.transform = transform
        self.draft_size = draft_size
        self.on_error = on_error
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[object, int]:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                img = load_rgb(self.paths[i], draft_size=self.draft_size)
            except Exception as exc:  # noqa: BLE001 -- any decoder failure
                if self.on_error == "raise":
                    raise FinetuneError(
                        f"cannot load `{self.paths[i]}` ({_reason(exc)}); it changed on disk "
                        "after it was listed: fix or remove it and run again"
                    ) from exc
                self._bad.add(i)
                warnings.warn(
                    f"cannot load `{self.paths[i]}` ({_reason(exc)}); using another image "
                    "in its place for the rest of this run",
                    BadImageWarning,
                    stacklevel=2,
                )
                continue
            return (self.transform(img) if self.transform else img), self.labels[i]
        raise FinetuneError(
            f"none of the {n} images of the dataset can be loaded (e.g. `{self.paths[index]}`); "
            "check that the data folder is still there"
        )


# --------------------------------------------------------------------------- transforms, weights


def build_transform(
    data_config: dict,
    train: bool,
    img_size: int | None = None,
    scale: tuple[float, float] = (0.25, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = None,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
) -> Callable:
    """timm's transform for a model's data config (``timm.data.resolve_data_config``).

    Training: random-resized crop with ``scale``, horizontal flip with probability
    ``hflip``, optional colour jitter, auto-augment (e.g. ``"rand-m9-mstd0.5"``) and random
    erasing with probability ``re_prob``.
    Eval: resize by ``crop_pct`` and centre crop -- deterministic. ``img_size`` overrides
    the config's input size (square). Input is a PIL RGB image, output a CHW float tensor.

    >>> from PIL import Image
    >>> cfg = dict(input_size=(3, 224, 224), interpolation="bilinear",
    ...            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875)
    >>> tf = build_transform(cfg, train=False, img_size=32)
    >>> tuple(tf(Image.new("RGB", (40, 50))).shape)
    (3, 32, 32)
    """
    missing = [k for k in ("input_size", "interpolation", "mean", "std") if k not in data_config]
    if missing:
        raise ValueError(
            f"data_config lacks {missing}; build it with timm.data.resolve_data_config"
        )
    input_size = tuple(data_config["input_size"])
    if img_size is not None:
        if int(img_size) != img_size or img_size < 1:
            raise FinetuneError(f"img_size must be a positive integer, got `{img_size}`")
        input_size = (input_size[0], int(img_size), int(img_size))
    kwargs: dict = dict(
        input_size=input_size,
        is_training=train,
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
    )
    if train:
        lo, hi = scale
        if not 0 < lo <= hi <= 1:
            raise FinetuneError(f"scale must be (min, max) with 0 < min <= max <= 1, got `{scale}`")
        if not 0 <= hflip <= 1:
            raise FinetuneError(f"hflip is a probability in [0, 1], got `{hflip}`")
        if color_jitter is not None and color_jitter < 0:
            raise FinetuneError(f"color_jitter must be >= 0 or None, got `{color_jitter}`")
        kwargs.update(
            scale=(float(lo), float(hi)),
            hflip=hflip,
            color_jitter=color_jitter or None,
            auto_augment=auto_augment or None,
            re_prob=float(re_prob),
        )
    return timm.data.create_transform(**kwargs)


def draft_size(data_config: dict) -> int:
    """JPEG draft size for a model's input: twice its side, so crops and resizes keep full detail.

    >>> draft_size({"input_size": (3, 96, 96)})
    192
    """
    return 2 * int(max(data_config["input_size"][-2:]))


def eval_loader(items: Sequence[Sample] | Sequence[str | os.PathLike], data_config: dict,
                batch_size: int = 64, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Deterministic, in-order loader with the model's eval transform (JPEG draft decoding on).

    >>> loader = eval_loader([], {"input_size": (3, 32, 32), "interpolation": "bilinear",
    ...                           "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    >>> len(loader)
    0
    """
    dataset = ImageDataset(items, build_transform(data_config, train=False), draft_size=draft_size(data_config))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def class_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights (float32), normalised to mean 1.

    Classes with no samples get weight 1 (they never weight a loss term), which keeps the
    mean at 1 over all classes.

    >>> from pathlib import Path
    >>> s = [Sample(Path("a"), 0)] * 3 + [Sample(Path("b"), 1)]
    >>> class_weights(s, 2).tolist()
    [0.5, 1.5]
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError("class_weights needs at least one sample")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.ones(num_classes, dtype=torch.float64)
    present = counts > 0
    inverse = 1.0 / counts[present]
    weights[present] = inverse / inverse.mean()
    return weights.float()
