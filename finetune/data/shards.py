"""WebDataset tar shards: write them from a class folder or manifest, and find them again for training.

:func:`write_shards` takes the seeded, stratified split of :func:`~finetune.data.folder.scan_folder`
(or :func:`~finetune.data.manifest.scan_manifest`) -- the very split a folder run trains on -- and
writes ``train-000000.tar…`` and ``val-000000.tar…`` with webdataset's ``ShardWriter``. Each sample
is ``__key__`` (its position, ``000000042``), the image bytes as stored (no re-encode) under the
file's extension (``png``, ``jpg``…), ``cls`` (the class index, as text) and ``fname`` (the path
relative to the source). Training images are written in a seeded shuffled order, so every shard
holds every class (a shuffle buffer cannot mix a class-sorted stream). ``index.json`` next to the
shards holds the classes, counts per split and class, and every shard's name and sample count, so
training knows the classes and the epoch length without opening a tar; files the scan skipped are
in ``skipped.txt`` there as well.

A training data set is named ``wds:DIR`` (the index's shards of that split) or
``wds:DIR/train-{000000..000009}.tar`` (brace-expanded, as webdataset does); :func:`resolve_shards`
checks the names against the index.

>>> import tempfile, pathlib
>>> from PIL import Image
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("cat", "dog"):
...     (root / name).mkdir()
...     for i in range(5):
...         Image.new("RGB", (8, 8)).save(root / name / f"{i}.png")
>>> index = write_shards(scan_folder(root, val_fraction=0.2, seed=0), root / "shards", shard_size="1KB")
>>> index["classes"], index["splits"]["train"]["count"], index["splits"]["val"]["count"]
(['cat', 'dog'], 8, 2)
>>> source = resolve_shards(f"wds:{root}/shards")
>>> len(source.urls) == len(index["splits"]["train"]["shards"]), sum(source.counts)
(True, 8)
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from finetune.data.files import Skipped, write_skipped
from finetune.data.folder import FolderSplit, Sample, scan_folder
from finetune.data.manifest import scan_manifest
from finetune.errors import FinetuneError
from finetune.io import write_text

__all__ = ["INDEX_NAME", "WDS_PREFIX", "CountedSamples", "ShardSource", "absolute_spec", "is_wds", "parse_size",
           "read_index", "resolve_shards", "scan_for_shards", "split_from_source", "write_shards"]

WDS_PREFIX = "wds:"
INDEX_NAME = "index.json"
INDEX_FORMAT = "finetune-shards/1"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def is_wds(spec: str | os.PathLike | None) -> bool:
    """Whether a data argument names WebDataset shards (``wds:…``).

    >>> is_wds("wds:~/shards"), is_wds("photos"), is_wds(None)
    (True, False, False)
    """
    return isinstance(spec, str) and spec.startswith(WDS_PREFIX)


def absolute_spec(spec: str) -> str:
    """``wds:PATH`` with ``PATH`` made absolute (``~`` expanded; braces kept), for ``recipe.yaml``.

    >>> absolute_spec("wds:/data/s/train-{0..1}.tar")
    'wds:/data/s/train-{0..1}.tar'
    """
    return WDS_PREFIX + os.path.abspath(os.path.expanduser(spec[len(WDS_PREFIX):]))


def parse_size(text: str | int) -> int:
    """A shard size in bytes: ``1GB``, ``500MB``, ``64KiB``, or a plain number of bytes.

    >>> parse_size("1GB"), parse_size("64KiB"), parse_size(1000)
    (1000000000, 65536, 1000)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise FinetuneError(f"shard size `{text}` is not a size; write e.g. 1GB, 500MB or 64KiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class ShardSource:
    """Shards of one split: their paths, sample counts (from the index), and the index itself."""

    urls: list[str]
    counts: list[int]
    index: dict[str, Any]
    directory: Path

    @property
    def classes(self) -> list[str]:
        return list(self.index["classes"])


class CountedSamples(Sequence[Sample]):
    """The samples of a split as far as the index knows them: ``class_counts[c]`` samples of label ``c``
    (no paths: the images are inside the tars). Enough for counts and class weights.

    >>> s = CountedSamples([2, 1], "shards")
    >>> len(s), [x.label for x in s]
    (3, [0, 0, 1])
    """

    def __init__(self, class_counts: Sequence[int], where: str) -> None:
        self.class_counts, self.where = [int(c) for c in class_counts], Path(where)

    def __len__(self) -> int:
        return sum(self.class_counts)

    def __getitem__(self, index):  # noqa: ANN001 -- int or slice
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        for label, count in enumerate(self.class_counts):
            if index < count:
                return Sample(self.where, label)
            index -= count
        raise IndexError(index)  # pragma: no cover

    def __iter__(self) -> Iterator[Sample]:
        return (Sample(self.where, label) for label, count in enumerate(self.class_counts) for _ in range(count))


# --------------------------------------------------------------------------- writing


def webdataset_module():  # noqa: ANN201 -- the module
    """``webdataset`` (the optional extra ``shards``), or a one-line error saying how to install it."""
    try:
        import webdataset
    except ImportError:
        raise FinetuneError("WebDataset shards need the `webdataset` package: pip install "
                            "'finetune-vision[shards]'") from None
    return webdataset


def _shard_split(split: FolderSplit, name: str, samples: Sequence[Sample], out: Path, maxsize: int,
                 seed: int) -> dict[str, Any]:
    wds = webdataset_module()

    order = list(samples)
    if name == "train":  # every shard holds every class: a shuffle buffer only mixes nearby samples
        random.Random(f"{seed}/shards").shuffle(order)
    counts: dict[str, list[Any]] = {}
    class_counts = [0] * len(split.classes)
    with wds.ShardWriter(str(out / f"{name}-%06d.tar"), maxcount=10**9, maxsize=maxsize, verbose=0) as writer:
        for position, sample in enumerate(order):
            data = Path(sample.path).read_bytes()
            ext = Path(sample.path).suffix.lower().lstrip(".")
            try:
                fname = str(Path(sample.path).relative_to(split.root))
            except ValueError:
                fname = str(sample.path)
            writer.write({"__key__": f"{position:09d}", ext: data, "cls": str(sample.label).encode(),
                          "fname": fname.encode()})
            entry = counts.setdefault(Path(writer.fname).name, [0, 0, [0] * len(split.classes)])
            entry[0] += 1
            entry[1] += len(data)
            entry[2][sample.label] += 1
            class_counts[sample.label] += 1
    shards = [{"name": n, "count": c, "bytes": b, "class_counts": k} for n, (c, b, k) in sorted(counts.items())]
    return {"count": len(order), "class_counts": class_counts, "shards": shards}


def write_shards(split: FolderSplit, out: str | os.PathLike, shard_size: str | int = "1GB",
                 seed: int = 0) -> dict[str, Any]:
    """Write ``split`` as WebDataset shards and ``index.json`` (+ ``skipped.txt``) in ``out``; the index.

    ``shard_size`` bounds the bytes of one tar (a shard closes once it reaches it). Existing
    ``train-*.tar``/``val-*.tar`` in ``out`` are replaced. Example in the module docstring.
    """
    maxsize = parse_size(shard_size)
    out = Path(out).expanduser()
    if not split.val:
        raise FinetuneError(f"`{split.root}` gives no validation images; raise --val-fraction or add a val/ folder")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("train-*.tar"), *out.glob("val-*.tar")]:
        old.unlink()
    splits = {name: _shard_split(split, name, samples, out, maxsize, seed)
              for name, samples in (("train", split.train), ("val", split.val))}
    index = {"format": INDEX_FORMAT, "classes": list(split.classes), "source": str(split.root),
             "layout": split.layout, "seed": seed, "splits": splits,
             "skipped": [{"path": str(s.path), "reason": s.reason} for s in split.skipped],
             "warnings": list(split.warnings)}
    write_text(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    write_skipped(split.skipped, out / "skipped.txt")
    return index


# --------------------------------------------------------------------------- reading


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """``DIR/index.json`` as written by :func:`write_shards` (one-line error when missing or wrong).

    >>> read_index("/nonexistent")
    Traceback (most recent call last):
    ...
    finetune.errors.FinetuneError: no shard index `/nonexistent/index.json`; write the shards with `finetune shard SRC --out /nonexistent`, which writes the index next to them
    """
    path = Path(directory) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinetuneError(f"no shard index `{path}`; write the shards with `finetune shard SRC --out "
                            f"{directory}`, which writes the index next to them") from None
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"shard index `{path}` cannot be read ({exc}); write the shards again") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise FinetuneError(f"`{path}` is not a shard index of `finetune shard` (format {INDEX_FORMAT}); "
                            "write the shards again")
    return index


def _expand(pattern: str) -> list[str]:
    import braceexpand  # webdataset's own dependency, so patterns mean what they mean to webdataset

    return list(braceexpand.braceexpand(pattern))


def resolve_shards(spec: str, split: str = "train") -> ShardSource:
    """The shards ``spec`` names: ``wds:DIR`` (the index's shards of ``split``) or ``wds:PATTERN``
    (brace-expanded; every name must exist and be in the index next to it). One-line errors for a
    pattern that matches nothing, a shard the index does not know, or a missing index.
    """
    if not is_wds(spec):
        raise FinetuneError(f"`{spec}` does not name shards; write wds:DIR or wds:DIR/train-{{000000..000009}}.tar")
    body = os.path.expanduser(spec[len(WDS_PREFIX):])
    if os.path.isdir(body):
        directory = Path(body)
        index = read_index(directory)
        names = [s["name"] for s in index["splits"][split]["shards"]]
        urls = [str(directory / n) for n in names]
    else:
        urls = _expand(body)
        existing = [u for u in urls if os.path.isfile(u)]
        if not existing:
            raise FinetuneError(f"no shards match `{body}` ({len(urls)} name(s), none exists); check the "
                                "folder and the {first..last} range, e.g. wds:DIR/train-{000000..000009}.tar")
        if len(existing) < len(urls):
            missing = [u for u in urls if not os.path.isfile(u)]
            raise FinetuneError(f"{len(missing)} of the {len(urls)} shards `{body}` names do not exist (e.g. "
                                f"`{missing[0]}`); fix the {{first..last}} range")
        directory = Path(urls[0]).parent
        index = read_index(directory)
    known = {s["name"]: int(s["count"]) for part in index["splits"].values() for s in part["shards"]}
    unknown = [u for u in urls if Path(u).name not in known]
    if unknown:
        raise FinetuneError(f"shard `{unknown[0]}` is not in `{directory / INDEX_NAME}`; name shards that "
                            "`finetune shard` wrote there")
    if not urls:
        raise FinetuneError(f"`{directory / INDEX_NAME}` lists no {split} shards; write the shards again")
    return ShardSource(urls, [known[Path(u).name] for u in urls], index, directory)


def split_from_source(train: ShardSource, val: ShardSource) -> FolderSplit:
    """A :class:`~finetune.data.folder.FolderSplit` describing shards: classes and counts from the index
    (:class:`CountedSamples`), the files the shard writer skipped."""
    def class_counts(source: ShardSource) -> list[int]:
        per_shard = {s["name"]: s["class_counts"] for part in source.index["splits"].values() for s in part["shards"]}
        return [sum(column) for column in zip(*(per_shard[Path(u).name] for u in source.urls))]

    if train.classes != val.classes:
        raise FinetuneError(f"the train shards ({train.directory}) and the val shards ({val.directory}) have "
                            "different classes; write both with one `finetune shard`")
    skipped = [Skipped(Path(s["path"]), s["reason"]) for s in train.index.get("skipped", [])]
    layout = f"webdataset shards: {len(train.urls)} train / {len(val.urls)} val"
    return FolderSplit(train.directory, train.classes, CountedSamples(class_counts(train), str(train.directory)),
                       CountedSamples(class_counts(val), str(val.directory)), skipped, layout)


def scan_for_shards(src: str | os.PathLike, labels: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                    **manifest_columns: str) -> FolderSplit:
    """The split ``finetune shard`` writes: the folder scan (or the manifest's), as a folder run would split it."""
    if labels:
        return scan_manifest(src, labels, val_fraction=val_fraction, seed=seed, **manifest_columns)
    return scan_folder(src, val_fraction=val_fraction, seed=seed)
