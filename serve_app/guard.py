"""Process guard: runs one command and takes its whole process group down with its parent.

Usage: ``python -m serve_app.guard [--grace-s N] -- <argv...>``

The engine replica starts this guard in a new session, so the guard leads a process group that
holds vLLM's API server and everything vLLM spawns (its engine-core process). The guard ends
that whole group when:

- its parent (the Serve replica) is gone, even after a SIGKILL: PR_SET_PDEATHSIG wakes it at
  once and a poll of os.getppid() every POLL_S seconds backs that up;
- it receives SIGTERM/SIGINT (the replica stopping the engine on purpose);
- the command itself exits (left-over grandchildren are killed).

Ray SIGKILLs a worker's direct children when the worker exits (kill_child_processes_on_worker_exit),
and a SIGKILLed process can clean nothing up. So the process the replica starts is only an
*anchor*: it forks the real guard and waits. If the anchor is killed, the guard sees its parent
vanish and ends the group; if the replica dies, the anchor tells the guard and leaves.

It exits with the command's exit code (128+N when a signal N killed it), or 143 when told to stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from serve_app.proctable import group_members

POLL_S = 0.5
DEFAULT_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1
_PARENT_DEATH_SIGNAL = signal.SIGUSR1


class _Flags:
    """What the signal handlers saw; read by the main loop."""

    stop = False


def _on_stop(_signum: int, _frame: FrameType | None) -> None:
    _Flags.stop = True


def _on_parent_death(_signum: int, _frame: FrameType | None) -> None:
    # Nothing to do here: PDEATHSIG fires when the parent's *thread* that forked us exits,
    # which may happen while the parent lives on. The main loop checks getppid() instead.
    return None


def _set_parent_death_signal() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(_PARENT_DEATH_SIGNAL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the getppid() poll alone covers it


def _kill_rest_of_group(grace_s: float) -> None:
    """SIGTERM, then SIGKILL, every process of our group except ourselves and the anchor."""
    spare, pgid = {os.getpid(), os.getppid()}, os.getpgrp()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        others = [pid for pid in group_members(pgid) if pid not in spare]
        if not others:
            return
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(p not in spare for p in group_members(pgid)):
            time.sleep(0.1)


def _stop_child(child: subprocess.Popen[bytes], grace_s: float) -> None:
    # vLLM's API server shuts its engine core down itself on SIGTERM; give it the grace period.
    if child.poll() is None:
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(grace_s)
    _kill_rest_of_group(min(grace_s, 2.0))
    if child.poll() is None:
        child.kill()
        child.wait()


def _parse(argv: list[str]) -> tuple[float, list[str]]:
    grace_s = DEFAULT_GRACE_S
    if argv[:1] == ["--grace-s"]:
        grace_s, argv = float(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m serve_app.guard [--grace-s N] -- <command...>")
    return grace_s, argv


def _watch_parent(parent: int) -> bool:
    """Arrange to notice ``parent`` dying; False if it is already gone."""
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(_PARENT_DEATH_SIGNAL, _on_parent_death)
    _set_parent_death_signal()
    return os.getppid() == parent  # it may have died before prctl took effect


def _anchor(guard: int, parent: int) -> int:
    """The replica's direct child: relay a stop to the guard, leave when the replica is gone."""
    if not _watch_parent(parent):
        os.kill(guard, signal.SIGTERM)
        return 143
    told = False
    while True:
        pid, status = os.waitpid(guard, os.WNOHANG)
        if pid:
            # The guard may have been SIGKILLed itself: take down whatever it left in our group.
            _kill_rest_of_group(2.0)
            return os.waitstatus_to_exitcode(status) % 256
        if (_Flags.stop or os.getppid() != parent) and not told:
            os.kill(guard, signal.SIGTERM)
            told = True
            if os.getppid() != parent:
                return 143  # nobody is left to read our exit code; the guard cleans up alone
        time.sleep(POLL_S)


def run(argv: list[str]) -> int:
    """Run the command under guard; return the exit code to exit with."""
    grace_s, command = _parse(argv)
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # never share a group with the parent: we kill ours wholesale
    anchor = os.getpid()
    guard = os.fork()
    if guard:
        return _anchor(guard, os.getppid())
    if not _watch_parent(anchor):
        return 143
    return _guard(command, anchor, grace_s)


def _guard(command: list[str], parent: int, grace_s: float) -> int:
    child = subprocess.Popen(command)
    while True:
        code = child.poll()
        if code is not None:
            print(f"[guard] command exited with code {code}", file=sys.stderr, flush=True)
            _kill_rest_of_group(2.0)
            return 128 - code if code < 0 else code  # killed by signal N: the shell's 128+N
        if _Flags.stop or os.getppid() != parent:
            reason = "stop requested" if _Flags.stop else "parent is gone"
            print(f"[guard] {reason}: stopping process group", file=sys.stderr, flush=True)
            _stop_child(child, grace_s)
            return 143
        time.sleep(POLL_S)


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
