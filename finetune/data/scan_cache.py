"""The scan cache: every image file's check verdict, so a re-scan decodes only new or changed files.

:func:`check_paths` is :func:`~finetune.data.images.check_files` with a memory: the verdict of each
decoded file (usable, or the phrase it is skipped with) is stored under :func:`finetune.io.cache_dir`
``/scan/``, keyed by the file's resolved path, size and ``mtime_ns``, and later scans -- another
``finetune train``, ``eval``, ``predict``, a ``--resume``, the other processes of a multi-process run
-- take it from there instead of decoding the file again. :class:`ScanStats` says how many files a
scan decoded and how many it took from the cache.

Format: one JSON file per image folder (named by a hash of its resolved path)::

    {"format": 1, "checker": "<Pillow version>|<MAX_IMAGE_PIXELS>|<LOAD_TRUNCATED_IMAGES>",
     "dir": "/resolved/folder", "files": {"a.png": [size, mtime_ns, null], "b.jpg": [size, mtime_ns, "reason"]}}

A folder-sized shard (rather than one file per data root) lets ``eval DATA/val`` or ``predict DATA/cat``
reuse what ``train DATA`` checked. Concurrency: each shard is replaced whole with
:func:`finetune.io.atomic_path` (write a temporary file in the same folder, fsync, ``os.replace``), so
two runs scanning the same folder at once never corrupt it -- a reader sees the old file or the new one,
never half of one. A writer first merges the shard as it is on disk at that moment; two writers racing
on one shard can drop each other's new entries, which costs a decode next time, never a wrong verdict.
A missing, unreadable, truncated or foreign shard reads as empty (the files are decoded again). Plain
files and rename were chosen over SQLite in WAL mode because WAL needs shared memory that network
filesystems (NFS home directories, where ``~/.cache`` often lives) do not provide, and because there is
nothing to lock, recover or vacuum.

Not cached: files whose ``mtime`` is under :data:`SETTLE_SECONDS` old when the scan starts (a rewrite
within the filesystem's timestamp granularity could keep size and mtime -- git's "racy clean" problem),
and verdicts that depend on the reader rather than the bytes (permission denied, out of memory).

>>> import os, tempfile, time, pathlib
>>> from PIL import Image
>>> os.environ["FINETUNE_CACHE"] = tempfile.mkdtemp()
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> Image.new("RGB", (8, 8)).save(d / "ok.png")
>>> _ = (d / "bad.png").write_text("not an image")
>>> for p in d.iterdir():
...     os.utime(p, (time.time() - 60,) * 2)  # older than SETTLE_SECONDS
>>> paths = sorted(d.iterdir())
>>> bad, first = check_paths(paths)
>>> bad, second = check_paths(paths)
>>> [p.name for p in bad], (first.decoded, first.cached), (second.decoded, second.cached)
(['bad.png'], (2, 0), (0, 2))
>>> del os.environ["FINETUNE_CACHE"]
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageFile

from finetune.config.choices import check_images_value
from finetune.data.images import check_files, failure_reason
from finetune.errors import FinetuneError
from finetune.io import atomic_path, cache_dir

__all__ = ["SETTLE_SECONDS", "ScanStats", "check_paths", "decodes"]

FORMAT = 1
SETTLE_SECONDS = 2.0  # FAT keeps mtimes to 2 s; ext4/tmpfs/NFS to a clock tick
# Verdicts that are a property of the file's bytes (and the checker), so safe to reuse.
_CACHEABLE = ("not an image", "truncated/corrupt", "decompression bomb", "unsupported")
_MISS = object()


@dataclass
class ScanStats:
    """What one scan did: files looked at, decoded, taken from the cache; seconds it took (the checks;
    :func:`~finetune.data.folder.scan_folder` and :func:`~finetune.data.files.find_images` count listing
    and splitting the folders too).

    >>> ScanStats(images=3, decoded=1, cached=2, seconds=0.25).describe()
    '3 images, 1 decoded, 2 from cache (0.2 s)'
    """

    images: int = 0
    decoded: int = 0
    cached: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        """``"N images, D decoded, C from cache (S s)"``."""
        return f"{self.images} images, {self.decoded} decoded, {self.cached} from cache ({self.seconds:.1f} s)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decodes(check_images: bool | str) -> bool:
    """Whether a ``check_images`` value decodes files up front (``True``/``"true"``; not ``False`` nor ``"lazy"``).

    >>> decodes(True), decodes("lazy"), decodes("false")
    (True, False, False)
    """
    value = check_images_value(check_images)
    if value is None:
        raise FinetuneError(f"check_images: `{check_images}` is not valid; choose one of true, false, lazy")
    return value is True


def _checker() -> str:
    """What a verdict depends on besides the file: Pillow's decoders and the two limits users change."""
    return f"{Image.__version__}|{Image.MAX_IMAGE_PIXELS}|{bool(ImageFile.LOAD_TRUNCATED_IMAGES)}"


@dataclass(frozen=True, slots=True)
class _Key:
    directory: str  # resolved
    name: str
    size: int
    mtime_ns: int


class _Shards:
    """The cache shards one scan reads, and the entries it adds (written by :meth:`save`)."""

    def __init__(self, root: Path) -> None:
        self.root, self.checker = root, _checker()
        self.loaded: dict[str, dict[str, Any]] = {}
        self.added: dict[str, dict[str, list]] = {}

    def path(self, directory: str) -> Path:
        return self.root / f"{hashlib.sha1(os.fsencode(directory)).hexdigest()[:24]}.json"

    def read(self, directory: str) -> dict[str, Any]:
        """The shard's ``files`` as on disk now; ``{}`` if missing, corrupt, or from another checker/folder."""
        try:
            data = json.loads(self.path(directory).read_bytes())
        except (OSError, ValueError, RecursionError):  # missing, garbage, truncated, not UTF-8
            return {}
        if (not isinstance(data, dict) or data.get("format") != FORMAT or data.get("checker") != self.checker
                or data.get("dir") != directory or not isinstance(data.get("files"), dict)):
            return {}
        return data["files"]

    def lookup(self, key: _Key) -> object:
        """The cached verdict (``None`` = usable, or the reason), or ``_MISS``."""
        if key.directory not in self.loaded:
            self.loaded[key.directory] = self.read(key.directory)
        entry = self.loaded[key.directory].get(key.name)
        if (isinstance(entry, list) and len(entry) == 3 and entry[0] == key.size and entry[1] == key.mtime_ns
                and (entry[2] is None or isinstance(entry[2], str))):
            return entry[2]
        return _MISS

    def put(self, key: _Key, reason: str | None) -> None:
        self.added.setdefault(key.directory, {})[key.name] = [key.size, key.mtime_ns, reason]

    def save(self) -> None:
        """Merge the added entries into each shard as it is on disk now; replace it atomically."""
        for directory, entries in self.added.items():
            files = {**self.read(directory), **entries}
            text = json.dumps({"format": FORMAT, "checker": self.checker, "dir": directory, "files": files},
                              separators=(",", ":"))  # ensure_ascii: any file name, even undecodable bytes
            try:
                with atomic_path(self.path(directory)) as tmp:
                    tmp.write_text(text, encoding="ascii")
            except OSError as exc:
                warnings.warn(f"scan cache not written to {self.root} ({exc.strerror or exc}); the next scan "
                              "decodes these files again", RuntimeWarning, stacklevel=3)
                return


def _identify(path: Path, real_dirs: dict[str, str]) -> tuple[_Key | None, str | None]:
    """The cache key of ``path`` (resolved, size, mtime), or the reason it is unusable without decoding.

    ``real_dirs`` maps each folder as given to its resolved path (one ``realpath`` per folder).
    """
    try:
        text = os.fspath(path)
        info = os.lstat(text)
        if stat.S_ISLNK(info.st_mode):
            info = os.stat(text)
            directory, name = os.path.split(os.path.realpath(text))
        else:
            parent, name = os.path.split(text)  # string work: Path.parent/.name cost more than the lstat
            directory = real_dirs.get(parent)
            if directory is None:
                directory = real_dirs[parent] = os.path.realpath(parent or os.curdir)
    except OSError as exc:
        return None, failure_reason(exc)
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"
    if info.st_size == 0:
        return None, "empty file"
    return _Key(directory, name, info.st_size, info.st_mtime_ns), None


def check_paths(paths: Sequence[Path], check_images: bool | str = True, *,
                cache: bool = True) -> tuple[dict[Path, str], ScanStats]:
    """``({path: reason} for the unusable files, stats)``: :func:`~finetune.data.images.check_files` through the cache.

    With ``check_images`` true, files the cache knows (same resolved path, size and mtime) are not
    decoded; the others are decoded in a thread pool and their verdicts stored. ``False`` and
    ``"lazy"`` decode nothing (missing, non-regular and empty files are still reported).
    ``cache=False`` decodes everything and leaves the cache alone. The keys of the result are the
    objects given (callers may look them up by ``id`` instead of hashing every path). Example in the
    module docstring.
    """
    started = time.perf_counter()
    paths = list(paths)
    if not decodes(check_images) or not cache:
        decode = decodes(check_images)
        bad = check_files(paths, decode)
        return bad, ScanStats(len(paths), len(paths) if decode else 0, 0, time.perf_counter() - started)
    settled_ns = time.time_ns() - int(SETTLE_SECONDS * 1e9)
    shards = _Shards(cache_dir() / "scan")
    # Bookkeeping by position, not by Path: hashing a Path stores a 32-byte int in it, for every file.
    bad_at: dict[int, str] = {}
    misses: list[tuple[int, _Key]] = []
    real_dirs: dict[str, str] = {}
    hits = 0
    for index, path in enumerate(paths):
        key, reason = _identify(path, real_dirs)
        if key is None:
            bad_at[index] = reason
            continue
        verdict = shards.lookup(key)
        if verdict is _MISS:
            misses.append((index, key))
            continue
        hits += 1
        if verdict is not None:
            bad_at[index] = verdict
    decoded = {id(p): r for p, r in check_files([paths[i] for i, _ in misses], True).items()}
    for index, key in misses:
        reason = decoded.get(id(paths[index]))
        if reason is not None:
            bad_at[index] = reason
        if (reason is None or reason.startswith(_CACHEABLE)) and key.mtime_ns < settled_ns:
            shards.put(key, reason)
    shards.save()
    bad = {paths[i]: bad_at[i] for i in sorted(bad_at)}  # in the order given
    return bad, ScanStats(len(paths), len(misses), hits, time.perf_counter() - started)
