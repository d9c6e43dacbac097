"""Model selection and early stopping by one validation metric (``optim.monitor``).

The best epoch is the one with the best monitored value (ties: the lower validation loss, or the
higher top-1 when the loss is monitored); its weights are ``model.safetensors``. With
``optim.patience P > 0`` training stops once P epochs in a row have not improved the best value by
more than ``optim.min_delta`` (Keras' rule). Both are functions of the epoch history alone, which
every checkpoint holds, so a resumed run keeps the early-stopping state and a run that stopped
does not train further when resumed.

>>> rows = [{"val_loss": l, "val_top1": 0.5, "val_macro_f1": 0.5} for l in (1.0, 0.9, 0.95, 0.97)]
>>> epochs_without_improvement(rows, "val_loss", 0.0), should_stop(rows, "val_loss", 2, 0.0)
(2, True)
>>> selection_score(rows[1], "val_loss") > selection_score(rows[0], "val_loss")
True
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

#: monitored metric → whether higher is better
MONITOR_MODES = {"val_top1": True, "val_macro_f1": True, "val_loss": False}
NO_SCORE = (float("-inf"), float("-inf"))


def _signed(row: Mapping[str, Any], monitor: str) -> float:
    value = float(row[monitor])
    return value if MONITOR_MODES[monitor] else -value


def selection_score(row: Mapping[str, Any], monitor: str) -> tuple[float, float]:
    """Higher is better: the monitored value (negated for a loss), then the tie-breaker."""
    tie = float(row["val_top1"]) if monitor == "val_loss" else -float(row["val_loss"])
    return _signed(row, monitor), tie


def epochs_without_improvement(history: Sequence[Mapping[str, Any]], monitor: str, min_delta: float) -> int:
    """Epochs since the monitored value last improved on its best by more than ``min_delta``."""
    best, wait = None, 0
    for row in history:
        value = _signed(row, monitor)
        if best is None or value > best + min_delta:
            best, wait = value, 0
        else:
            wait += 1
    return wait


def should_stop(history: Sequence[Mapping[str, Any]], monitor: str, patience: int, min_delta: float) -> bool:
    """Whether early stopping ends the run after ``history`` (never with ``patience`` 0)."""
    return patience > 0 and bool(history) and epochs_without_improvement(history, monitor, min_delta) >= patience
