"""Image folders: find the classes, check the files, split into train/val.

A user's data is a folder with one sub-folder per class, either

* ``root/<class>/**/<image>`` -- split here into train/val, stratified per class, or
* ``root/train/<class>/...`` + ``root/<val|valid|validation>/<class>/...`` -- used as given.

Which files count as images is :mod:`finetune.data.files`'s; files with an image extension that
cannot be decoded (empty, truncated, not an image, decompression bombs) are reported as
:class:`~finetune.data.files.Skipped` with a one-phrase reason instead of crashing an epoch later
(:mod:`finetune.data.images`; each verdict is cached, so a re-scan decodes only new or changed files:
:mod:`finetune.data.scan_cache`). Mistakes in the folder itself raise
:class:`~finetune.errors.FinetuneError` with a one-line message.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from finetune.data.files import IMAGE_EXTENSIONS, Skipped, find_images, loose_images, sort_key, subdirs, walk_images
from finetune.data.scan_cache import ScanStats, check_paths
from finetune.data.skiplog import SkipLog
from finetune.errors import FinetuneError

__all__ = [
    "VAL_DIR_NAMES",
    "FolderSplit",
    "Sample",
    "is_unlabelled_folder",
    "scan_folder",
    "scan_labelled",
    "scan_unlabelled",
]

VAL_DIR_NAMES = ("val", "valid", "validation")
TRAIN_DIR_NAME = "train"


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled image: ``label`` indexes the class list it came with (slotted: 48 bytes, not 100)."""

    path: Path
    label: int


@dataclass
class FolderSplit:
    """The result of :func:`scan_folder`: classes, train/val samples, skipped files, warnings.

    ``scan`` is what the scan did (files decoded, taken from the cache); ``skip_log`` is where the
    datasets built from it record files that fail to load (lazy checking), or ``None``. ``shards`` is
    ``(train, val)`` :class:`~finetune.data.shards.ShardSource` s when the data are WebDataset shards
    (``train``/``val`` then only know labels and counts), else ``None``.
    """

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[Skipped]
    layout: str
    warnings: list[str] = field(default_factory=list)
    scan: ScanStats = field(default_factory=ScanStats)
    skip_log: SkipLog | None = None
    shards: tuple | None = None

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


# --------------------------------------------------------------------------- scanning folders


def _is_split_dir(path: Path) -> bool:
    """``train``/``val`` are split folders when they hold class folders (else it's a class)."""
    return path.is_dir() and bool(subdirs(path))


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
    return {name: walk_images(folder / name) for name in subdirs(folder)}


def _names(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{x}`" for x in list(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _detect_layout(root: Path) -> tuple[Path, Path | None, list[str]]:
    """(train folder, val folder or None, warnings) for ``root``."""
    folders = subdirs(root)
    has_train = TRAIN_DIR_NAME in folders and _is_split_dir(root / TRAIN_DIR_NAME)
    vals = [n for n in VAL_DIR_NAMES if n in folders and _is_split_dir(root / n)]
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
    extra = [n for n in folders if n not in (TRAIN_DIR_NAME, *vals)]
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
    order = sorted(files, key=sort_key)  # = sorted(files): the paths of one class folder share an anchor
    n = len(order)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))
    # Seeded per class (string seeds hash deterministically), so a class's split does not
    # change when another class gains images.
    random.Random(f"{seed}/{key}").shuffle(order)
    val = sorted(order[:n_val], key=sort_key)
    train = sorted(order[n_val:], key=sort_key)
    return [Sample(p, label) for p in train], [Sample(p, label) for p in val]


def scan_folder(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    check_images: bool | str = True,
) -> FolderSplit:
    """Scan an image folder, skip unreadable files and split it into train/val.

    ``root/train/<class>`` + ``root/<val|valid|validation>/<class>`` is used as given;
    otherwise ``root/<class>/**`` is split per class (stratified, deterministic given
    ``seed``; every class with >= 2 images gets at least one val image when
    ``val_fraction > 0``). Class names are the sorted folder names of the train part.
    ``check_images`` decodes every file (JPEGs at reduced scale) in a thread pool, unless
    the scan cache knows it unchanged, and reports undecodable ones in ``skipped``; with
    ``False`` or ``"lazy"`` only missing and empty files are caught.

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
    started = time.perf_counter()
    root = _check_root(root)
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise FinetuneError(f"val_fraction must be a number in [0, 1), got `{val_fraction}`")
    train_dir, val_dir, notes = _detect_layout(root)
    train_files = _class_files(train_dir)
    val_files = _class_files(val_dir) if val_dir is not None else {}

    if not train_files:
        loose = loose_images(train_dir)
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
    loose = loose_images(train_dir)
    if loose:
        notes.append(f"ignoring {loose} image(s) directly in `{train_dir}` (not in a class folder)")

    all_paths = [p for files in (*train_files.values(), *val_files.values()) for p in files]
    bad, stats = check_paths(all_paths, check_images)
    skipped = [Skipped(p, bad[p]) for p in sorted(bad, key=sort_key)]
    bad_ids = {id(p) for p in bad}  # by identity: `p in bad` would hash (and grow) every Path
    good = {c: [p for p in fs if id(p) not in bad_ids] if bad else fs for c, fs in train_files.items()}
    good_val = {c: [p for p in fs if id(p) not in bad_ids] if bad else fs for c, fs in val_files.items()}

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
        n_bad = sum(id(p) in bad_ids for p in train_files[c])
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
    stats.seconds = time.perf_counter() - started  # the whole scan: listing the folders and splitting too
    return FolderSplit(root, classes, train, val, skipped, layout, notes, scan=stats)


def scan_labelled(
    root: str | os.PathLike,
    classes: list[str] | None = None,
    check_images: bool | str = True,
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
    folders = subdirs(root)
    vals = [n for n in VAL_DIR_NAMES if n in folders and _is_split_dir(root / n)]
    if len(vals) > 1:
        raise FinetuneError(
            f"`{root}` has more than one validation folder ({_names(vals)}); "
            "keep one of them or pass the one to evaluate"
        )
    folder = root / vals[0] if vals else root
    if not vals and TRAIN_DIR_NAME in folders and _is_split_dir(root / TRAIN_DIR_NAME):
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
    bad, _ = check_paths(all_paths, check_images)
    bad_ids = {id(p) for p in bad}
    good = {c: [p for p in fs if id(p) not in bad_ids] for c, fs in files.items()}
    good = {c: fs for c, fs in good.items() if fs}
    if not good:
        raise FinetuneError(
            f"none of the {len(all_paths)} image file(s) in `{folder}` can be read "
            f"(e.g. `{min(bad)}`: {bad[min(bad)]})"
        )
    names = sorted(good) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(names)}
    samples = [Sample(p, index[c]) for c in sorted(good, key=index.get) for p in good[c]]
    return names, samples, [Skipped(p, bad[p]) for p in sorted(bad, key=sort_key)]


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
    return root.is_dir() and not subdirs(root) and loose_images(root) > 0


def scan_unlabelled(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0,
                    check_images: bool | str = True) -> FolderSplit:
    """Split a folder of loose images (labels ``-1``) into train/val, seeded (for distillation)."""
    root = _check_root(root)
    paths, skipped, stats = find_images([root], check_images=check_images)
    if len(paths) < 2:
        raise FinetuneError(f"`{root}` holds {len(paths)} readable image(s); distillation needs at least 2")
    order = list(paths)
    random.Random(f"{seed}/unlabelled").shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    return FolderSplit(root=root, classes=[], train=[Sample(p, -1) for p in train],
                       val=[Sample(p, -1) for p in val], skipped=list(skipped),
                       layout=f"unlabelled images (split with val_fraction={val_fraction}, seed={seed})",
                       scan=stats)
