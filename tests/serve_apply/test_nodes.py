"""A fleet over two Ray nodes: one model on the head, one on a second node joined on this box as
127.0.0.2, both served through the one endpoint. The far engine listens on its node's address and
answers nothing without the fleet's token; losing the node takes only its model away, and the node
coming back brings it back.

Every request goes to a loopback address (127.0.0.1 for the endpoint, 127.0.0.2 for the far
engine). The tests run in order on one shared fleet: a vLLM start costs a minute or more here.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.live import cluster
from serve_app.contract import ENGINE_TOKEN_ENV, ENGINE_TOKEN_HEADER
from serve_app.proctable import alive, cmdline, processes

from .helpers import Fleet

pytestmark = pytest.mark.serve

# Ray turns a node address of 127.0.0.1 into the box's network address, so the head takes another
# loopback one: all of 127.0.0.0/8 is on the loopback interface.
HEAD_IP, NODE2 = "127.0.1.1", "127.0.0.2"
NEAR, FAR = "near-chat", "far-chat"
MODELS = {NEAR: {"node": HEAD_IP, "idle_timeout": "never"}, FAR: {"node": NODE2, "idle_timeout": "never"}}
ENGINE_PATHS = ["/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics", "/health", "/load",
                "/sleep", "/wake_up", "/is_sleeping", "/tokenize", "/version", "/ping"]
NODE_RESOURCES = {"fleet_test_node2": 1.0}


@pytest.fixture(scope="module")
def apply_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Head]:
    """This module's head, known to the cluster by a loopback address, so Ray's own traffic stays on loopback."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    head = cluster.start_head(num_cpus=4, resources={}, node_ip=HEAD_IP, object_store_bytes=256 * 1024**2,
                              env={"FLEET_LOG_DIR": str(logs)})
    try:
        yield head
    finally:
        cluster.stop_head(head)


class Node2:
    """The second node; the tests kill it and start it again."""

    def __init__(self, head: cluster.Head, logs: Path) -> None:
        self.head, self.logs = head, logs
        self.worker: cluster.Worker | None = None

    def start(self) -> None:
        self.worker = cluster.join_node(self.head, node_ip=NODE2, num_cpus=2, resources=NODE_RESOURCES,
                                        object_store_bytes=128 * 1024**2, env={"FLEET_LOG_DIR": str(self.logs)})

    def kill(self) -> None:
        """As a machine lost: SIGKILL every process of the node at once, nothing shut down cleanly."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        cluster.stop_head(self.worker, timeout_s=10)  # reaps the leader; the group is already gone
        self.worker = None

    def stop(self) -> None:
        if self.worker is not None:
            cluster.stop_head(self.worker)
            self.worker = None


@pytest.fixture(scope="module")
def node2(apply_head: cluster.Head, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node2]:
    node = Node2(apply_head, tmp_path_factory.mktemp("node2-logs"))
    node.start()
    try:
        yield node
    finally:
        node.stop()
        # the guard takes the far engine down with its replica, whatever way the node ended
        assert wait_for(lambda: not far_engines(), 60), [cmdline(p) for p in far_engines()]


@pytest.fixture(scope="module")
def fleet2(fleet: Fleet, node2: Node2) -> Fleet:
    return fleet


def wait_for(check: Any, timeout_s: float, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every_s)


def far_engines() -> list[int]:
    """vLLM servers listening on the second node's address (ours: nothing else here binds 127.0.0.2)."""
    return [p.pid for p in processes() if p.state != "Z"
            and cmdline(p.pid).split()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # not its guard
            and f"--host {NODE2}" in cmdline(p.pid)]


def far_port(pid: int) -> int:
    argv = cmdline(pid).split()
    return int(argv[argv.index("--port") + 1])


def chat(fleet: Fleet, model: str, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{fleet.port}/v1/chat/completions", timeout=timeout,
                      json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})


def answers(fleet: Fleet, model: str) -> bool:
    """Does the model answer a chat through the endpoint now? (False while it is still coming back.)"""
    try:
        return chat(fleet, model, timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def listed(fleet: Fleet) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"http://127.0.0.1:{fleet.port}/v1/models", timeout=30).json()["data"]
    return {m["id"]: m for m in data}


def status_rows(fleet: Fleet) -> dict[str, dict[str, Any]]:
    r = fleet.fleetctl("status", "--json", timeout=120)
    return {row["model"]: row for row in json.loads(r.stdout)["models"]}


def test_apply_refuses_a_node_the_cluster_lacks(fleet2: Fleet) -> None:
    fleet2.write({"lost": {"node": "127.0.0.3"}})
    r = fleet2.fleetctl("apply", "--auto-approve", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "models.lost.node" in r.stderr and "node 127.0.0.3 is not in the Ray cluster" in r.stderr, r.stderr
    assert f"{HEAD_IP} (0 GPUs, the head)" in r.stderr and NODE2 in r.stderr, r.stderr
    assert "nothing was changed" in r.stderr


def test_models_on_two_nodes_answer_through_one_endpoint(fleet2: Fleet) -> None:
    fleet2.write(MODELS)
    r = fleet2.fleetctl("apply", "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    for model in (NEAR, FAR):
        resp = chat(fleet2, model)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model
    # the far model's engine runs on node 2's address; the near one keeps loopback
    assert len(far_engines()) == 1
    rows = status_rows(fleet2)
    assert (rows[NEAR]["node"], rows[FAR]["node"]) == (HEAD_IP, NODE2)
    assert {rows[m]["state"] for m in (NEAR, FAR)} <= {"ready", "awake"}, rows


def test_engine_on_the_other_node_refuses_requests_without_the_token(fleet2: Fleet) -> None:
    [pid] = far_engines()
    port, base = far_port(pid), f"http://{NODE2}:{far_port(pid)}"
    for path in ENGINE_PATHS:
        for method in ("GET", "POST"):
            r = httpx.request(method, base + path, timeout=30)
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
    # not loopback's 127.0.0.1: the engine listens on its node's address only
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    # the token reaches vLLM by its environment only: never argv (readable by every user), never
    # the Serve config; with it, the same engine answers
    token = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    token_value = next(v.split(b"=", 1)[1].decode() for v in token if v.startswith(ENGINE_TOKEN_ENV.encode() + b"="))
    assert token_value and token_value not in cmdline(pid)
    assert token_value not in httpx.get(fleet2.dashboard_url + "/api/serve/applications/", timeout=30).text
    r = httpx.get(base + "/health", headers={ENGINE_TOKEN_HEADER: token_value}, timeout=30)
    assert r.status_code == 200


def test_a_lost_node_takes_only_its_models(fleet2: Fleet, node2: Node2) -> None:
    [engine] = far_engines()
    node2.kill()
    # its engine goes with its replica (the guard), as on a machine that is gone
    assert wait_for(lambda: not alive(engine), 60), cmdline(engine)
    # the other model keeps answering meanwhile
    for _ in range(3):
        r = chat(fleet2, NEAR)
        assert r.status_code == 200, r.text
    models = wait_for(lambda: (m := listed(fleet2)) and m[FAR]["state"] == "unavailable" and m, 180)
    assert models, listed(fleet2)
    assert NODE2 in models[FAR]["reason"] and models[NEAR]["state"] in ("ready", "awake")
    rows = status_rows(fleet2)
    assert rows[FAR]["state"] == "unavailable" and rows[FAR]["health"] == "Degraded", rows[FAR]
    assert NODE2 in rows[FAR]["message"]
    assert rows[NEAR]["state"] in ("ready", "awake"), rows[NEAR]
    r = chat(fleet2, FAR, timeout=60)
    assert r.status_code == 503 and NODE2 in r.text, r.text
    assert chat(fleet2, NEAR).status_code == 200


def test_the_node_back_restores_its_models(fleet2: Fleet, node2: Node2) -> None:
    node2.start()  # Serve places the waiting replica on it again: no apply needed
    assert wait_for(lambda: answers(fleet2, FAR), 600, every_s=5), chat(fleet2, FAR).text
    # Serve's own status of the app follows a little after its new replica answers
    ok = ("ready", "awake")
    assert wait_for(lambda: listed(fleet2)[FAR]["state"] in ok, 120), listed(fleet2)[FAR]
    assert wait_for(lambda: status_rows(fleet2)[FAR]["state"] in ok, 120), status_rows(fleet2)[FAR]
    assert chat(fleet2, NEAR).status_code == 200
