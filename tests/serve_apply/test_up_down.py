"""`fleetctl up` on the default fleet, chat and embeddings through the endpoint, `fleetctl down`.

The default fleet.yaml is used as shipped except for its ports (a free dashboard port and a
free OpenAI port), so the test never meets another Ray on this box. After `down` no process of
the head it started, nor any vLLM under it, may be left.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconciler import cluster
from reconciler.cli_ops import head_state_path, kill_leftovers
from serve_app.proctable import alive, cmdline, descendants, processes
from tests.fixtures.default_fleet import copy_default_fleet

from .helpers import Fleet

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def default_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("default-fleet")
    ports = copy_default_fleet(root)
    dash, port = ports.dashboard, ports.openai
    fleet = Fleet(root, f"http://127.0.0.1:{dash}", port, tmp_path_factory.mktemp("locks"), root)
    yield fleet
    # Whatever happened, leave nothing running.
    state = _head_state(fleet)
    if state.exists():
        head = cluster.Head(**json.loads(state.read_text()))
        ours = descendants(set(cluster.session_processes(head.pid)))
        cluster.stop_head(head)
        kill_leftovers(ours)


def _head_state(fleet: Fleet) -> Path:
    import os

    old = os.environ.get("FLEET_LOCK_DIR")
    os.environ["FLEET_LOCK_DIR"] = str(fleet.lock_dir)
    try:
        return head_state_path(fleet.dashboard_url)
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

    head = cluster.Head(**json.loads(_head_state(default_fleet).read_text()))
    ours = descendants(set(cluster.session_processes(head.pid)))
    assert any("vllm.entrypoints" in cmdline(p) for p in ours)
    r = default_fleet.fleetctl("down", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [p for p in ours if alive(p)]
    assert not alive(daemon_pid)
    # nor anything outside the head's tree that belongs to it (Serve's HAProxy is re-parented)
    assert not [cmdline(p.pid) for p in processes() if p.state != "Z" and head.temp_dir in cmdline(p.pid)]
    assert not _head_state(default_fleet).exists()
