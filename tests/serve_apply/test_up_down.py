"""`fleetctl up` on the default fleet, chat and embeddings through the endpoint, `fleetctl down`.

The default fleet.yaml is used as shipped except for its ports (a free dashboard port and a
free OpenAI port), so the test never meets another Ray on this box. After `down` no process of
the head it started, nor any vLLM under it, may be left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconciler import state_files
from reconciler.cli.daemon_cmd import stop_watching
from reconciler.live import cluster
from reconciler.live.local_head import kill_leftovers
from serve_app.proctable import alive, cmdline, descendants, processes
from tests.fixtures.default_fleet import copy_default_fleet

from .helpers import Fleet, fleetctl_argv

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def default_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("default-fleet")
    ports = copy_default_fleet(root)
    dash, port = ports.dashboard, ports.openai
    fleet = Fleet(root, f"http://127.0.0.1:{dash}", port, tmp_path_factory.mktemp("locks"), root)
    yield fleet
    # Whatever happened, leave nothing running: the daemons first (a daemon outliving its head starts
    # it again, as it should), then the head and its engines, and the record of it.
    stop_watching(root, print)
    state = _head_state(fleet)
    if state.exists():
        head = _head(state)
        ours = descendants(set(cluster.session_processes(head.pid)))
        cluster.stop_head(head)
        kill_leftovers(ours)
        state.unlink()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def _head(state: Path) -> cluster.Head:
    """The head `up` recorded (its start settings, kept beside it for a restart, left out)."""
    return cluster.Head(**{k: v for k, v in json.loads(state.read_text()).items() if k != "start"})


def _head_state(fleet: Fleet) -> Path:
    old = os.environ.get("FLEET_LOCK_DIR")
    os.environ["FLEET_LOCK_DIR"] = str(fleet.lock_dir)
    try:
        return state_files.head_record(fleet.dashboard_url)
    finally:
        if old is None:
            del os.environ["FLEET_LOCK_DIR"]
        else:
            os.environ["FLEET_LOCK_DIR"] = old


def test_up_chat_embed_down(default_fleet: Fleet) -> None:
    import openai

    r = default_fleet.fleetctl("up", timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "starting a local Ray head" in r.stderr
    endpoint = f"http://127.0.0.1:{default_fleet.port}/v1"
    assert f"OpenAI endpoint: {endpoint}" in r.stdout

    client = openai.OpenAI(base_url=endpoint, api_key="unused", timeout=300)
    chat = client.chat.completions.create(
        model="smollm2-135m-instruct", max_tokens=20, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (chat.choices[0].message.content or "")
    emb = client.embeddings.create(model="all-minilm-l6-v2", input=["hello", "world"])
    assert [len(d.embedding) for d in emb.data] == [384, 384]

    status = default_fleet.fleetctl("status")
    assert status.returncode == 0 and "Synced" in status.stdout, status.stdout + status.stderr
    page = re.search(r"Status page: (\S+)", r.stdout)
    assert page, r.stdout
    doc = httpx.get(page.group(1) + "status", timeout=30).json()
    assert {m["model"] for m in doc["models"]} == {"router", "smollm2-135m-instruct", "all-minilm-l6-v2"}
    daemon_pid = doc["daemon"]["pid"]

    head = _head(_head_state(default_fleet))
    ours = descendants(set(cluster.session_processes(head.pid)))
    assert any("vllm.entrypoints" in cmdline(p) for p in ours)

    # A typo saved (an unclosed `[`): status still shows the live fleet, below the error, and exits 1
    fleet_yaml = default_fleet.root / "fleet.yaml"
    fleet_yaml.write_text(fleet_yaml.read_text() + "\nbroken: [unclosed\n")
    status = default_fleet.fleetctl("status")
    assert status.returncode == 1, status.stdout + status.stderr
    assert re.search(r"error: fleet\.yaml:\d+:\d+: YAML syntax error", status.stderr), status.stderr
    assert "smollm2-135m-instruct" in status.stdout and "all-minilm-l6-v2" in status.stdout, status.stdout
    as_json = default_fleet.fleetctl("status", "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    assert doc["file_errors"][0]["file"] == "fleet.yaml" and doc["file_errors"][0]["line"]
    assert {m["model"] for m in doc["models"]} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    # ... and a daemon started by hand on the broken files (after the one `up` started was stopped: one
    # daemon per Serve, and the hand-started one finds that Serve from the last good files) is stopped
    # by `down` too
    os.kill(daemon_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while alive(daemon_pid):
        assert time.monotonic() < deadline, "the daemon did not stop on SIGTERM"
        time.sleep(0.2)
    api = cluster.free_port()
    by_hand = subprocess.Popen(fleetctl_argv("daemon", str(default_fleet.root), "--port", str(api)),
                               cwd=default_fleet.root, env=default_fleet.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{api}/healthz"):
            assert by_hand.poll() is None and time.monotonic() < deadline, "the hand-started daemon did not start"
            time.sleep(0.5)
        r = default_fleet.fleetctl("down", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "fleet.yaml:" in r.stderr  # it says which files it could not read
        assert by_hand.wait(30) is not None
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
    assert not [p for p in ours if alive(p)]
    assert not alive(daemon_pid)
    # nor anything outside the head's tree that belongs to it (Serve's HAProxy is re-parented)
    assert not [cmdline(p.pid) for p in processes() if p.state != "Z" and head.temp_dir in cmdline(p.pid)]
    assert not _head_state(default_fleet).exists()
