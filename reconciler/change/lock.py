"""One apply at a time per Serve instance: an advisory file lock that names its holder.

The lock is `flock` on a file under the user's cache dir (one file per dashboard URL, since
two applies only conflict when they talk to the same Serve). The kernel drops it when the
holder exits, even on a crash, so a stale lock cannot block anyone. The holder writes who it is
(pid, user@host, since) into the file so a second apply can say whom it waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler import state_files
from reconciler.errors import FleetError


class LockHeldError(FleetError):
    """Another apply holds the lock and did not let go in time."""


@dataclass(frozen=True)
class Holder:
    pid: int
    user: str
    host: str
    since: float
    command: str = "apply"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} ({self.user}@{self.host}, fleetctl {self.command}) since {when}"


def read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text() or "null")
        return Holder(**data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def apply_lock(dashboard_url: str, *, wait_s: float = 10.0, command: str = "apply",
               on_wait: Callable[[str], None] | None = None) -> Iterator[Holder]:
    """Hold the apply lock for this Serve; wait up to wait_s, then raise LockHeldError."""
    path = state_files.apply_lock(dashboard_url)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, wait_s, on_wait)
        me = Holder(os.getpid(), getpass.getuser(), socket.gethostname(), time.time(), command)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me.__dict__).encode(), 0)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, wait_s: float, on_wait: Callable[[str], None] | None) -> None:
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = read_holder(path)
            who = holder.describe() if holder else "another fleetctl process"
            if time.monotonic() >= deadline:
                raise LockHeldError(f"another apply is running against this Serve: {who}; "
                                    "try again when it has finished") from None
            if on_wait and not told:
                on_wait(f"waiting up to {wait_s:.0f} s for another apply to finish: {who}")
                told = True
            time.sleep(0.2)
