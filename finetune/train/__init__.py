"""Training: :func:`fit` and the pieces it is made of (setup, loop, optimiser and phases,
checkpoints and resume, the frozen-feature cache, memory-format autotune, the process launcher,
the LR finder).
"""

from finetune.train.trainer import FitResult, fit  # noqa: F401
