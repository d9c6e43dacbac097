"""Lazy image checking: files that fail to load during training, recorded where the main process finds them.

With ``data.check_images: lazy`` nothing is decoded before training; a file that fails to load in
:class:`~finetune.data.dataset.ImageDataset` is replaced by the next loadable one (as for a file that
changed on disk after the scan) and recorded in the dataset's :class:`SkipLog`. DataLoader workers are
separate processes, so a record is not kept in memory: each process -- the training process and every
worker -- appends ``path<TAB>reason`` lines to its own file ``<pid>.tsv`` in the log's folder, one
``write`` per line on a file opened with ``O_APPEND``, done before the substitute image is returned,
so once the loader has yielded the batch the record is on disk whatever happens to the worker later.
:meth:`SkipLog.read` merges the files (duplicates from several workers dropped, a line cut by a crash
ignored).

Where: :func:`lazy_skip_log` -- ``RUN/.lazy-skips/rank<i>/`` when the run directory is named (so the
records of a run killed and resumed are kept), else a folder in the temporary directory named by the
training process's pid. At the end of training the main process gathers every rank's records, merges
them into ``RUN/skipped.txt`` (:func:`~finetune.data.files.write_skipped`'s format) and removes the
folders.

>>> import tempfile, pathlib
>>> log = SkipLog(pathlib.Path(tempfile.mkdtemp()) / "skips")
>>> log.record(pathlib.Path("a.png"), "not an image (cannot identify)")
>>> log.record(pathlib.Path("a.png"), "not an image (cannot identify)")
>>> log.read()
[Skipped(path=PosixPath('a.png'), reason='not an image (cannot identify)')]
>>> log.clear(); log.read()
[]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from finetune.data.files import Skipped, clean_field, merge_skipped

__all__ = ["LAZY_SKIPS_DIR", "SkipLog", "lazy_skip_log"]

LAZY_SKIPS_DIR = ".lazy-skips"


class SkipLog:
    """A folder of per-process append-only ``path<TAB>reason`` files (picklable: it is only a path)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"SkipLog({str(self.directory)!r})"

    def record(self, path: Path, reason: str) -> None:
        """Append one line to this process's file (created with the folder on first use)."""
        line = f"{clean_field(str(path))}\t{clean_field(reason)}\n".encode("utf-8", "surrogateescape")
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f"{os.getpid()}.tsv", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> list[Skipped]:
        """Every recorded file once (first reason kept), sorted by path."""
        found: list[Skipped] = []
        for part in sorted(self.directory.glob("*.tsv")) if self.directory.is_dir() else []:
            text = part.read_bytes().decode("utf-8", "surrogateescape")
            for line in text.split("\n")[:-1]:  # the last piece is "" or a line cut short by a crash
                path, sep, reason = line.partition("\t")
                if sep and path:
                    found.append(Skipped(Path(path), reason))
        return merge_skipped(found)

    def clear(self) -> None:
        """Remove the folder, and its parent when nothing else is left in it."""
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()
        except OSError:
            pass


def lazy_skip_log(out: str | os.PathLike | None, process_index: int = 0) -> SkipLog:
    """Where one training process and its loader workers record files that failed to load.

    ``out`` is the run directory (``runtime.out``) or ``None`` when it is not named yet.

    >>> lazy_skip_log("/runs/a", 1).directory.as_posix()
    '/runs/a/.lazy-skips/rank1'
    """
    if out is not None:
        base = Path(out).expanduser().absolute() / LAZY_SKIPS_DIR  # loader workers may run elsewhere
    else:
        base = Path(tempfile.gettempdir()) / f"finetune-lazy-skips-{os.getpid()}"
    return SkipLog(base / f"rank{process_index}")
