"""Training: :func:`fit` and the pieces it is made of (setup, the training session and its loop,
optimiser and phases, checkpoints and resume, the frozen-feature cache, memory-format autotune,
the teacher side of distillation, the process launcher, the LR finder).

``fit`` and ``FitResult`` are imported on first use (PEP 562), so the light modules
(:mod:`~finetune.train.launch`, whose process-count check the command line runs before
anything else) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.train.trainer import FitResult, fit  # noqa: F401

_EXPORTS = {"fit": "finetune.train.trainer", "FitResult": "finetune.train.trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """``fit`` / ``FitResult``, imported from :mod:`finetune.train.trainer` on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finetune.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names."""
    return __all__
