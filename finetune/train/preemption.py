"""Pre-emption: SIGTERM or SIGUSR1 (what SLURM, Kubernetes and spot instances send before a kill)
make every process finish its current update, write a checkpoint and stop.

The signal only sets a flag; after every optimizer update the processes agree on it with one
small all-reduce (a signal reaches the processes at different moments, and a checkpoint is
written by all of them together), so all stop after the same update. The update in flight is
finished, the checkpoint written (:meth:`~finetune.train.session.TrainingSession.save_checkpoint`)
and :class:`Preempted` raised; ``finetune train`` exits with
:data:`~finetune.train.launch.EXIT_PREEMPTED` (75) and ``--resume`` continues bit-identically.
A signal during validation or a checkpoint save is acted on at the next update or epoch end.

>>> import os, signal
>>> with StopSignals() as stop:
...     os.kill(os.getpid(), signal.SIGUSR1)
...     stop.received
'SIGUSR1'
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing ``checkpoint`` (exit code 75 on the command line)."""

    def __init__(self, signal_name: str, checkpoint: Path, updates: int) -> None:
        super().__init__(f"stopped by {signal_name} after update {updates}; checkpoint {checkpoint}")
        self.signal_name, self.checkpoint, self.updates = signal_name, checkpoint, updates


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set :attr:`received` instead of ending the process."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, accelerator) -> str | None:
        """The signal name if any process received one (a collective: every process calls it at the same point)."""
        if accelerator.num_processes == 1:
            return self.received
        import torch  # here: the command line imports this module for Preempted, and must start fast
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() == 0:
            return None
        return self.received or "a signal to another process"
