"""A job's log and its console: ``--log FILE`` sends everything a command writes (Python's and
the libraries' C-level output alike) to FILE, and :func:`console` still reaches the terminal
Snakemake shows (e.g. ``resumed <run> from step N of M``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_console_fd: int | None = None


def log_to(path: str | Path) -> None:
    """Redirect file descriptors 1 and 2 (and ``sys.stdout``/``sys.stderr``) to ``path``."""
    global _console_fd
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _console_fd = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def console(message: str) -> None:
    """``message`` on the terminal (also when the output goes to a log) and in the log."""
    print(message, flush=True)
    if _console_fd is not None:
        os.write(_console_fd, (message + "\n").encode())
