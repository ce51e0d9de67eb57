"""The out_dir lock: one process works in a study's out_dir at a time, from any checkout.

Snakemake's own lock lives in the checkout's ``.snakemake/``, so two checkouts (or two
working directories) running the same ``out_dir`` do not see each other, and the second
one's refused job makes Snakemake delete the first one's finished results. This lock lives
in the out_dir itself: ``fcntl.flock`` on ``<out_dir>/.lock``, whose content names the
holder (pid, host, command, working directory, start time).

* A real ``snakemake`` run takes it in its ``onstart`` hook (after planning, before its
  first job; a dry run never does) and holds it until the process ends: the kernel releases
  an ``flock`` when its holder exits, killed or not, so a lock is never left stale.
* The jobs of that snakemake are its child processes (or, on a cluster, processes that
  Snakemake passes its environment to: ``envvars`` in ``workflow/rules/common.smk``): the
  holder's pid reaches them in :data:`HOLDER_ENV`, and a command that finds the lock held
  by that pid goes on without taking it (it works for the holder).
* Any other process that writes into the out_dir (``python -m harness train`` by hand, a
  second snakemake) takes the lock for as long as it works, or refuses with
  :class:`OutDirLocked`, naming the lock file and its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: the environment variable a lock holder sets for its child processes (its jobs)
HOLDER_ENV = "HARNESS_OUT_DIR_LOCK_HOLDER"
LOCK_NAME = ".lock"

# out_dir (resolved) -> open file descriptor holding the lock in this process
_held: dict[str, int] = {}


class OutDirLocked(RuntimeError):
    """Another process works in this out_dir; the message names the lock and its holder."""


def lock_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / LOCK_NAME


def read_holder(out_dir: str | os.PathLike) -> dict[str, Any]:
    """What the lock file says about its holder (``{}`` when it says nothing readable)."""
    try:
        value = json.loads(lock_path(out_dir).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (it did not record itself)"
    where = f" on {holder['host']}" if holder.get("host") else ""
    what = f" ({holder['command']}" + (f", in {holder['cwd']}" if holder.get("cwd") else "") + ")"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"process {holder['pid']}{where}{what if holder.get('command') else ''}{since}"


def _works_for_holder(out_dir: Path) -> bool:
    """True when this process is a job of the process holding the lock (the holder's pid is
    in :data:`HOLDER_ENV` and the lock file names the same pid)."""
    mine = os.environ.get(HOLDER_ENV)
    return bool(mine) and str(read_holder(out_dir).get("pid")) == mine


def acquire(out_dir: str | os.PathLike, command: str) -> bool:
    """Take the out_dir's lock for this process (creating the out_dir) and keep it until
    :func:`release` or the process's end. Returns False, taking nothing, when this process
    already holds it or is a job of the process that does. Raises :class:`OutDirLocked`,
    naming the lock file and the holder, when another process holds it."""
    folder = Path(out_dir)
    key = str(folder.resolve())
    if key in _held:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if _works_for_holder(folder):
            return False
        raise OutDirLocked(
            f"out_dir {str(folder)!r} is locked ({path}) by {_describe(read_holder(folder))}: "
            "another process is working in this study, maybe from another checkout. Wait for it "
            "to finish (or stop it) and run again; nothing was started or deleted"
        ) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "cwd": os.getcwd(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    _held[key] = fd
    return True


def release(out_dir: str | os.PathLike) -> None:
    """Release the lock this process took on ``out_dir`` (nothing if it holds none). The lock
    file stays: removing it would let a waiting process lock a file another has just opened."""
    fd = _held.pop(str(Path(out_dir).resolve()), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def keep_across_exec(out_dir: str | os.PathLike) -> None:
    """Before this process replaces itself (``os.execv``: a train job relaunched under
    torchrun), keep the lock it holds on ``out_dir`` held by the new program (same pid) and
    let that program's children (the ranks) work for it. Nothing when it holds no lock."""
    fd = _held.get(str(Path(out_dir).resolve()))
    if fd is not None:
        os.set_inheritable(fd, True)
        os.environ[HOLDER_ENV] = str(os.getpid())


def hold_out_dir(out_dir: str | os.PathLike, command: str) -> None:
    """The ``onstart`` hook of a real snakemake run: take the lock for the rest of this
    process and tell its jobs (through :data:`HOLDER_ENV`) that they work for its holder.
    Raises :class:`OutDirLocked` before any job starts when another process holds it."""
    acquire(out_dir, " ".join([command, *sys.argv[1:]])[:500])
    os.environ[HOLDER_ENV] = str(os.getpid())


@contextlib.contextmanager
def out_dir_lock(out_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """For a command that writes into ``out_dir``: hold the lock while it works (released
    when the block ends), or go on without it when this process is a job of the lock's
    holder; raises :class:`OutDirLocked` when another process holds it."""
    taken = acquire(out_dir, command)
    try:
        yield
    finally:
        if taken:
            release(out_dir)
