"""One run at a time per output: an advisory ``flock`` on ``.<output>.lock``.

The kernel drops the lock when its process dies, however it dies, so a lock left by a
killed run never blocks the next one. The file itself stays (removing it would race with
a run opening it); it records who holds or last held the lock, for the error message and
``batchrun status``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchrun.core.job.side_files import LOCK, side_file


class OutputLocked(Exception):
    """Another run holds the output's lock."""


def lock_path(output: Path) -> Path:
    return side_file(output, LOCK)


def holder(output: Path) -> dict | None:
    """Who holds (or last held) the lock, as written by that run."""
    try:
        return json.loads(lock_path(output).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_locked(output: Path) -> bool:
    path = lock_path(output)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def locked_message(output: Path) -> str:
    who = holder(output) or {}
    return (
        f"{output} is being written by another batchrun run (pid {who.get('pid', '?')} on "
        f"{who.get('host', '?')}, started {who.get('started', '?')}); wait for it to finish "
        "or stop it, then run again"
    )


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    path = lock_path(output)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(locked_message(output)) from None
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(me).encode())
        yield
    finally:
        os.close(fd)  # releases the lock
