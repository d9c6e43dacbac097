"""``finetune train --num-processes N``: start the training processes through PyTorch's elastic agent.

The agent is ``torch.distributed.run`` (the engine behind ``torchrun``), called through its Python
API (``elastic_launch``): it starts the workers, forms their process group through a c10d
rendezvous, watches them, and when one dies stops the others and -- with ``--max-restarts R`` --
starts the whole group again, up to R times. A restarted worker sees ``TORCHELASTIC_RESTART_COUNT
> 0`` and resumes from the run's latest checkpoint by itself (:mod:`finetune.train.outputs`), so
the finished run equals an uninterrupted one. ``torchrun --nproc-per-node N --max-restarts R -m
finetune.cli train …`` is the same thing.

Several machines: the same command on each, ``--num-machines M --machine-rank R --rdzv-endpoint
HOST:PORT`` (machine 0 hosts the rendezvous store at HOST:PORT; ``--main-process-ip`` and
``--main-process-port`` are accepted as the two halves of the endpoint). Give every machine the
same ``--rdzv-id`` (the default is ``$SLURM_JOB_ID`` under SLURM, else derived from the endpoint).

Signals: SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 sent to this process go to every worker,
which finishes its update, writes a checkpoint and exits with :data:`EXIT_PREEMPTED`
(:mod:`finetune.train.preemption`); the launcher returns the same code. The workers' ``stdout``
and ``stderr`` (other than local rank 0's, which stays on the terminal) go to files under a log
folder named in the failure message.

On CPU the processes join one gloo group because ``fit`` builds its ``Accelerator`` with
``cpu=True`` when there is no CUDA (accelerate 1.15 does not start several CPU processes itself).

>>> from finetune.train.launch import launch_config
>>> config = launch_config(nproc=2, max_restarts=3)
>>> config.nproc_per_node, config.max_restarts, config.rdzv_backend
(2, 3, 'c10d')
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

from finetune.errors import FinetuneError

#: Exit code of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (sysexits EX_TEMPFAIL:
#: "a temporary failure; retry"); a SLURM job requeued on pre-emption ends with it.
EXIT_PREEMPTED = 75
#: Seconds the agent gives workers to checkpoint after a signal before it kills them.
SHUTDOWN_GRACE_S = 50
HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_RDZV_PORT = 29400


def free_port() -> int:
    """An unused TCP port on this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def restart_count() -> int:
    """How many times the elastic agent has restarted this worker's group (0: first attempt, or no agent).

    >>> restart_count() >= 0
    True
    """
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def check_process_counts(num_processes: int, num_machines: int, machine_rank: int, max_restarts: int = 0) -> None:
    """Refuse impossible ``--num-processes/--num-machines/--machine-rank/--max-restarts`` with one line.

    >>> check_process_counts(2, 2, 1)
    >>> check_process_counts(2, 2, 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    finetune.errors.FinetuneError: --num-processes 2 --num-machines 2 --machine-rank 2: need at least 1 process ...
    """
    if num_processes < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise FinetuneError(f"--num-processes {num_processes} --num-machines {num_machines} --machine-rank "
                            f"{machine_rank}: need at least 1 process and 1 machine, and 0 <= rank < machines")
    if max_restarts < 0:
        raise FinetuneError(f"--max-restarts {max_restarts}: give 0 (no restart) or more")


def rendezvous_endpoint(num_machines: int, endpoint: str | None, ip: str | None, port: int | None) -> str:
    """``HOST:PORT`` of the c10d rendezvous; ``localhost:0`` (any free port) on one machine."""
    if endpoint:
        host, _, text = endpoint.rpartition(":")
        if not host or not text.isdigit():
            raise FinetuneError(f"--rdzv-endpoint `{endpoint}`: give HOST:PORT, e.g. node001:{DEFAULT_RDZV_PORT}")
        return endpoint
    if num_machines == 1 and ip is None and port is None:
        return "localhost:0"
    if ip is None or port is None:
        raise FinetuneError("with --num-machines > 1 pass --rdzv-endpoint HOST:PORT (machine 0's address; the "
                            "same on every machine), or --main-process-ip and --main-process-port")
    return f"{ip}:{port}"


#: The command-line flags that configure the launch (the workers get the rest).
LAUNCH_FLAGS = ("--num-processes", "--num-machines", "--machine-rank", "--max-restarts", "--rdzv-endpoint",
                "--rdzv-id", "--main-process-ip", "--main-process-port")


def add_launch_arguments(parser) -> None:
    """The launch flags of ``finetune train`` / ``distill`` (an ``argparse`` parser), mapped by :func:`launch`."""
    group = parser.add_argument_group("several processes and machines (torch's elastic agent; gloo on CPU, "
                                      "NCCL on GPUs; see finetune/train/launch.py)")
    group.add_argument("--num-processes", type=int, default=1, metavar="N", help="training processes on this machine")
    group.add_argument("--max-restarts", type=int, default=0, metavar="R",
                       help="restart the whole group up to R times when a process dies; it resumes from the "
                            "latest checkpoint by itself")
    group.add_argument("--num-machines", type=int, default=1, metavar="M", help="machines taking part")
    group.add_argument("--machine-rank", type=int, default=0, metavar="R",
                       help="this machine's rank, 0..M-1 (machine 0 hosts the rendezvous)")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous on machine 0 (same everywhere)")
    group.add_argument("--rdzv-id", metavar="ID", help="job id, the same on every machine (default: $SLURM_JOB_ID)")
    group.add_argument("--main-process-ip", help="machine 0's address (with --main-process-port: the endpoint)")
    group.add_argument("--main-process-port", type=int, help="rendezvous port (same on every machine)")


def worker_argv(argv: Sequence[str], run_dir: str | os.PathLike) -> list[str]:
    """The workers' command line: ``argv`` without the launch flags, with ``--out`` fixed (so every
    worker and every restart writes to the same run directory).

    >>> worker_argv(["train", "--data", "d", "--num-processes", "2", "--max-restarts=1"], "runs/x")
    ['train', '--data', 'd', '--out', 'runs/x']
    """
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item.split("=", 1)[0] in LAUNCH_FLAGS:
            skip = "=" not in item
            continue
        kept.append(item)
    if not any(item == "--out" or item.startswith("--out=") for item in kept):
        kept += ["--out", str(run_dir)]
    return kept


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another worker died (gloo/NCCL lose the connection),
    which the agent handles by restarting or stopping the group.

    >>> lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"))
    True
    """
    markers = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted")
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in markers)


def launch_config(nproc: int, num_machines: int = 1, machine_rank: int = 0, max_restarts: int = 0,
                  endpoint: str | None = None, ip: str | None = None, port: int | None = None,
                  run_id: str | None = None, log_dir: str | None = None):
    """The agent's :class:`~torch.distributed.launcher.api.LaunchConfig` for these flags."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    check_process_counts(nproc, num_machines, machine_rank, max_restarts)
    rdzv = rendezvous_endpoint(num_machines, endpoint, ip, port)
    if run_id is None:  # every machine must pass the same id; one machine: unique per job
        run_id = (os.environ.get("SLURM_JOB_ID") or "finetune-" + hashlib.sha1(rdzv.encode()).hexdigest()[:10]
                  if num_machines > 1 else uuid.uuid4().hex[:12])
    # local rank 0 keeps the terminal (only the main process prints); the others write files
    logs = DefaultLogsSpecs(log_dir=log_dir or tempfile.mkdtemp(prefix="finetune-workers-"),
                            redirects={rank: Std.ALL for rank in range(1, nproc)})
    return LaunchConfig(min_nodes=num_machines, max_nodes=num_machines, nproc_per_node=nproc, run_id=run_id,
                        rdzv_backend="c10d", rdzv_endpoint=rdzv,
                        # machine 0 hosts the store (on one host, two simulated machines cannot both bind it)
                        rdzv_configs={"is_host": machine_rank == 0} if num_machines > 1 else {},
                        max_restarts=max_restarts, monitor_interval=0.1, start_method="spawn", logs_specs=logs,
                        shutdown_timeout=SHUTDOWN_GRACE_S)


def launch(argv: Sequence[str], nproc: int, num_machines: int = 1, machine_rank: int = 0, max_restarts: int = 0,
           endpoint: str | None = None, ip: str | None = None, port: int | None = None,
           run_id: str | None = None) -> int:
    """Run ``finetune <argv>`` in ``nproc`` worker processes here under the elastic agent; the group's exit code."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = launch_config(nproc, num_machines, machine_rank, max_restarts, endpoint, ip, port, run_id)
    # N processes share the cores (torchrun itself would set 1 thread each)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = HANDLED_SIGNALS
    # Workers must not share the rendezvous store: with it, a restarted gloo/NCCL group can read the
    # previous attempt's addresses and hang or refuse to connect (pytorch/pytorch#135712; seen here with
    # torch 2.14 and gloo). torchrun users set the same variable (recipes/slurm/finetune.sbatch does).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    _quiet_agent_logs()
    try:
        elastic_launch(config, sys.executable)("-m", "finetune.cli", *argv)
    except ChildFailedError as error:
        return _report_failure(error, config.logs_specs.root_log_dir, max_restarts)
    except SignalException as error:
        print(f"finetune: stopped by {error.sigval.name}: every worker was asked to checkpoint and stop; continue "
              "with --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _quiet_agent_logs() -> None:
    """The agent logs every rendezvous step and failure; users see one line per restart and our one-line
    summary of a failure instead."""
    import logging

    class RestartNotice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "will restart worker group" in record.getMessage() and "attempts left" in record.getMessage():
                left = record.args[2] if isinstance(record.args, tuple) and len(record.args) > 2 else "?"
                print(f"finetune: a process failed; restarting the group ({left} restart(s) left before this "
                      "one); it resumes from the latest checkpoint", file=sys.stderr, flush=True)

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
    agent.setLevel(logging.INFO)
    agent.propagate = False  # its records reach only the notice, not torch's console handler
    if not any(type(h).__name__ == "RestartNotice" for h in agent.handlers):
        agent.handlers = [RestartNotice()]


def _report_failure(error, log_dir: str, max_restarts: int) -> int:
    """One line for a failed group: which process, why (its last stderr line), where its log is."""
    rank, failure = error.get_first_failure()  # the earliest failure is the root cause
    codes = {f.exitcode for f in error.failures.values()}
    if codes == {EXIT_PREEMPTED}:  # every worker checkpointed after a signal sent to it directly
        print("finetune: stopped by a signal after writing a checkpoint; continue with --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    if failure.exitcode < 0:
        reason = f"killed by {failure.signal_name()}"
    else:
        reason = _last_line(log_dir, failure.local_rank) or f"exit code {failure.exitcode}"
    restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
    print(f"finetune: error: process {rank} failed ({reason}){restarts}; the run stopped, its last checkpoint "
          f"is resumable with --resume; worker logs: {log_dir}", file=sys.stderr)
    return 2 if failure.exitcode == 2 else 1


def _last_line(log_dir: str, local_rank: int) -> str:
    """The last line a worker wrote to stderr in its newest attempt (local rank 0's went to the terminal)."""
    logs = sorted(Path(log_dir).glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return ""
    lines = logs[-1].read_text(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""
