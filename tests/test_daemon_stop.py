"""`fleetctl daemon` stops when asked, whatever it is doing. No Ray: the daemon is held in a slow read.

The daemon runs as a user starts it (a process of its own); reading its files is slowed to ten
minutes by a wrapper, as a file on a stalled network mount would be: first the read of its settings
at start, then the read of a pass (its status API already up). SIGTERM must end it long before that
read would, with exit code 0 and its status API gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from reconciler.live import cluster

SLOW_READ = """
import os, sys, time
from reconciler.fleetfiles import loader, validate
real, calls = loader.read_fleet, []
def slow(path):
    calls.append(path)
    if len(calls) >= int(os.environ["SLOW_FROM_CALL"]):
        print("reading slowly", flush=True)
        time.sleep(600)
    return real(path)
loader.read_fleet = validate.read_fleet = slow
from reconciler.cli.fleetctl import main
sys.argv = ["fleetctl", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("slow_from_call", [1, 2], ids=["reading-settings", "in-a-pass"])
def test_sigterm_ends_a_daemon_stuck_in_a_slow_read(tmp_path: Path, slow_from_call: int) -> None:
    (tmp_path / "fleet.yaml").write_text("models: {}\n")
    port = cluster.free_port()
    log = tmp_path / "daemon.log"
    env = {**os.environ, "FLEET_LOCK_DIR": str(tmp_path / "locks"), "SLOW_FROM_CALL": str(slow_from_call)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_READ, "daemon", str(tmp_path), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "reading slowly" not in log.read_text() or (slow_from_call == 2 and not _answers(port)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)  # the read alone would take 600 s
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()
    assert not _answers(port)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code in (200, 503)
    except httpx.HTTPError:
        return False
