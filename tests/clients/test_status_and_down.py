"""`fleetctl status` and `fleetctl down` on the client fleet (the default fleet, brought up by start.sh,
which runs `fleetctl up`): status on good and on broken files, the status page, and `down` stopping
everything — the daemon `up` started, one started by hand, the head and every vLLM under it.

This module runs last among the client tests (pytest takes the files of a folder in name order):
`down` ends the fleet the other client tests share. Run alone, it brings the fleet up itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from reconciler.live import cluster
from serve_app.proctable import alive, cmdline, descendants, processes

from .conftest import CHAT, EMBED, ClientFleet, recorded_head

pytestmark = pytest.mark.serve


def fleetctl(fleet: ClientFleet, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from reconciler.cli import main; main()", *args],
                          cwd=fleet.root, env=fleet.env, capture_output=True, text=True, timeout=timeout)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def test_status_then_down_stops_everything(client_fleet: ClientFleet) -> None:
    up = client_fleet.start  # start.sh ends in `fleetctl up`
    assert "starting a local Ray head" in up.stderr, up.stderr[-3000:]
    status = fleetctl(client_fleet, "status")
    assert status.returncode == 0 and "Synced" in status.stdout, status.stdout + status.stderr
    page = re.search(r"Status page: (\S+)", up.stdout)
    assert page, up.stdout
    doc = httpx.get(page.group(1) + "status", timeout=30).json()
    assert {m["model"] for m in doc["models"]} == {"router", CHAT, EMBED}
    daemon_pid = doc["daemon"]["pid"]

    head = recorded_head(client_fleet.dashboard_url, client_fleet.env)
    assert head is not None, "up recorded no head"
    ours = descendants(set(cluster.session_processes(head.pid)))
    assert any("vllm.entrypoints" in cmdline(p) for p in ours)

    # A typo saved (an unclosed `[`): status still shows the live fleet, below the error, and exits 1
    fleet_yaml = client_fleet.root / "fleet.yaml"
    fleet_yaml.write_text(fleet_yaml.read_text() + "\nbroken: [unclosed\n")
    status = fleetctl(client_fleet, "status")
    assert status.returncode == 1, status.stdout + status.stderr
    assert re.search(r"error: fleet\.yaml:\d+:\d+: YAML syntax error", status.stderr), status.stderr
    assert CHAT in status.stdout and EMBED in status.stdout, status.stdout
    as_json = fleetctl(client_fleet, "status", "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    assert doc["file_errors"][0]["file"] == "fleet.yaml" and doc["file_errors"][0]["line"]
    assert {m["model"] for m in doc["models"]} >= {CHAT, EMBED}

    # ... and a daemon started by hand on the broken files (after the one `up` started was stopped: one
    # daemon per Serve, and the hand-started one finds that Serve from the last good files) is stopped
    # by `down` too
    os.kill(daemon_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while alive(daemon_pid):
        assert time.monotonic() < deadline, "the daemon did not stop on SIGTERM"
        time.sleep(0.2)
    api = cluster.free_port()
    by_hand = subprocess.Popen(
        [sys.executable, "-c", "from reconciler.cli import main; main()", "daemon", str(client_fleet.root),
         "--port", str(api)],
        cwd=client_fleet.root, env=client_fleet.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{api}/healthz"):
            assert by_hand.poll() is None and time.monotonic() < deadline, "the hand-started daemon did not start"
            time.sleep(0.5)
        down = fleetctl(client_fleet, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "fleet.yaml:" in down.stderr  # it says which files it could not read
        assert by_hand.wait(30) is not None
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
    assert not [p for p in ours if alive(p)]
    assert not alive(daemon_pid)
    # nor anything outside the head's tree that belongs to it (Serve's HAProxy is re-parented)
    assert not [cmdline(p.pid) for p in processes() if p.state != "Z" and head.temp_dir in cmdline(p.pid)]
    assert recorded_head(client_fleet.dashboard_url, client_fleet.env) is None  # down forgot the head
