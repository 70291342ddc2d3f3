"""What every command shares: the ``--quiet``/``--verbose`` flags and the map from errors to exit
codes (0 success, 2 bad input naming the key, path or URL, 1 anything else)."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

from pipeline import logs
from pipeline.config import EXIT_BAD_INPUT, ConfigError
from pipeline.data.storage import StorageError

log = logging.getLogger("pipeline")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` (warnings and errors only) and ``-v/--verbose`` (debug lines too)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true", help="debug lines too")


def run_config_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The arguments every training command takes: ``--config``, ``--dry-run``, overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, check, exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.4")
    add_verbosity(parser)
    return parser


def configure_logging(args: argparse.Namespace) -> None:
    """Console logging at the level the verbosity flags chose."""
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    logs.configure(logs.QUIET if quiet else logs.VERBOSE if verbose else logs.NORMAL)


def bad_input(message: str) -> int:
    """Print ``error: message`` to stderr; return the bad-input exit code."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run(main: Callable[[], int], prefix: str = "") -> int:
    """Call ``main``; a ConfigError or StorageError becomes exit 2 with its message."""
    try:
        return main()
    except (ConfigError, StorageError) as exc:
        return bad_input(f"{prefix}{exc}")


def main(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    command: Callable[[argparse.Namespace], int],
) -> int:
    """A command's whole entry point: parse, set up logging, run with errors mapped to codes."""
    args = parse_args(argv)
    configure_logging(args)
    return run(lambda: command(args))


def finish(code: int | None) -> NoReturn:
    """End the process with ``code`` as ``sys.exit`` would, without the interpreter's teardown.

    Threads are joined and exit handlers run (MLflow queues, Ray's shutdown, logging) as at any
    exit; what is skipped is freeing every object of torch, Ray and MLflow one by one, which costs
    1-2.5 s of a core at the end of each command (``python -c "import pipeline.pretrain"``: 5.1 s,
    3.9 s with this).
    """
    threading._shutdown()  # what a normal exit does first: executors' hooks, non-daemon joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)
