#!/usr/bin/env python3
"""Build the small Fashion-MNIST demo dataset that ships inside ``finetune``.

The demo (``make demo``) fine-tunes on a stratified, seeded subset of
Fashion-MNIST stored as one compressed ``.npz`` in ``finetune/assets``.  This
script regenerates that file from the official IDX files, as installed by
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``):

* train images are drawn from the official TRAIN split (60,000 images),
* val images are drawn from the official TEST split (10,000 images, ``t10k``),

``--train-per-class`` / ``--val-per-class`` of each of the 10 classes, with a
``numpy.random.default_rng(seed)`` generator.  The output is deterministic:
the same sources and arguments give byte-identical arrays (and, with the same
zlib, a byte-identical file: zip entries carry a fixed timestamp).

Arrays in the output (all loadable with ``allow_pickle=False``):

=======================  ==============  =======================================
key                      dtype / shape   meaning
=======================  ==============  =======================================
train_images             uint8 [N,28,28] greyscale, 0 = background
train_labels             uint8 [N]       index into ``classes``
val_images               uint8 [M,28,28]
val_labels               uint8 [M]
classes                  str [10]        folder-safe class names, label order
train_source_indices     int64 [N]       row in the official train split
val_source_indices       int64 [M]       row in the official test split
train_source_split       str []          ``"train"``
val_source_split         str []          ``"test"``
source_files             str [4]         IDX file names read
source_sha256            str [4]         sha256 of each ``.gz`` file as read
source_raw_sha256        str [4]         sha256 of each decompressed IDX file
seed                     int64 []        generator seed
train_per_class          int64 []
val_per_class            int64 []
build_command            str []          command that reproduces the file
=======================  ==============  =======================================

Within each split, rows are shuffled (seeded), so the first ``k`` rows of a
class are a uniform random sample of that class.

Usage (from the repository root)::

    python tools/build_demo_dataset.py
    python tools/build_demo_dataset.py --source-dir DIR --train-per-class 300 \\
        --val-per-class 100 --seed 0 --out finetune/assets/fashion_mnist_demo.npz

Only numpy and the standard library are needed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from finetune.data.demo import DEMO_CLASSES

DEFAULT_SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
DEFAULT_OUT = Path("finetune/assets/fashion_mnist_demo.npz")

# Label order of Fashion-MNIST (0..9), as folder-safe names: one list, kept with the package.
CLASSES: tuple[str, ...] = DEMO_CLASSES

SPLIT_FILES: dict[str, tuple[str, str]] = {
    # official split -> (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# sha256 of the *decompressed* IDX files of Fashion-MNIST (as shipped by Debian
# dataset-fashion-mnist 0.0~git20200523.55506a9-1).  The .gz wrappers may be
# recompressed by a packager, the payload must not change.
EXPECTED_RAW_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse an (uncompressed) IDX file holding unsigned bytes.

    Header: two zero bytes, a type code (0x08 = uint8), the number of
    dimensions, then one big-endian uint32 per dimension.

    >>> parse_idx(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("not an IDX file (bad magic)")
    if raw[2] != 0x08:
        raise ValueError(f"unsupported IDX type code 0x{raw[2]:02x} (only uint8 is supported)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX payload has {data.size} bytes, header says shape {shape}")
    return data.reshape(shape)


def read_split(source_dir: Path, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[str, str]]]:
    """Return ``(images [n,28,28], labels [n], {file: (gz_sha256, raw_sha256)})`` of one split."""
    arrays = []
    hashes: dict[str, tuple[str, str]] = {}
    for name in SPLIT_FILES[split]:
        path = source_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; install Debian's dataset-fashion-mnist "
                "(apt-get install dataset-fashion-mnist) or pass --source-dir DIR"
            )
        gz = path.read_bytes()
        raw = gzip.decompress(gz)
        raw_sha = hashlib.sha256(raw).hexdigest()
        if verify and raw_sha != EXPECTED_RAW_SHA256[name]:
            raise ValueError(
                f"{path}: decompressed sha256 {raw_sha} does not match the pinned "
                f"Fashion-MNIST checksum {EXPECTED_RAW_SHA256[name]}; pass --no-verify to build anyway"
            )
        hashes[name] = (hashlib.sha256(gz).hexdigest(), raw_sha)
        arrays.append(parse_idx(raw))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{split}: unexpected shapes {images.shape} / {labels.shape}")
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{split}: label {labels.max()} out of range")
    return images, labels, hashes


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Seeded sample of ``per_class`` rows of each class ``0..n_classes-1``, rows then shuffled.

    >>> labels = np.array([0, 1, 0, 1, 0, 1])
    >>> idx = stratified_indices(labels, 2, np.random.default_rng(0), n_classes=2)
    >>> sorted(labels[idx].tolist())
    [0, 0, 1, 1]
    """
    chosen = []
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < per_class:
            raise ValueError(f"class {c} has only {len(rows)} rows, {per_class} requested")
        chosen.append(rng.choice(rows, size=per_class, replace=False))
    idx = np.concatenate(chosen)
    return idx[rng.permutation(len(idx))].astype(np.int64)


def build(source_dir: Path, train_per_class: int, val_per_class: int, seed: int, verify: bool = True) -> dict[str, np.ndarray]:
    """Return the arrays of the demo dataset (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    files: list[str] = []
    gz_sha: list[str] = []
    raw_sha: list[str] = []
    for split, name, per_class in (("train", "train", train_per_class), ("test", "val", val_per_class)):
        images, labels, hashes = read_split(source_dir, split, verify=verify)
        idx = stratified_indices(labels, per_class, rng)
        out[f"{name}_images"] = np.ascontiguousarray(images[idx], dtype=np.uint8)
        out[f"{name}_labels"] = np.ascontiguousarray(labels[idx], dtype=np.uint8)
        out[f"{name}_source_indices"] = idx
        out[f"{name}_source_split"] = np.array(split)
        for fname, (g, r) in hashes.items():
            files.append(fname)
            gz_sha.append(g)
            raw_sha.append(r)
    out["classes"] = np.array(CLASSES)
    out["source_files"] = np.array(files)
    out["source_sha256"] = np.array(gz_sha)
    out["source_raw_sha256"] = np.array(raw_sha)
    out["seed"] = np.array(seed, dtype=np.int64)
    out["train_per_class"] = np.array(train_per_class, dtype=np.int64)
    out["val_per_class"] = np.array(val_per_class, dtype=np.int64)
    out["build_command"] = np.array(
        "python tools/build_demo_dataset.py"
        f" --train-per-class {train_per_class} --val-per-class {val_per_class} --seed {seed}"
    )
    return out


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps and key order.

    Written to a temporary file beside ``path`` and moved into place, so a
    crash never leaves a truncated file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
            for key in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue(), compresslevel=9)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source-dir", type=Path, default=DEFAULT_SOURCE_DIR,
                   help=f"folder with the Fashion-MNIST IDX .gz files (default: {DEFAULT_SOURCE_DIR})")
    p.add_argument("--train-per-class", type=int, default=300, help="train images per class, from the official train split")
    p.add_argument("--val-per-class", type=int, default=100, help="val images per class, from the official test split")
    p.add_argument("--seed", type=int, default=0, help="numpy default_rng seed")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .npz (default: {DEFAULT_OUT})")
    p.add_argument("--no-verify", action="store_true", help="do not check the pinned sha256 of the IDX payloads")
    args = p.parse_args(argv)
    if args.train_per_class < 1 or args.val_per_class < 1:
        p.error("--train-per-class and --val-per-class must be >= 1")
    try:
        arrays = build(args.source_dir, args.train_per_class, args.val_per_class, args.seed, verify=not args.no_verify)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_npz_deterministic(args.out, arrays)
    size = args.out.stat().st_size
    print(
        f"wrote {args.out} ({size:,} bytes): {len(arrays['train_labels'])} train "
        f"/ {len(arrays['val_labels'])} val images, {len(CLASSES)} classes, seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
