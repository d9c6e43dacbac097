"""``finetune train --num-processes N``: start N training processes that form one process group.

Why not ``accelerate launch``: with accelerate 1.15, ``accelerate launch --cpu --num_processes 2``
starts a single process (its CPU path needs mpirun), and ``--multi_gpu`` on a machine without
CUDA starts processes that each train alone. This launcher sets the environment variables of
PyTorch's ``env://`` rendezvous (what ``torchrun`` sets) for each process; ``fit`` builds its
``Accelerator`` with ``cpu=True`` when there is no CUDA, so the processes join one gloo group,
and every run directory records the world size it trained with (``model.json``). ``torchrun
--nproc_per_node N -m finetune.cli train …`` works the same way.

Several machines: run the same command on each with ``--num-machines M --machine-rank R
--main-process-ip IP`` (one machine can play two by using two ranks and 127.0.0.1).

If any process fails, the others are stopped and the launcher exits with the failing code; the
last complete checkpoint stays resumable (``--resume``).

>>> from finetune.train.launch import worker_env
>>> env = worker_env(local_rank=1, nproc=2, machine_rank=1, num_machines=2, ip="127.0.0.1", port=29500)
>>> env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]
('3', '4', '1')
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from finetune.errors import FinetuneError

STOP_GRACE_S = 10.0


def free_port() -> int:
    """An unused TCP port on this machine, for the rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(local_rank: int, nproc: int, machine_rank: int, num_machines: int, ip: str, port: int) -> dict[str, str]:
    """The ``env://`` rendezvous variables of one process (as torchrun sets them)."""
    return {"RANK": str(machine_rank * nproc + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(nproc * num_machines), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": str(machine_rank), "NODE_RANK": str(machine_rank),
            "MASTER_ADDR": ip, "MASTER_PORT": str(port)}


def check_process_counts(num_processes: int, num_machines: int, machine_rank: int) -> None:
    """Refuse impossible ``--num-processes/--num-machines/--machine-rank`` with one line.

    >>> check_process_counts(2, 2, 1)
    >>> check_process_counts(2, 2, 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    finetune.errors.FinetuneError: --num-processes 2 --num-machines 2 --machine-rank 2: need at least 1 process ...
    """
    if num_processes < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise FinetuneError(f"--num-processes {num_processes} --num-machines {num_machines} --machine-rank "
                            f"{machine_rank}: need at least 1 process and 1 machine, and 0 <= rank < machines")


def launch(argv: Sequence[str], nproc: int, num_machines: int = 1, machine_rank: int = 0,
           ip: str = "127.0.0.1", port: int | None = None) -> int:
    """Run ``finetune <argv>`` in ``nproc`` processes here; returns the exit code of the group."""
    check_process_counts(nproc, num_machines, machine_rank)
    if num_machines > 1 and port is None:
        raise FinetuneError("--main-process-port is required with --num-machines > 1 (the same on every machine)")
    port = port or free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    for local_rank in range(nproc):
        env = {**os.environ, **worker_env(local_rank, nproc, machine_rank, num_machines, ip, port)}
        env.setdefault("OMP_NUM_THREADS", str(threads))  # N processes share the cores
        main = local_rank == 0 and machine_rank == 0
        # rank 0 talks to the terminal; the others' stderr goes to a file (a pipe could fill and block them)
        errors = None if main else tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", *argv], env=env,
                                stdout=None if main else subprocess.DEVNULL, stderr=errors, text=True)
        proc.errors_file = errors  # type: ignore[attr-defined]
        procs.append(proc)
    return _supervise(procs)


def _read_stderr(proc: subprocess.Popen) -> str:
    handle = getattr(proc, "errors_file", None)
    if handle is None:
        return ""
    handle.seek(0)
    return handle.read()


def _supervise(procs: list[subprocess.Popen]) -> int:
    """Wait for all; when one fails, stop the rest (they would wait for it forever in a collective)."""
    failed = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = -1
    if failed is None:
        return 0
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if failed == -1:
        return 130
    code = procs[failed].returncode
    if failed != 0:  # rank 0's own errors reached the terminal; say what happened to the other rank
        detail = _read_stderr(procs[failed]).strip().splitlines()
        reason = detail[-1] if detail else f"exit code {code}"
        print(f"finetune: error: process {failed} failed ({reason}); the run stopped, its last checkpoint "
              "is resumable with --resume", file=sys.stderr)
        return 2 if code == 2 else 1
    return code
