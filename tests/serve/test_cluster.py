"""The local Ray head: it comes up answering, and stopping it leaves none of its processes."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from reconciler.live.cluster import gpu_resources, session_processes, start_head, stop_head

pytestmark = pytest.mark.serve


def test_gpu_resources_name_each_gpu() -> None:
    assert gpu_resources(3) == {"fleet_gpu_0": 1.0, "fleet_gpu_1": 1.0, "fleet_gpu_2": 1.0}
    assert gpu_resources(0) == {}


def test_head_declares_the_gpu_resources_and_stops_cleanly() -> None:
    head = start_head(num_cpus=1, resources=gpu_resources(2), object_store_bytes=128 * 1024**2)
    try:
        assert session_processes(head.pid)
        assert httpx.get(head.dashboard_url + "/api/version", timeout=30).status_code == 200
        # A separate driver process: this test session may already be connected to another cluster.
        code = f"import json, ray; ray.init(address={head.gcs_address!r}); print(json.dumps(ray.cluster_resources()))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        totals = json.loads(out.stdout.strip().splitlines()[-1])
        assert totals["fleet_gpu_0"] == 1.0 and totals["fleet_gpu_1"] == 1.0
    finally:
        stop_head(head)
    assert session_processes(head.pid) == []
