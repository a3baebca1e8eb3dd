"""An hf:// model from a local stand-in of the Hub (tests/fixtures/hub.py; the real Hub is not
reachable here): `plan` says how much will be downloaded, `apply` downloads it before it touches
Serve, and the engine then starts from the cache alone — its Ray node has ``HF_HUB_OFFLINE=1``,
so vLLM could not have fetched anything itself."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconciler.fleetfiles.units import format_size
from reconciler.live import cluster
from tests.fixtures.hub import StandInHub

from .helpers import ENGINE_DEFAULTS, fleetctl_argv

pytestmark = pytest.mark.serve

REPO = "test-org/tiny-llama"


@pytest.fixture(scope="module")
def hub(tiny_llama_path: Path) -> Iterator[StandInHub]:
    with StandInHub() as h:
        h.add_folder(REPO, tiny_llama_path)
        yield h


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[cluster.Head]:
    logs = tmp_path_factory.mktemp("vllm-logs")
    h = cluster.start_head(num_cpus=8, resources={}, object_store_bytes=256 * 1024**2,
                           env={"FLEET_LOG_DIR": str(logs), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    try:
        yield h
    finally:
        cluster.stop_head(h)


def test_apply_downloads_a_hub_model_before_serve_starts_it(hub: StandInHub, head: cluster.Head, cache: Path,
                                                            tmp_path: Path) -> None:
    port = cluster.free_port()
    (tmp_path / "fleet.yaml").write_text(
        f"ray:\n  dashboard_url: {head.dashboard_url}\n"
        f"openai:\n  host: 127.0.0.1\n  port: {port}\n"
        f"defaults:\n  engine: {ENGINE_DEFAULTS}\n  env: {{VLLM_CPU_KVCACHE_SPACE: \"1\"}}\n"
        f"models:\n  tiny:\n    source: hf://{REPO}\n    size: 2MiB\n")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "FLEET_LOCK_DIR": str(tmp_path / "locks"),
           "NO_COLOR": "1"}
    env.pop("HF_HUB_OFFLINE", None)

    def fleetctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(fleetctl_argv(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)

    total = sum(len(v) for v in hub.repos[REPO].files.values())
    plan = fleetctl("plan")
    assert plan.returncode == 0, plan.stderr
    assert f"      download: {format_size(total)} from the Hub before it starts" in plan.stdout.splitlines()
    plan_json = json.loads(fleetctl("plan", "--json").stdout)
    [tiny] = [c for c in plan_json["changes"] if c["model"] == "tiny"]
    assert tiny["download"] == {"source": f"hf://{REPO}", "total_bytes": total, "missing_bytes": total, "note": ""}
    assert hub.bytes_served(REPO) == 0  # planning measures; it downloads nothing

    applied = fleetctl("apply", "--auto-approve")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    lines = applied.stderr.splitlines()
    fetched = lines.index(f"tiny: downloading {format_size(total)} of hf://{REPO} before starting it")
    sent = next(i for i, line in enumerate(lines) if line.startswith("sending the config to Serve"))
    assert fetched < sent  # the download came first
    assert hub.bytes_served(REPO) == total

    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None

    again = fleetctl("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr
    pulled = fleetctl("pull", "tiny")
    assert pulled.returncode == 0 and "already downloaded" in pulled.stderr
    assert hub.bytes_served(REPO) == total
