"""Which files are images: extensions, junk to ignore, walking folders, and listing images to predict.

Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``...), ``Thumbs.db``, ``__MACOSX``
and files without an image extension are ignored silently. A file with an image extension that
cannot be used is reported as :class:`Skipped` with a one-phrase reason
(:func:`~finetune.data.scan_cache.check_paths`: decoded once, then remembered); :func:`write_skipped`
writes that report and :func:`read_skipped` reads it back.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("b.JPG", "a.png", ".DS_Store", "notes.txt"):
...     _ = (d / name).write_bytes(b"x")
>>> [p.name for p in walk_images(d)]
['a.png', 'b.JPG']
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from finetune.data.scan_cache import ScanStats, check_paths
from finetune.errors import FinetuneError
from finetune.io import write_text

__all__ = ["IMAGE_EXTENSIONS", "Skipped", "find_images", "list_images", "merge_skipped", "read_skipped", "sort_key",
           "write_skipped"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Junk that operating systems and tools leave in folders; compared lower-case. Anything whose
# name starts with "." (.DS_Store, ._foo.jpg, .ipynb_checkpoints) is ignored as well.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin"})


@dataclass(frozen=True)
class Skipped:
    """A file with an image extension that cannot be used, and why (one short phrase)."""

    path: Path
    reason: str


def is_ignored(name: str) -> bool:
    """Hidden files and folders and OS junk (``Thumbs.db``, ``__MACOSX``...)."""
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def has_image_ext(name: str) -> bool:
    """The name ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
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


def subdirs(path: Path) -> list[str]:
    """Sorted names of the sub-folders of ``path`` that are not ignored."""
    return sorted(e.name for e in _listdir(path) if not is_ignored(e.name) and e.is_dir())


def sort_key(path: str | os.PathLike) -> str:
    """A string that sorts like ``path`` does among paths of the same anchor (``sorted(paths, key=sort_key)``).

    ``Path`` objects compare part by part, in Python, which takes seconds for 100,000 paths; this key
    puts the separator below every other character, so plain string comparison gives the same order.

    >>> names = ["a/b", "a-b/c", "a.b", "a/b-c", "ab", "a/b/c"]
    >>> sorted(map(Path, names)) == sorted(map(Path, names), key=sort_key)
    True
    """
    return os.path.normcase(os.fspath(path)).replace(os.sep, "\0")


def walk_images(top: Path) -> list[Path]:
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
            if is_ignored(entry.name):
                continue
            if entry.is_dir():
                stack.append(folder / entry.name)
            elif has_image_ext(entry.name):
                found.append(folder / entry.name)  # includes broken links: reported as Skipped
    found.sort(key=sort_key)  # the order of sorted(found), several times faster
    return found


def loose_images(folder: Path) -> int:
    """How many image files lie directly in ``folder`` (not in a sub-folder)."""
    return sum(
        1
        for e in _listdir(folder)
        if not is_ignored(e.name) and not e.is_dir() and has_image_ext(e.name)
    )


def list_images(
    paths: Sequence[str | os.PathLike], check_images: bool | str = True
) -> tuple[list[Path], list[Skipped]]:
    """Image files from files and folders (folders recursively, sorted), for prediction.

    Hidden files and files without an image extension inside folders are ignored; a file
    named explicitly without an image extension, or one that cannot be decoded
    (``check_images``; verdicts come from the scan cache when the file is unchanged), is
    returned in the skipped list. Duplicates are listed once, in the order given. A path
    that does not exist raises :class:`FinetuneError`.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8)).save(d / "a.png")
    >>> _ = (d / "notes.txt").write_text("hi")
    >>> found, skipped = list_images([d])
    >>> [p.name for p in found], skipped
    (['a.png'], [])
    """
    found, skipped, _ = find_images(paths, check_images)
    return found, skipped


def find_images(
    paths: Sequence[str | os.PathLike], check_images: bool | str = True
) -> tuple[list[Path], list[Skipped], ScanStats]:
    """:func:`list_images` and what its scan did (files decoded, taken from the cache).

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8)).save(d / "a.png")
    >>> find_images([d], check_images=False)[2].decoded
    0
    """
    started = time.perf_counter()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    candidates: list[Path] = []
    skipped: list[Skipped] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            candidates += walk_images(path)
        elif path.exists() or path.is_symlink():
            if has_image_ext(path.name):
                candidates.append(path)
            else:
                skipped.append(Skipped(path, "not an image file extension"))
        else:
            raise FinetuneError(f"`{path}` does not exist; pass image files or folders of images")
    candidates = list(dict.fromkeys(candidates))
    bad, stats = check_paths(candidates, check_images)
    skipped += [Skipped(p, r) for p, r in bad.items()]  # in the order of candidates
    bad_ids = {id(p) for p in bad}  # by identity: `p in bad` would hash (and grow) every Path
    stats.seconds = time.perf_counter() - started  # listing the folders too
    return [p for p in candidates if id(p) not in bad_ids], skipped, stats


def clean_field(text: str) -> str:
    """``text`` with tabs and line breaks replaced by spaces (one field of a ``skipped.txt`` line)."""
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_skipped(skipped: Sequence[Skipped], path: str | os.PathLike) -> None:
    """Atomically write one ``path<TAB>reason`` line per skipped file.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "skipped.tsv"
    >>> write_skipped([Skipped(pathlib.Path("a.jpg"), "empty file")], out)
    >>> out.read_text()
    'a.jpg\\tempty file\\n'
    """

    write_text(path, "".join(f"{clean_field(str(s.path))}\t{clean_field(s.reason)}\n" for s in skipped))


def read_skipped(path: str | os.PathLike) -> list[Skipped]:
    """The entries of a file :func:`write_skipped` wrote (``[]`` if there is none).

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "skipped.txt"
    >>> write_skipped([Skipped(pathlib.Path("a.jpg"), "empty file")], out)
    >>> read_skipped(out)
    [Skipped(path=PosixPath('a.jpg'), reason='empty file')]
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries = [line.partition("\t") for line in text.splitlines()]
    return [Skipped(Path(p), reason) for p, sep, reason in entries if sep and p]


def merge_skipped(*groups: Iterable[Skipped]) -> list[Skipped]:
    """The skipped files of several reports as one list sorted by path, each file once (first reason kept).

    >>> a, b = Skipped(Path("b.png"), "empty file"), Skipped(Path("a.png"), "not an image (cannot identify)")
    >>> [s.path.name for s in merge_skipped([a], [b, a])]
    ['a.png', 'b.png']
    """
    first: dict[Path, Skipped] = {}
    for group in groups:
        for entry in group:
            first.setdefault(entry.path, entry)
    return [first[p] for p in sorted(first)]
