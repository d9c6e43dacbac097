"""The one exception type the toolkit raises for user mistakes.

The CLI catches :class:`FinetuneError`, prints its message on one line and exits
with code 2; anything else is a bug and keeps its traceback.

>>> from finetune.errors import FinetuneError
>>> str(FinetuneError("data folder `x` does not exist; pass --data DIR"))
'data folder `x` does not exist; pass --data DIR'
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""
