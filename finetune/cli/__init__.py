"""The ``finetune`` command line. Each sub-command lives with its relatives in one module
(:mod:`~finetune.cli.training`, :mod:`~finetune.cli.data`, :mod:`~finetune.cli.runs`,
:mod:`~finetune.cli.models`, :mod:`~finetune.cli.deploy`), which registers its parsers; this module builds
the parser and turns errors into exit codes.

Every user mistake ends in one line on stderr (``finetune: error: …``) and exit code 2.

>>> from finetune.cli import main
>>> main(["models", "--offline-only"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from finetune.cli import data, deploy, models, runs, training
from finetune.errors import FinetuneError, one_line
from finetune.train.launch import EXIT_PREEMPTED, lost_peer
from finetune.train.preemption import Preempted
from finetune.version import __version__

__all__ = ["build_parser", "main"]

#: Modules whose ``register(sub)`` adds their sub-commands, in the order ``finetune --help`` lists them.
COMMAND_MODULES = (training, data, runs, models, deploy)


class _OneLineParser(argparse.ArgumentParser):
    """argparse answers mistakes with usage + error on two lines; we keep the project's one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"finetune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``finetune`` parser with every sub-command.

    >>> build_parser().parse_args(["report", "runs/photos"]).run
    'runs/photos'
    """
    parser = _OneLineParser(prog="finetune", description="Fine-tune pretrained MobileNet/EfficientNet "
                                     "classifiers on a folder of images.")
    parser.add_argument("--version", action="version", version=f"finetune-vision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finetune`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except FinetuneError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `finetune predict … | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "TORCHELASTIC_RUN_ID" not in os.environ or not lost_peer(exc):
            raise
        # another worker died; the agent restarts or stops the group and says which one
        print(f"finetune: process {os.environ.get('RANK')} stopped: {one_line(exc, 120)}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"finetune: {exc}; continue with --resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
