"""Fixtures for plan/apply against a real Ray Serve with real vLLM on the CPU.

These tests own their Serve instance (apply replaces the whole set of apps), so they get a
Ray head of their own per module rather than the session head other tests share. Stopped by
pid, never with a global `ray stop`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.live import cluster
from serve_app.contract import ENGINE_START_ATTEMPTS_ENV

from .helpers import Fleet


@pytest.fixture(scope="module")
def head_env() -> dict[str, str]:
    """What a module adds to its head's environment (override it in the module)."""
    return {}


@pytest.fixture(scope="module")
def apply_head(tmp_path_factory: pytest.TempPathFactory, head_env: dict[str, str]) -> Iterator[cluster.Head]:
    logs = tmp_path_factory.mktemp("vllm-logs")
    head = cluster.start_head(num_cpus=8, resources={}, object_store_bytes=256 * 1024**2,
                              # one start per engine (3 by default): the broken engine's test waits for
                              # every failed start, each a vLLM import on the CPU
                              env={"FLEET_LOG_DIR": str(logs), ENGINE_START_ATTEMPTS_ENV: "1", **head_env})
    try:
        yield head
    finally:
        cluster.stop_head(head)


@pytest.fixture(scope="module")
def fleet(apply_head: cluster.Head, tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("fleet")
    return Fleet(root, apply_head.dashboard_url, cluster.free_port(), tmp_path_factory.mktemp("locks"),
                 tiny_llama_path)
