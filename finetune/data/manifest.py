"""Labels from a manifest: a CSV (or ``.jsonl`` JSON Lines) file naming each image and its class.

One row per image: a path column (relative to the data folder, or absolute), a label column and,
optionally, a split column (``train``/``val``; rows with other values such as ``test`` are left out
and counted). Column names are configurable and found case-insensitively; when the configured name
is the default and absent, a usual alternative is taken (``filename``/``image``/``file`` for the path,
``class``/``category`` for the label) and the scan says which. The result is the same
:class:`~finetune.data.folder.FolderSplit` a folder scan gives: without a split column the split is
the folder scan's own (stratified per class, seeded), so the same images given as class folders or as
a manifest split -- and train -- the same. Missing files, empty labels and undecodable images are
skipped and listed (:class:`~finetune.data.files.Skipped`), never a crash; mistakes in the manifest
itself raise :class:`~finetune.errors.FinetuneError` with one line.

>>> import tempfile, pathlib
>>> from PIL import Image
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> rows = ["filename,class"]
>>> for name in ("cat", "dog"):
...     for i in range(5):
...         Image.new("RGB", (8, 8)).save(root / f"{name}{i}.png")
...         rows.append(f"{name}{i}.png,{name}")
>>> _ = (root / "labels.csv").write_text("\\n".join(rows) + "\\n")
>>> split = scan_manifest(root, "labels.csv", val_fraction=0.2, seed=0)
>>> split.classes, len(split.train), len(split.val), split.layout.split(";")[0]
(['cat', 'dog'], 8, 2, 'manifest labels.csv (path column `filename`, label column `class`')
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from finetune.data.files import Skipped, sort_key
from finetune.data.folder import VAL_DIR_NAMES, FolderSplit, Sample, _check_root, _names, _stratified_split
from finetune.data.scan_cache import check_paths
from finetune.errors import FinetuneError

__all__ = ["PATH_COLUMNS", "LABEL_COLUMNS", "SPLIT_COLUMNS", "find_column", "manifest_path", "read_manifest",
           "scan_manifest", "scan_manifest_labelled"]

#: Names tried, in order, when the configured column is the default and the manifest lacks it.
PATH_COLUMNS = ("path", "filename", "file", "image", "image_path", "filepath", "file_name", "img")
LABEL_COLUMNS = ("label", "class", "category", "class_name", "target")
SPLIT_COLUMNS = ("split", "subset", "fold")
_SPLITS = {"train": "train", **{name: "val" for name in VAL_DIR_NAMES}}


def manifest_path(labels: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Where the manifest ``labels`` is: as given (absolute, or relative to the current folder) if it
    exists there, else relative to the data folder ``root`` if it exists there, else as given.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "labels.csv").write_text("path,label\\n")
    >>> manifest_path("labels.csv", root) == root / "labels.csv"
    True
    """
    path = Path(labels).expanduser()
    if path.is_absolute() or path.exists() or root is None:
        return path
    inside = Path(root).expanduser() / path
    return inside if inside.exists() else path


def read_manifest(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """``(columns, [(line number, row)])`` of a CSV (``.tsv``: tab-separated) or ``.jsonl`` file.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> _ = f.write_text('{"image": "a.png", "label": 3}\\n\\n{"image": "b.png", "label": "x"}\\n')
    >>> read_manifest(f)
    (['image', 'label'], [(1, {'image': 'a.png', 'label': 3}), (3, {'image': 'b.png', 'label': 'x'})])
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FinetuneError(f"labels file `{path}` not found; pass a CSV or .jsonl manifest with --labels "
                            "(a path relative to the current folder or to --data)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"cannot read labels file `{path}` ({getattr(exc, 'strerror', None) or exc})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(path, text)
    reader = csv.reader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    lines = [(n, cells) for n, cells in enumerate(reader, 1) if any(c.strip() for c in cells)]
    if not lines:
        return [], []
    columns = [c.strip() for c in lines[0][1]]
    rows = [(n, {c: (cells[i].strip() if i < len(cells) else "") for i, c in enumerate(columns) if c})
            for n, cells in lines[1:]]
    return [c for c in columns if c], rows


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    columns: dict[str, None] = {}
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise FinetuneError(f"`{path}` line {n} is not JSON ({exc}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise FinetuneError(f"`{path}` line {n} is not a JSON object; write one object per line, "
                                'e.g. {"path": "cat/1.jpg", "label": "cat"}')
        columns.update(dict.fromkeys(row))
        rows.append((n, row))
    return list(columns), rows


def find_column(columns: Sequence[str], wanted: str, aliases: Sequence[str]) -> str | None:
    """The column named ``wanted`` (any case); if there is none and ``wanted`` is ``aliases[0]`` (the
    default), the first alias present; else ``None``.

    >>> find_column(["Filename", "Class"], "path", PATH_COLUMNS), find_column(["file"], "image_id", PATH_COLUMNS)
    ('Filename', None)
    """
    by_name = {c.lower(): c for c in reversed(list(columns))}
    if wanted.lower() in by_name:
        return by_name[wanted.lower()]
    if aliases and wanted == aliases[0]:
        return next((by_name[a] for a in aliases if a in by_name), None)
    return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        raise FinetuneError(f"manifest label `{json.dumps(value)}` is not a single label; multi-label "
                            "manifests are not supported here: give one label per row")
    return str(value).strip()


def _columns(manifest: Path, columns: list[str], path_column: str, label_column: str,
             split_column: str) -> tuple[str, str, str | None]:
    found = _names(columns) if columns else "none"
    path_col = find_column(columns, path_column, PATH_COLUMNS)
    if path_col is None:
        raise FinetuneError(f"`{manifest}` has no path column `{path_column}` (columns found: {found}); name it "
                            f"`path` or set data.path_column")
    label_col = find_column(columns, label_column, LABEL_COLUMNS)
    if label_col is None:
        raise FinetuneError(f"`{manifest}` has no label column `{label_column}` (columns found: {found}); name it "
                            f"`label` or set data.label_column")
    return path_col, label_col, find_column(columns, split_column, SPLIT_COLUMNS)


def _load(root: Path, labels: str | os.PathLike, path_column: str, label_column: str,
          split_column: str) -> tuple[Path, tuple[str, str, str | None], list[tuple[Path, str, str]],
                                      list[Skipped], list[str]]:
    """Read and check the manifest: ``(file, columns, [(path, label, split)], skipped rows, notes)``."""
    manifest = manifest_path(labels, root)
    columns, rows = read_manifest(manifest)
    if not rows:
        raise FinetuneError(f"labels file `{manifest}` is empty; write a header (e.g. `path,label`) and one row "
                            "per image")
    cols = path_col, label_col, split_col = _columns(manifest, columns, path_column, label_column, split_column)
    entries: list[tuple[Path, str, str]] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    duplicates = 0
    for n, row in rows:
        name, label = _text(row.get(path_col)), _text(row.get(label_col))
        if not name:
            skipped.append(Skipped(manifest, f"line {n}: empty path"))
            continue
        path = Path(name).expanduser()
        path = path if path.is_absolute() else root / path
        if not label:
            skipped.append(Skipped(path, f"empty label ({manifest.name} line {n})"))
            continue
        key = sort_key(path)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        split = _text(row.get(split_col)).lower() if split_col else ""
        entries.append((path, label, split))
    if not entries and not any(_text(row.get(label_col)) for _, row in rows):
        raise FinetuneError(f"the label column `{label_col}` of `{manifest}` has no labels; fill it in "
                            "(one class name per row)")
    notes = [f"{duplicates} duplicate row(s) in `{manifest.name}` ignored (first one kept)"] if duplicates else []
    return manifest, cols, entries, skipped, notes


def _check(entries: list[tuple[Path, str, str]], manifest: Path,
           check_images: bool | str) -> tuple[list[tuple[Path, str, str]], list[Skipped], Any]:
    """The entries whose files are usable, the others as :class:`Skipped`, and the scan's stats."""
    paths = [p for p, _, _ in entries]
    bad, stats = check_paths(paths, check_images)  # cached verdicts, like the folder scan's
    missing = "unreadable: No such file or directory"
    skipped = [Skipped(p, f"missing file (listed in {manifest.name})" if r == missing else r)
               for p, r in sorted(bad.items(), key=lambda item: sort_key(item[0]))]
    bad_ids = {id(p) for p in bad}
    return [e for e in entries if id(e[0]) not in bad_ids], skipped, stats


def scan_manifest(root: str | os.PathLike, labels: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0,
                  check_images: bool | str = True, path_column: str = "path", label_column: str = "label",
                  split_column: str = "split") -> FolderSplit:
    """:func:`~finetune.data.folder.scan_folder` for images named by the manifest ``labels``.

    Classes are the sorted unique labels that have a usable training image. With a split column,
    ``train``/``val`` rows are used as given (a val label that no train row has raises
    :class:`FinetuneError`, as a val class folder that train lacks does); without one, each class
    is split like a class folder (same function, same seed). Example in the module docstring.
    """
    root = _check_root(root)
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise FinetuneError(f"val_fraction must be a number in [0, 1), got `{val_fraction}`")
    manifest, (path_col, label_col, split_col), entries, skipped, notes = _load(
        root, labels, path_column, label_column, split_column)
    if split_col:
        others: dict[str, int] = {}
        for _, _, s in entries:
            if s not in _SPLITS:
                others[s or "(empty)"] = others.get(s or "(empty)", 0) + 1
        if others:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(others.items()))
            notes.append(f"left out {sum(others.values())} row(s) whose `{split_col}` is not train/val ({counts})")
        entries = [(p, c, _SPLITS[s]) for p, c, s in entries if s in _SPLITS]
        unknown = sorted({c for _, c, s in entries if s == "val"} - {c for _, c, s in entries if s == "train"})
        if unknown:
            raise FinetuneError(f"`{manifest}` has val row(s) of class(es) {_names(unknown)} that no train row has; "
                                f"add training images of `{unknown[0]}` or remove its val rows")
    all_labels = sorted({c for _, c, s in entries if s != "val"})
    good, bad_files, stats = _check(entries, manifest, check_images)
    skipped = sorted(skipped + bad_files, key=lambda s: sort_key(s.path))
    by_class: dict[str, dict[str, list[Path]]] = {}
    for p, c, s in good:
        by_class.setdefault(c, {}).setdefault(s or "all", []).append(p)
    classes = [c for c in all_labels if by_class.get(c, {}).get("train" if split_col else "all")]
    if len(classes) < 2:
        what = f"only {_names(classes)}" if classes else "none"
        why = f"; {len(skipped)} row(s) skipped, see `skipped`" if skipped else ""
        raise FinetuneError(f"`{manifest}` names fewer than 2 classes with usable training images ({what}{why}); "
                            "a classifier needs at least 2")
    dropped = [c for c in all_labels if c not in classes]
    if dropped:
        notes.append(f"class(es) {_names(dropped)} have no usable training images; dropped")
    described = f"manifest {manifest.name} (path column `{path_col}`, label column `{label_col}`"
    train: list[Sample] = []
    val: list[Sample] = []
    for label, c in enumerate(classes):
        if split_col:
            train += [Sample(p, label) for p in sorted(by_class[c].get("train", []), key=sort_key)]
            val += [Sample(p, label) for p in sorted(by_class[c].get("val", []), key=sort_key)]
        else:
            t, v = _stratified_split(by_class[c]["all"], label, c, val_fraction, seed)
            train, val = train + t, val + v
    if split_col:
        layout = f"{described}, split column `{split_col}`)"
        missing = [c for c in classes if not by_class[c].get("val")]
        if missing:
            notes.append(f"class(es) {_names(missing)} have no val rows in `{manifest.name}`")
    else:
        layout = f"{described}; split with val_fraction={val_fraction}, seed={seed})"
    return FolderSplit(root, classes, train, val, skipped, layout, notes, scan=stats)


def scan_manifest_labelled(root: str | os.PathLike, labels: str | os.PathLike, classes: list[str] | None = None,
                           check_images: bool | str = True, path_column: str = "path",
                           label_column: str = "label") -> tuple[list[str], list[Sample], list[Skipped]]:
    """:func:`~finetune.data.folder.scan_labelled` for a manifest: every row's image, for evaluation.

    A split column is ignored (every row counts). With ``classes`` a label the model does not know
    raises :class:`FinetuneError`. Returns ``(classes, samples, skipped)``.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8)).save(root / "a.png")
    >>> _ = (root / "test.csv").write_text("path,label\\na.png,dog\\nb.png,cat\\n")
    >>> names, samples, skipped = scan_manifest_labelled(root, "test.csv", classes=["cat", "dog"])
    >>> names, [s.label for s in samples], [s.reason for s in skipped]
    (['cat', 'dog'], [1], ['missing file (listed in test.csv)'])
    """
    root = _check_root(root)
    manifest, _, entries, skipped, _ = _load(root, labels, path_column, label_column, "\0no split column")
    if classes is not None:
        unknown = sorted({c for _, c, _ in entries} - set(classes))
        if unknown:
            raise FinetuneError(f"label(s) {_names(unknown)} in `{manifest}` are not classes of the model "
                                f"(which knows {_names(classes)}); remove or rename those rows")
    good, bad_files, _ = _check(entries, manifest, check_images)
    if not good:
        raise FinetuneError(f"none of the {len(entries)} image(s) listed in `{manifest}` can be read"
                            + (f" (e.g. `{bad_files[0].path}`: {bad_files[0].reason})" if bad_files else ""))
    names = sorted({c for _, c, _ in good}) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(names)}
    ordered = sorted(good, key=lambda e: (index[e[1]], sort_key(e[0])))
    return names, [Sample(p, index[c]) for p, c, _ in ordered], sorted(skipped + bad_files,
                                                                        key=lambda s: sort_key(s.path))


def scan_data_section(data: Any, seed: int) -> FolderSplit:
    """The labelled train/val split a recipe's ``data`` section names: its Hugging Face data set
    (``data.root`` = ``hf:...``), its manifest (``data.labels``) or its class folders -- the one entry
    point for every command that re-reads a run's data.

    >>> from finetune.config.sections import DataConfig                # doctest: +SKIP
    >>> scan_data_section(DataConfig(root="~/photos"), seed=0).classes  # doctest: +SKIP
    """
    from finetune.data.folder import scan_folder

    common = dict(val_fraction=data.val_fraction, seed=seed, check_images=data.check_images)
    if str(data.root).startswith("hf:"):  # a Hugging Face data set (finetune.data.hf)
        from finetune.data.hf import scan_hf

        return scan_hf(data.root, image_column=data.image_column, label_column=data.label_column, **common)
    if data.labels:
        return scan_manifest(data.root, data.labels, path_column=data.path_column, label_column=data.label_column,
                             split_column=data.split_column, **common)
    return scan_folder(data.root, **common)
