"""The Fashion-MNIST demo dataset that ships inside the package.

``finetune/assets/fashion_mnist_demo.npz`` holds a stratified, seeded subset of
Fashion-MNIST (MIT license, see ``finetune/assets/FASHION_MNIST_LICENSE.txt``):
300 images per class drawn from the official train split and 100 per class
drawn from the official test split, 28x28 uint8 greyscale, 10 classes.  It is
rebuilt by ``tools/build_demo_dataset.py``.

:func:`load_demo_arrays` returns the arrays; :func:`write_demo_folder` lays
them out as the image-folder tree the trainer reads::

    root/train/<class>/<row>.png     row = index into train_images, 5 digits
    root/val/<class>/<row>.png       row = index into val_images

>>> import tempfile
>>> root = write_demo_folder(Path(tempfile.mkdtemp()) / "demo", train_per_class=3, val_per_class=1)
>>> sorted(p.name for p in (root / "train").iterdir()) == sorted(DEMO_CLASSES)
True
>>> len(list(root.glob("train/*/*.png"))), len(list(root.glob("val/*/*.png")))
(30, 10)

Only numpy, Pillow and the standard library are used, so the data can be
materialised without torch.  Run ``python -m finetune.data.demo DIR`` to write
the folder from the command line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.errors import FinetuneError

__all__ = ["DEMO_CLASSES", "DEMO_SPLITS", "load_demo_arrays", "write_demo_folder"]

#: Class names in label order (label ``i`` is ``DEMO_CLASSES[i]``); folder-safe.
DEMO_CLASSES: tuple[str, ...] = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

#: Sub-folders written by :func:`write_demo_folder`.
DEMO_SPLITS: tuple[str, ...] = ("train", "val")

_ASSET_PACKAGE = "finetune.assets"
_ASSET_NAME = "fashion_mnist_demo.npz"
_FILE_RE = re.compile(r"^(train|val)/([^/]+)/(\d{5})\.png$")


def load_demo_arrays() -> dict[str, np.ndarray]:
    """Load the embedded demo dataset as a dict of numpy arrays.

    Keys: ``train_images`` (uint8 [3000,28,28]), ``train_labels`` (uint8
    [3000]), ``val_images`` (uint8 [1000,28,28]), ``val_labels`` (uint8
    [1000]), ``classes`` (str [10], equal to :data:`DEMO_CLASSES`), and the
    provenance written by ``tools/build_demo_dataset.py``:
    ``train_source_indices`` / ``val_source_indices`` (rows of the official
    ``train`` / ``test`` splits), ``train_source_split`` / ``val_source_split``,
    ``source_files``, ``source_sha256``, ``source_raw_sha256``, ``seed``,
    ``train_per_class``, ``val_per_class``, ``build_command``.

    Each call returns fresh arrays; mutating them does not affect later calls.

    >>> arrays = load_demo_arrays()
    >>> arrays["train_images"].shape, arrays["train_images"].dtype
    ((3000, 28, 28), dtype('uint8'))
    >>> tuple(arrays["classes"]) == DEMO_CLASSES
    True
    """
    resource = resources.files(_ASSET_PACKAGE).joinpath(_ASSET_NAME)
    try:
        with resource.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError as exc:  # pragma: no cover - broken install
        raise FinetuneError(
            f"the demo dataset {_ASSET_PACKAGE}/{_ASSET_NAME} is missing from the installed package; "
            "reinstall finetune-vision or rebuild it with tools/build_demo_dataset.py"
        ) from exc


def _check_limit(name: str, value: int | None, available: int) -> int:
    if value is None:
        return available
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FinetuneError(f"{name} must be a whole number or None, got {value!r}")
    if not 1 <= value <= available:
        raise FinetuneError(f"{name} must be between 1 and {available}, got {value}")
    return int(value)


def _plan(arrays: dict[str, np.ndarray], limits: dict[str, int]) -> dict[str, tuple[str, int]]:
    """Map each relative file path to ``(split, row)``: the first ``limit`` rows of each class."""
    plan: dict[str, tuple[str, int]] = {}
    for split in DEMO_SPLITS:
        labels = arrays[f"{split}_labels"]
        for label, cls in enumerate(DEMO_CLASSES):
            for row in np.flatnonzero(labels == label)[: limits[split]]:
                plan[f"{split}/{cls}/{int(row):05d}.png"] = (split, int(row))
    return plan


def _existing_files(root: Path) -> set[str] | None:
    """Relative POSIX paths of all files under ``root``; ``None`` if ``root`` does not exist."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise FinetuneError(f"demo data folder `{root}` exists and is not a folder; pass another path")
    found: set[str] = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            found.add((rel / name).as_posix())
    return found


def _replaceable(files: set[str]) -> bool:
    """True when every file under the folder is a demo PNG, i.e. it is ours to replace."""
    for rel in files:
        match = _FILE_RE.match(rel)
        if match is None or match.group(2) not in DEMO_CLASSES:
            return False
    return True


def _write_tree(tmp: Path, arrays: dict[str, np.ndarray], plan: dict[str, tuple[str, int]]) -> None:
    for split in DEMO_SPLITS:
        for cls in DEMO_CLASSES:
            (tmp / split / cls).mkdir(parents=True)
    for rel, (split, row) in plan.items():
        Image.fromarray(np.ascontiguousarray(arrays[f"{split}_images"][row])).save(tmp / rel, format="PNG")


def write_demo_folder(
    root: str | os.PathLike[str],
    train_per_class: int | None = None,
    val_per_class: int | None = None,
) -> Path:
    """Write the demo dataset as greyscale PNG files under ``root`` and return ``root``.

    Layout: ``root/train/<class>/<row>.png`` and ``root/val/<class>/<row>.png``,
    one folder per entry of :data:`DEMO_CLASSES`; ``<row>`` is the 5-digit
    index into ``train_images`` / ``val_images`` of :func:`load_demo_arrays`,
    and each PNG decodes (mode ``L``) to exactly those stored pixels.

    ``train_per_class`` / ``val_per_class`` keep only the first N images of
    each class (a random sample: rows are shuffled at build time) for quick
    runs; ``None`` writes all of them (300 and 100).

    * Idempotent: if ``root`` already holds exactly the expected files (by
      path), nothing is written and file mtimes are unchanged.
    * Atomic: files are written to a hidden temporary folder beside ``root``,
      which is then moved into place with ``os.replace``, so a crash never
      leaves half a dataset at ``root``.
    * Safe: an existing ``root`` is only replaced if it is empty or holds
      nothing but demo PNGs (e.g. written earlier with other limits);
      otherwise :class:`~finetune.errors.FinetuneError` is raised.

    >>> import tempfile
    >>> root = write_demo_folder(Path(tempfile.mkdtemp()) / "data", train_per_class=2, val_per_class=2)
    >>> png = sorted((root / "val" / "bag").glob("*.png"))[0]
    >>> row = int(png.stem)
    >>> arrays = load_demo_arrays()
    >>> DEMO_CLASSES[arrays["val_labels"][row]]
    'bag'
    >>> bool((np.asarray(Image.open(png)) == arrays["val_images"][row]).all())
    True
    >>> write_demo_folder(root, train_per_class=2, val_per_class=2) == root  # no-op the second time
    True
    """
    root = Path(root)
    target = Path(os.path.realpath(root))  # a symlinked root: work where it points
    arrays = load_demo_arrays()
    limits = {
        "train": _check_limit("train_per_class", train_per_class, int(np.bincount(arrays["train_labels"]).min())),
        "val": _check_limit("val_per_class", val_per_class, int(np.bincount(arrays["val_labels"]).min())),
    }
    plan = _plan(arrays, limits)
    expected = set(plan)

    existing = _existing_files(target)
    if existing == expected:
        return root
    if existing is not None and not _replaceable(existing):
        raise FinetuneError(
            f"demo data folder `{root}` already exists and holds files that are not demo images; "
            "pass an empty or new folder"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.{token}.tmp"
    old = target.parent / f".{target.name}.{token}.old.tmp"
    tmp.mkdir()
    try:
        _write_tree(tmp, arrays, plan)
        try:
            os.replace(tmp, target)  # target absent (or an empty folder, on POSIX)
            return root
        except OSError:
            pass
        # target exists and is not empty: re-inspect (another process may have just written it)
        existing = _existing_files(target)
        if existing == expected:
            return root
        if existing is None:
            os.replace(tmp, target)
            return root
        if not _replaceable(existing):
            raise FinetuneError(
                f"demo data folder `{root}` already exists and holds files that are not demo images; "
                "pass an empty or new folder"
            )
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return root
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m finetune.data.demo DIR [--train-per-class N] [--val-per-class N]``."""
    parser = argparse.ArgumentParser(prog="python -m finetune.data.demo", description=write_demo_folder.__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder to write (train/ and val/ inside)")
    parser.add_argument("--train-per-class", type=int, default=None, help="first N train images per class (default: all 300)")
    parser.add_argument("--val-per-class", type=int, default=None, help="first N val images per class (default: all 100)")
    args = parser.parse_args(argv)
    try:
        root = write_demo_folder(args.root, args.train_per_class, args.val_per_class)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
