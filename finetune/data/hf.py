"""Hugging Face ``datasets`` as a data source (optional extra: ``pip install finetune-vision[hf]``).

``--data hf:DIR`` names a ``Dataset`` or ``DatasetDict`` written with ``save_to_disk``;
``--data hf:imagefolder:DIR`` a folder read by the ``imagefolder`` builder (``DIR/<class>/*`` or
``DIR/{train,validation,test}/<class>/*``; the builder caches its arrow files under
``HF_HOME``). Splits ``train`` and ``validation`` (or ``val``/``valid``) are used as given; without a
validation split, train is split per class like a class folder (same function, same seed), so rows
stored in the order of the sorted files of class folders split -- and train -- exactly like them.
``test`` is what ``finetune eval --data hf:DIR`` evaluates (else validation, else the only split).
Class names come from the label column's ``ClassLabel`` feature (in its order); string or integer
labels without one give the sorted unique values.

Images stay in the arrow files. A row is named by a *row path* such as
``hf:/data/my_ds::train/image/00017`` (source, split, image column, zero-padded row), which a
:class:`~finetune.data.folder.Sample` carries like a file path: ``ImageDataset`` reads the row's
encoded bytes (:func:`load_row`, JPEGs decoded at reduced scale) from the data set, opened once per
process. Rows whose image cannot be decoded, or that have no image or no label, are skipped and
listed with a reason, as bad files are. Mistakes (``datasets`` not installed, no such folder, a column
that is not there) raise :class:`~finetune.errors.FinetuneError` with one line.

>>> is_hf_source("hf:~/datasets/beans"), is_hf_source("~/photos")
(True, False)
>>> row_path("hf:/data/ds", "train", "image", 17, 3)
PosixPath('hf:/data/ds::train/image/017')
>>> parse_row("hf:/data/ds::train/image/017")
('hf:/data/ds', 'train', 'image', 17)
"""

from __future__ import annotations

import io
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from finetune.data.files import Skipped
from finetune.data.folder import VAL_DIR_NAMES, FolderSplit, Sample, _names, _stratified_split
from finetune.data.images import decode_reason, load_rgb
from finetune.data.scan_cache import ScanStats, decodes
from finetune.errors import FinetuneError

__all__ = ["HF_PREFIX", "is_hf_source", "load_row", "normalise_source", "open_source", "parse_row", "row_path",
           "scan_hf", "scan_hf_labelled", "source_folder", "split_fingerprint"]

HF_PREFIX = "hf:"
IMAGEFOLDER = "imagefolder:"
_SINGLE = "all"  # the split name in row paths of a plain Dataset (not a DatasetDict)
_EVAL_SPLITS = ("test", *VAL_DIR_NAMES)
_OPEN: dict[str, Any] = {}  # source -> Dataset/DatasetDict, once per process
_RAW: dict[tuple[str, str, str], Any] = {}  # (source, split, column) -> the split with undecoded images
_IMAGE_COLUMNS = ("image", "img", "picture", "photo")
_CHUNK = 256


def is_hf_source(data: str | os.PathLike | None) -> bool:
    """Whether ``data`` names a Hugging Face data set (``hf:DIR`` or ``hf:imagefolder:DIR``)."""
    return data is not None and os.fspath(data).startswith(HF_PREFIX)


def _parse(data: str | os.PathLike) -> tuple[bool, Path]:
    """``(is imagefolder, absolute folder)`` of an ``hf:`` source (``~`` expanded)."""
    spec = os.fspath(data)[len(HF_PREFIX):]
    imagefolder = spec.startswith(IMAGEFOLDER)
    spec = spec[len(IMAGEFOLDER):] if imagefolder else spec
    if not spec.strip():
        raise FinetuneError(f"`{os.fspath(data)}` names no folder; pass --data hf:DIR (a data set saved with "
                            "save_to_disk) or hf:imagefolder:DIR")
    return imagefolder, Path(spec).expanduser().absolute()


def source_folder(data: str | os.PathLike) -> Path:
    """The folder an ``hf:`` source reads (absolute).

    >>> source_folder("hf:imagefolder:/data/flowers")
    PosixPath('/data/flowers')
    """
    return Path(os.path.normpath(_parse(data)[1]))


def normalise_source(data: str | os.PathLike) -> str:
    """The ``hf:`` source with its folder absolute (what a run's ``recipe.yaml`` stores).

    >>> normalise_source("hf:imagefolder:/data/../data/flowers")
    'hf:imagefolder:/data/flowers'
    """
    imagefolder, path = _parse(data)
    return HF_PREFIX + (IMAGEFOLDER if imagefolder else "") + os.path.normpath(path)


def _datasets() -> Any:
    """The ``datasets`` module, or the one line that says how to install it."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # both sources are local: never wait on the network
    try:
        import datasets
    except ImportError:
        raise FinetuneError("--data hf:... needs the Hugging Face `datasets` package: "
                            "pip install finetune-vision[hf]") from None
    return datasets


def open_source(data: str | os.PathLike) -> Any:
    """The ``Dataset`` or ``DatasetDict`` an ``hf:`` source names (opened once per process; memory-mapped).

    >>> open_source("hf:/no/such/folder")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    finetune.errors.FinetuneError: data set folder `/no/such/folder` does not exist; pass --data hf:DIR ...
    """
    source = normalise_source(data)
    if source in _OPEN:
        return _OPEN[source]
    imagefolder, path = _parse(source)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FinetuneError(f"data set folder `{path}` {what}; pass --data hf:DIR with a folder written by "
                            "save_to_disk (or hf:imagefolder:DIR)")
    datasets = _datasets()
    try:
        if imagefolder:
            opened = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            opened = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise FinetuneError(f"`{path}` is not a data set written by save_to_disk ({exc}); for a folder of images "
                            f"use --data hf:imagefolder:{path}") from None
    except Exception as exc:  # noqa: BLE001 -- the builder's own errors (no images, bad layout...)
        raise FinetuneError(f"cannot read `{source}` with `datasets` ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    _OPEN[source] = opened
    return opened


def _split(data: Any, split: str) -> Any:
    return data if not hasattr(data, "keys") else data[split]


def row_path(source: str, split: str, column: str, index: int, width: int) -> Path:
    """The path that names row ``index`` of ``split`` (zero-padded to ``width``: paths sort in row order)."""
    return Path(f"{source}::{split}/{column}/{index:0{width}d}")


def parse_row(path: str | os.PathLike) -> tuple[str, str, str, int]:
    """``(source, split, image column, row)`` of a :func:`row_path`."""
    text = os.fspath(path)
    source, sep, rest = text.rpartition("::")
    split, _, tail = rest.partition("/")
    column, _, row = tail.rpartition("/")
    if not sep or not source.startswith(HF_PREFIX) or not column or not row.isdigit():
        raise ValueError(f"`{text}` is not a row of a Hugging Face data set (hf:DIR::split/column/row)")
    return source, split, column, int(row)


def _raw(source: str, split: str, column: str) -> Any:
    """The split with ``column`` left encoded (``{"bytes", "path"}`` per row), cached per process."""
    key = (source, split, column)
    if key not in _RAW:
        ds = _split(open_source(source), split)
        if type(ds.features[column]).__name__ == "Image":
            ds = ds.cast_column(column, _datasets().Image(decode=False))
        _RAW[key] = ds
    return _RAW[key]


def split_fingerprint(path: str | os.PathLike) -> str:
    """The ``datasets`` fingerprint of the split a :func:`row_path` reads (it changes when the data set
    does): what keys caches of rows, as (size, mtime) does for files."""
    source, split, column, _ = parse_row(path)
    return str(getattr(_raw(source, split, column), "_fingerprint", ""))


def _image_source(value: Any) -> Any:
    """What PIL opens for one stored image: a file object over its bytes, or its file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise ValueError("no image in this row")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, str) and value:
        return value
    raise ValueError("no image in this row")


def load_row(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """The image of the data-set row that ``path`` (a :func:`row_path`) names, as loaded RGB
    (:func:`~finetune.data.images.load_rgb`: JPEGs at reduced scale when ``draft_size`` allows)."""
    source, split, column, index = parse_row(path)
    return load_rgb(_image_source(_raw(source, split, column)[index][column]), draft_size=draft_size)


# --------------------------------------------------------------------------- columns and labels


def _feature_names(ds: Any, limit: int = 12) -> str:
    """``"`image` (Image), `label` (ClassLabel)"``: the columns there are, with their feature types."""
    items = [f"`{name}` ({type(f).__name__})" for name, f in ds.features.items()]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _columns(ds: Any, source: str, image_column: str, label_column: str) -> tuple[str, str]:
    features = ds.features
    kinds = {name: type(f).__name__ for name, f in features.items()}
    image = image_column if image_column in features else None
    if image is None and image_column == "image":
        image = next((c for c in features if kinds[c] == "Image"), None) or next(
            (c for c in _IMAGE_COLUMNS if c in features), None)
    if image is None:
        raise FinetuneError(f"`{source}` has no image column `{image_column}` (columns: {_feature_names(ds)}); "
                            "pass --image-column NAME")
    label = label_column if label_column in features else None
    if label is None and label_column == "label":
        label = next((c for c in features if kinds[c] == "ClassLabel"), None) or next(
            (c for c in ("labels", "class", "category", "target") if c in features), None)
    if label is None:
        raise FinetuneError(f"`{source}` has no label column `{label_column}` (columns: {_feature_names(ds)}); "
                            "pass --label-column NAME")
    value = getattr(features[image], "dtype", None)
    if kinds[image] != "Image" and value not in ("string", "binary", "large_string", "large_binary"):
        raise FinetuneError(f"column `{image}` of `{source}` holds {kinds[image]} values, not images; pass "
                            f"--image-column with an Image (or path/bytes) column (columns: {_feature_names(ds)})")
    return image, label


def _labels(ds: Any, column: str, source: str) -> tuple[list[str | None], list[str] | None]:
    """Each row's label name (``None``: no label) and the ClassLabel's names (``None`` without one)."""
    feature = ds.features[column]
    values = ds.data.column(column).to_pylist() if ds._indices is None else list(ds[column])
    if type(feature).__name__ == "ClassLabel":
        names = list(feature.names)
        return [names[v] if v is not None and 0 <= v < len(names) else None for v in values], names
    dtype = getattr(feature, "dtype", "")
    if dtype not in ("string", "large_string") and not str(dtype).startswith(("int", "uint")):
        raise FinetuneError(f"label column `{column}` of `{source}` holds {type(feature).__name__} "
                            f"({dtype or 'nested'}) values; give a ClassLabel, string or integer column "
                            "(one class per image)")
    return [None if v is None or str(v).strip() == "" else str(v).strip() for v in values], None


def _label_order(names: Sequence[str]) -> list[str]:
    """Sorted unique names; integers as numbers (``2`` before ``10``)."""
    unique = set(names)
    if all(n.lstrip("-").isdigit() for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _rows(source: str, ds: Any, split: str, image: str, label: str,
          check_images: bool | str) -> tuple[list[tuple[Path, str]], list[Skipped], list[str] | None, ScanStats]:
    """Usable ``(row path, label name)`` of one split in row order, the skipped rows, the ClassLabel names."""
    labels, names = _labels(ds, label, source)
    width = len(str(max(len(labels) - 1, 0)))
    paths = [row_path(source, split, image, i, width) for i in range(len(labels))]
    skipped = [Skipped(p, "no label") for p, c in zip(paths, labels) if c is None]
    keep = [i for i, c in enumerate(labels) if c is not None]
    bad = _check_rows(_raw(source, split, image), image, keep, check_images)
    skipped += [Skipped(paths[i], reason) for i, reason in bad.items()]
    stats = ScanStats(images=len(labels), decoded=len(keep) if decodes(check_images) else 0)
    rows = [(paths[i], labels[i]) for i in keep if i not in bad]
    return rows, sorted(skipped, key=lambda s: str(s.path)), names, stats


def _check_rows(ds: Any, column: str, rows: Sequence[int], check_images: bool | str) -> dict[int, str]:
    """``{row: reason}`` for the rows whose image is missing or (with ``check_images``) does not decode."""
    decode = decodes(check_images)
    bad: dict[int, str] = {}

    def check(item: tuple[int, Any]) -> tuple[int, str | None]:
        i, value = item
        try:
            source = _image_source(value)
        except ValueError as exc:
            return i, str(exc)
        if not decode:
            return i, None
        if isinstance(source, str) and not os.path.isfile(source):
            return i, f"missing file `{source}`"
        return i, decode_reason(source)

    Image.init()
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start:start + _CHUNK]
            values = ds.select(chunk)[column] if len(chunk) > 1 else [ds[chunk[0]][column]]
            bad.update((i, r) for i, r in pool.map(check, zip(chunk, values)) if r is not None)
    return bad


# --------------------------------------------------------------------------- scans


def _train_val(data: Any, source: str) -> tuple[str, str | None, list[str]]:
    """(train split, validation split or None, splits left out) of a DatasetDict (or a plain Dataset)."""
    if not hasattr(data, "keys"):
        return _SINGLE, None, []
    splits = list(data.keys())
    if "train" not in splits:
        raise FinetuneError(f"`{source}` has no `train` split (splits: {_names(splits)}); save the training "
                            "images as the `train` split (a DatasetDict) or as one Dataset")
    vals = [s for s in ("validation", "val", "valid") if s in splits]
    return "train", (vals[0] if vals else None), [s for s in splits if s not in ("train", *vals[:1])]


def scan_hf(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, check_images: bool | str = True,
            image_column: str = "image", label_column: str = "label") -> FolderSplit:
    """:func:`~finetune.data.folder.scan_folder` for a Hugging Face data set (``hf:DIR``, ``hf:imagefolder:DIR``).

    Classes are the ClassLabel names (else the sorted unique labels) that have a usable training row;
    samples are grouped by class, in row order. Example (needs ``datasets``):

    >>> import tempfile, pathlib, pytest
    >>> datasets = pytest.importorskip("datasets")
    >>> from PIL import Image
    >>> features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    >>> ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 10, "label": [0, 1] * 5},
    ...                                 features=features)
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "ds"
    >>> datasets.disable_progress_bars(); ds.save_to_disk(folder)
    >>> split = scan_hf(f"hf:{folder}", val_fraction=0.2)
    >>> split.classes, len(split.train), len(split.val), split.train[0].path.name
    (['cat', 'dog'], 8, 2, '0')
    """
    started = time.perf_counter()
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise FinetuneError(f"val_fraction must be a number in [0, 1), got `{val_fraction}`")
    source = normalise_source(root)
    data = open_source(source)
    train_split, val_split, left_out = _train_val(data, source)
    image, label = _columns(_split(data, train_split), source, image_column, label_column)
    rows, skipped, class_names, stats = _rows(source, _split(data, train_split), train_split, image, label,
                                              check_images)
    val_rows: list[tuple[Path, str]] = []
    notes = [f"split(s) {_names(left_out)} left out of training (evaluate with finetune eval)"] if left_out else []
    if val_split is not None:
        vimage, vlabel = _columns(_split(data, val_split), source, image, label)
        val_rows, vskipped, _, vstats = _rows(source, _split(data, val_split), val_split, vimage, vlabel,
                                              check_images)
        skipped += vskipped
        stats.images, stats.decoded = stats.images + vstats.images, stats.decoded + vstats.decoded
    by_class: dict[str, list[Path]] = {}
    for path, name in rows:
        by_class.setdefault(name, []).append(path)
    order = class_names if class_names is not None else _label_order(list(by_class))
    classes = [c for c in order if by_class.get(c)]
    if len(classes) < 2:
        why = f"; {len(skipped)} row(s) skipped, see `skipped`" if skipped else ""
        raise FinetuneError(f"`{source}` has fewer than 2 classes with usable training rows in column `{label}` "
                            f"({_names(classes) if classes else 'none'}{why})")
    dropped = [c for c in order if c not in by_class]
    if dropped and class_names is not None:
        notes.append(f"ClassLabel name(s) {_names(dropped)} have no usable training rows; class(es) dropped")
    unknown = sorted({c for _, c in val_rows} - set(classes))
    if unknown:
        raise FinetuneError(f"split `{val_split}` of `{source}` has label(s) {_names(unknown)} that no usable "
                            f"training row has; add training rows of `{unknown[0]}` or remove them")
    index = {c: i for i, c in enumerate(classes)}
    train: list[Sample] = []
    val: list[Sample] = []
    columns = f"image column `{image}`, label column `{label}`"
    if val_split is not None:
        val_by_class: dict[str, list[Path]] = {}
        for path, name in val_rows:
            val_by_class.setdefault(name, []).append(path)
        for c in classes:
            train += [Sample(p, index[c]) for p in by_class[c]]
            val += [Sample(p, index[c]) for p in val_by_class.get(c, [])]
        layout = f"hugging face data set (splits {train_split}/{val_split}; {columns})"
    else:
        for c in classes:
            t, v = _stratified_split(by_class[c], index[c], c, val_fraction, seed)
            train += t
            val += v
        layout = (f"hugging face data set (split `{train_split}` divided with val_fraction={val_fraction}, "
                  f"seed={seed}; {columns})")
    stats.seconds = time.perf_counter() - started
    return FolderSplit(Path(source), classes, train, val, sorted(skipped, key=lambda s: str(s.path)), layout,
                       notes, scan=stats)


def scan_hf_labelled(root: str | os.PathLike, classes: list[str] | None = None, check_images: bool | str = True,
                     image_column: str = "image", label_column: str = "label"
                     ) -> tuple[list[str], list[Sample], list[Skipped]]:
    """:func:`~finetune.data.folder.scan_labelled` for an ``hf:`` source: every usable row of its ``test``
    split (else ``validation``/``val``/``valid``, else its only split; ``hf:DIR/SPLIT`` names one split
    folder of a saved DatasetDict), labelled by ``classes`` (a label the model does not know raises
    :class:`FinetuneError`). Returns ``(classes, samples, skipped)``."""
    source = normalise_source(root)
    data = open_source(source)
    if hasattr(data, "keys"):
        splits = list(data.keys())
        split = next((s for s in _EVAL_SPLITS if s in splits), splits[0] if len(splits) == 1 else None)
        if split is None:
            raise FinetuneError(f"`{source}` has no test or validation split (splits: {_names(splits)}); pass one "
                                f"split's folder, e.g. --data {source}/{splits[0]}")
    else:
        split = _SINGLE
    ds = _split(data, split)
    image, label = _columns(ds, source, image_column, label_column)
    rows, skipped, class_names, _ = _rows(source, ds, split, image, label, check_images)
    if not rows:
        raise FinetuneError(f"none of the {len(ds)} row(s) of split `{split}` of `{source}` can be used"
                            + (f" (e.g. `{skipped[0].path}`: {skipped[0].reason})" if skipped else ""))
    present = {c for _, c in rows}
    if classes is not None:
        unknown = sorted(present - set(classes))
        if unknown:
            raise FinetuneError(f"label(s) {_names(unknown)} of `{source}` are not classes of the model (which "
                                f"knows {_names(classes)})")
        names = list(classes)
    else:
        names = [c for c in (class_names or _label_order(list(present))) if c in present]
    index = {c: i for i, c in enumerate(names)}
    ordered = sorted(rows, key=lambda r: index[r[1]])  # stable: row order within a class
    return names, [Sample(p, index[c]) for p, c in ordered], skipped
