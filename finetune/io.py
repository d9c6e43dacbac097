"""Atomic file writes and the run-directory layout.

Every file the toolkit writes goes through :func:`atomic_path`: the content is
written to a temporary file in the same directory, flushed and fsynced, then
moved over the target with ``os.replace`` so a reader never sees half a file and
a crash never destroys the previous version.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_json(d / "a.json", {"x": 1})
>>> read_json(d / "a.json")
{'x': 1}
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file


def cache_dir() -> Path:
    """Cache root: ``$FINETUNE_CACHE``, else ``$XDG_CACHE_HOME/finetune-vision``, else ``~/.cache/finetune-vision``.

    >>> import os; os.environ["FINETUNE_CACHE"] = "/tmp/fv-cache"; str(cache_dir())
    '/tmp/fv-cache'
    >>> del os.environ["FINETUNE_CACHE"]
    """
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "finetune-vision"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and ``os.replace`` it onto ``path``.

    Use it around any writer that takes a filename (``safetensors.torch.save_file``,
    ``matplotlib.figure.Figure.savefig``...).

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text()
    'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files (and some writers recreate the file): give the usual permissions
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous copy of ``model.state_dict()`` ready for safetensors.

    safetensors refuses shared or non-contiguous tensors; channels_last weights are non-contiguous.
    """
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``state`` as safetensors."""
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {"format": "pt"})


def safe_torch_load(path: str | os.PathLike, what: str = "weights") -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.

    A file that would need pickled code (a class, ``os.system`` …) is refused with a one-line
    :class:`~finetune.errors.FinetuneError` before any of it runs; torch's own warnings about the
    file's pickle protocol are silenced so the user sees that one line.
    """
    import pickle
    import warnings

    import torch

    from finetune.errors import FinetuneError, UnsafeFileError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeFileError(f"`{path}` is not a plain {what} file: it holds pickled code, refused for "
                            "safety; re-save it as a state dict or .safetensors") from None
    except Exception as err:  # noqa: BLE001 -- torch raises RuntimeError/EOFError/... for unparsable files
        raise FinetuneError(f"`{path}` could not be read as PyTorch {what} ({type(err).__name__}); the file is "
                            "damaged or not a PyTorch file") from None
