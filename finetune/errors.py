"""The one exception type the toolkit raises for user mistakes, and the helpers its messages share.

The CLI catches :class:`FinetuneError`, prints its message on one line and exits
with code 2; anything else is a bug and keeps its traceback.

>>> from finetune.errors import FinetuneError
>>> str(FinetuneError("data folder `x` does not exist; pass --data DIR"))
'data folder `x` does not exist; pass --data DIR'
"""

from __future__ import annotations

import difflib
from typing import Iterable


class FinetuneError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


class UnsafeFileError(FinetuneError):
    """A file that would run pickled code when loaded: refused, never worked around."""


def close_matches(value: object, candidates: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The candidates closest to ``value`` (difflib ratio ≥ ``cutoff``), best first.

    >>> close_matches("fulll", ["probe", "full", "finetune"])
    ['full']
    """
    return difflib.get_close_matches(str(value), list(candidates), n=n, cutoff=cutoff)


def did_you_mean(value: object, candidates: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """``"did you mean `x`? "`` (or ``` `x`, `y`? ```) for the closest candidates, ``""`` when none is close.

    The one close-match hint of every message that names a bad value (recipe keys and choices,
    recipe names, timm model names).

    >>> did_you_mean("fulll", ["probe", "full"])
    'did you mean `full`? '
    >>> did_you_mean("xyz", ["probe", "full"])
    ''
    """
    close = close_matches(value, candidates, n=n, cutoff=cutoff)
    return f"did you mean {', '.join(f'`{c}`' for c in close)}? " if close else ""


def one_line(exc: BaseException, limit: int = 200) -> str:
    r"""An exception's message on one line (whitespace collapsed), shortened to ``limit`` characters.

    For messages that quote a library's error inside a one-line :class:`FinetuneError`.

    >>> one_line(ValueError("bad header\n  at byte 8"))
    'bad header at byte 8'
    >>> one_line(OSError("x" * 300), limit=10)
    'xxxxxxx...'
    >>> one_line(KeyError())
    'KeyError'
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
