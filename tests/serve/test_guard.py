"""The process guard: no process it started outlives its parent, however the parent dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.fixtures.procs import alive, wait_session_gone

SLEEPER = "import time; time.sleep(600)"
# The guarded command: a process that has a child of its own (like vLLM and its engine core).
WITH_GRANDCHILD = (
    f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep(600)"
)
# A parent that starts the guard the way the engine replica does, prints its pid, then waits.
PARENT = f"""
import subprocess, sys, time
guard = subprocess.Popen([sys.executable, "-m", "serve_app.guard", "--grace-s", "2", "--",
                          sys.executable, "-c", {WITH_GRANDCHILD!r}], start_new_session=True)
print(guard.pid, flush=True)
time.sleep(600)
"""


def _session_size(sid: int) -> int:
    from reconciler.live.cluster import session_processes

    return len(session_processes(sid))


def _start_parent() -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    guard_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while _session_size(guard_pid) < 4 and time.monotonic() < deadline:  # anchor, guard, child, grandchild
        time.sleep(0.1)
    assert _session_size(guard_pid) == 4
    return parent, guard_pid


def test_sigkilled_parent_leaves_no_process_behind() -> None:
    parent, guard_pid = _start_parent()
    parent.kill()
    parent.wait()
    assert wait_session_gone(guard_pid, timeout_s=20) == []


def test_sigkilled_guard_leaves_no_process_behind() -> None:
    # Ray SIGKILLs a worker's direct children when the worker exits: that is the guard's pid.
    parent, guard_pid = _start_parent()
    try:
        subprocess.run(["kill", "-KILL", str(guard_pid)], check=True)
        assert wait_session_gone(guard_pid, timeout_s=20) == []
    finally:
        parent.kill()
        parent.wait()


def test_sigterm_stops_the_whole_group() -> None:
    parent, guard_pid = _start_parent()
    try:
        subprocess.run(["kill", "-TERM", str(guard_pid)], check=True)
        assert wait_session_gone(guard_pid, timeout_s=20) == []
        assert alive(parent.pid)  # the guard never signals upward
    finally:
        parent.kill()
        parent.wait()


def test_exit_code_is_the_command_s_and_leftovers_are_killed() -> None:
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); sys.exit(3)"
    guard = subprocess.Popen(
        [sys.executable, "-m", "serve_app.guard", "--", sys.executable, "-c", code], start_new_session=True
    )
    assert guard.wait(timeout=30) == 3
    assert wait_session_gone(guard.pid, timeout_s=20) == []


def test_sigterm_exit_code() -> None:
    guard = subprocess.Popen(
        [sys.executable, "-m", "serve_app.guard", "--", sys.executable, "-c", SLEEPER], start_new_session=True
    )
    while _session_size(guard.pid) < 3:  # its handlers are set before it starts the command
        time.sleep(0.1)
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(timeout=30) == 143
