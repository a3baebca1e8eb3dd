"""The process table, read from /proc: who is alive, under which parent, process group and session.

Standard library only: the process guard imports it, and it must start fast and small.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    state: str  # "R", "S", "Z" (zombie: exited, not yet reaped), ...
    ppid: int
    pgrp: int
    session: int
    cpu_ticks: int  # user + system time, in clock ticks


def read(pid: int) -> Proc | None:
    """One process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The fields after the ")" that closes the command name: state ppid pgrp session ... utime stime
    fields = stat[stat.rfind(")") + 2 :].split()
    return Proc(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[11]) + int(fields[12]))


def processes() -> Iterator[Proc]:
    """Every process, zombies included."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = read(int(entry))
            if proc is not None:
                yield proc


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    proc = read(pid)
    return proc is not None and proc.state != "Z"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def session_members(sid: int) -> list[int]:
    """Live processes whose session id is ``sid``."""
    return [p.pid for p in processes() if p.session == sid and p.state != "Z"]


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    return [p.pid for p in processes() if p.pgrp == pgid and p.state != "Z"]


def descendants(roots: set[int]) -> set[int]:
    """``roots`` and every process below them, whatever session they moved to (engines use their own)."""
    children: dict[int, list[int]] = {}
    for p in processes():
        children.setdefault(p.ppid, []).append(p.pid)
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return seen
