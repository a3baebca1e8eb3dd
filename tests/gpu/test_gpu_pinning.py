"""On a box with 2+ NVIDIA GPUs: each model's engine runs on exactly its GPUs, and Ray refuses to
put more of a GPU's share on it than it has. Real Ray, real vLLM, real GPUs (NVML reads who runs where).

CI has no GPU, so there these tests are reported as skipped, never as passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.fleetfiles.inventory import nvml_gpus
from reconciler.live.cluster import Head, free_port, gpu_resources, start_head, stop_head
from serve_app.proctable import descendants
from tests.fixtures import serve_api

GPUS = nvml_gpus()
pytestmark = [pytest.mark.serve, pytest.mark.skipif(len(GPUS) < 2, reason="needs 2 or more NVIDIA GPUs")]


@pytest.fixture(scope="module")
def gpu_head() -> Iterator[Head]:
    head = start_head(num_cpus=8, resources=gpu_resources(len(GPUS)))
    try:
        yield head
    finally:
        stop_head(head)


def fleetctl(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from reconciler.cli.fleetctl import main; main()", *args], cwd=root,
                          capture_output=True, text=True, timeout=900)


def write_fleet(root: Path, head: Head, port: int, model: Path, models: dict[str, dict[str, Any]]) -> None:
    fleet = {"ray": {"dashboard_url": head.dashboard_url}, "openai": {"port": port},
             "defaults": {"engine": {"enforce_eager": True, "max_model_len": 512}},
             "models": {name: {"source": str(model), **m} for name, m in models.items()}}
    (root / "fleet.yaml").write_text(json.dumps(fleet))


def gpu_of_pids() -> dict[int, set[int]]:
    """pid → the GPU indices it holds memory on, from NVML."""
    import pynvml

    pynvml.nvmlInit()
    try:
        out: dict[int, set[int]] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                out.setdefault(proc.pid, set()).add(i)
        return out
    finally:
        pynvml.nvmlShutdown()


def engine_gpus(dashboard: str, app: str) -> set[int]:
    """The GPUs used by the processes under this app's replica (its vLLM server and engine core)."""
    [replica] = serve_api.replicas(dashboard, app, "engine")
    return replica_gpus(replica)


def replica_gpus(replica: dict[str, Any]) -> set[int]:
    used = gpu_of_pids()
    return set().union(*(used.get(p, set()) for p in descendants({replica["pid"]})))


def answered(replica: dict[str, Any]) -> float:
    """Requests this replica's vLLM finished, from its own /metrics (port read from its command line)."""
    from serve_app.lifecycle import counter_total

    for pid in descendants({replica["pid"]}):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if "--port" in argv and any("vllm" in a for a in argv):
            port = argv[argv.index("--port") + 1]
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            return counter_total(text, ("vllm:request_success_total",))
    raise AssertionError(f"no vLLM server under replica {replica['replica_id']}")


def test_each_engine_runs_on_its_own_gpu_and_shares_are_enforced(gpu_head: Head, tmp_path: Path) -> None:
    from tests.fixtures.tiny_llama import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    port = free_port()
    write_fleet(tmp_path, gpu_head, port, model, {
        "on-gpu0": {"gpus": [0], "gpu_memory": 0.3},
        "on-gpu1": {"gpus": [1], "gpu_memory": 0.3},
    })
    result = fleetctl(tmp_path, "apply", "--auto-approve")
    assert result.returncode == 0, result.stdout + result.stderr
    assert engine_gpus(gpu_head.dashboard_url, "on-gpu0") == {0}
    assert engine_gpus(gpu_head.dashboard_url, "on-gpu1") == {1}
    for name in ("on-gpu0", "on-gpu1"):
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text

    # The placer refuses 0.3 + 0.8 of GPU 0 ...
    write_fleet(tmp_path, gpu_head, port, model, {
        "on-gpu0": {"gpus": [0], "gpu_memory": 0.3},
        "on-gpu1": {"gpus": [1], "gpu_memory": 0.3},
        "greedy": {"gpus": [0], "gpu_memory": 0.8},
    })
    refused = fleetctl(tmp_path, "validate")
    assert refused.returncode == 1 and "GPU 0 is shared by on-gpu0 (0.3), greedy (0.8)" in refused.stderr
    # ... and so does Ray's scheduler, for a config that went around the placer (hand-made PUT)
    live = httpx.get(gpu_head.dashboard_url + serve_api.SERVE_API, timeout=30).json()
    apps = [a["deployed_app_config"] for a in live["applications"].values()]
    greedy = json.loads(json.dumps([a for a in apps if a["name"] == "on-gpu1"][0]))
    greedy["name"] = "greedy"
    greedy["args"]["model"] = "greedy"
    greedy["deployments"][0]["ray_actor_options"]["resources"] = {"fleet_gpu_0": 0.8}
    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [*apps, greedy]}
    assert httpx.put(gpu_head.dashboard_url + serve_api.SERVE_API, json=config, timeout=60).status_code == 200
    # Serve reports the replica as unschedulable, naming the resource it waits for
    deadline = time.monotonic() + 240
    while True:
        status = httpx.get(gpu_head.dashboard_url + serve_api.SERVE_API, timeout=30).json()["applications"]["greedy"]
        message = status.get("deployments", {}).get("engine", {}).get("message", "")
        if "fleet_gpu_0" in message or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert "fleet_gpu_0" in message, status
    assert status["status"] != "RUNNING"
    assert engine_gpus(gpu_head.dashboard_url, "on-gpu0") == {0}  # the first model is untouched


def test_replicas_that_split_two_gpus_run_one_on_each_and_both_answer(gpu_head: Head, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.fixtures.tiny_llama import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    port = free_port()
    write_fleet(tmp_path, gpu_head, port, model, {
        "pair": {"gpus": [0, 1], "tensor_parallel": 1, "replicas": 2, "gpu_memory": 0.3}})
    result = fleetctl(tmp_path, "apply", "--auto-approve")
    assert result.returncode == 0, result.stdout + result.stderr
    replicas = serve_api.replicas(gpu_head.dashboard_url, "pair", "engine")
    assert sorted(replica_gpus(r) for r in replicas) == [{0}, {1}]  # one engine on each card, each on one

    def ask(i: int) -> int:
        return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "pair", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 64,
            "min_tokens": 64, "ignore_eos": True}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(ask, range(32))) == {200}
    done = [answered(r) for r in replicas]
    assert all(n >= 4 for n in done), done  # the router spread them over both engines
