"""`replicas: 2` of one model behind the router: both engines serve, a killed replica drops out (its
vLLM with it) and returns, and concurrent streams with some clients vanishing mid-stream all end well
(real Serve + vLLM, CPU).

Runs after test_relay.py and before test_resilience.py (file order); the model is back at one
replica when it ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from serve_app import endpoints
from tests.fixtures.procs import alive, vllm_server, wait_session_gone
from tests.fixtures.prom import metric
from tests.serve.conftest import GEN, Fleet, engine_info

pytestmark = pytest.mark.serve
START_S = 900.0  # a bound for the test, not an expectation: a vLLM start is ~1 min on an idle box


def _urls() -> set[str]:
    return {r.url for r in endpoints.listed().get(GEN, [])}


def _wait_urls(condition: object, what: str) -> set[str]:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        urls = _urls()
        if condition(urls):  # type: ignore[operator]
            return urls
        time.sleep(1.0)
    raise AssertionError(f"{what}: registry lists {_urls()}")


def _served(url: str) -> float:
    return metric(httpx.get(url + "/metrics", timeout=30).text, "vllm:request_success_total")


def _running(url: str) -> float:
    return metric(httpx.get(url + "/metrics", timeout=30).text, "vllm:num_requests_running")


async def _stream(client: httpx.AsyncClient, url: str, tokens: int, leave_early: bool) -> int | None:
    """One streamed completion; the usage's token count, or None when we left after the first chunk."""
    body = {"model": GEN, "prompt": "Once upon a time", "max_tokens": tokens, "min_tokens": tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = response.aiter_lines()
        async for line in lines:
            if line.startswith("data: "):
                break
        if leave_early:
            return None
        done, usage = False, None
        async for line in lines:
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: ") and '"usage":{' in line.replace(" ", ""):
                usage = json.loads(line[6:])["usage"]["completion_tokens"]
        assert done, "the stream ended without [DONE]"
        return int(usage) if usage is not None else -1


async def _load(base_url: str, streams: int, concurrency: int, tokens: int, leave_every: int = 0
                ) -> list[int | None]:
    """``streams`` streamed completions, ``concurrency`` at a time; with ``leave_every`` = k, clients
    0, k, 2k, ... leave after their first chunk."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int | None:
        async with gate:
            return await _stream(client, base_url, tokens, leave_early=bool(leave_every) and i % leave_every == 0)

    async with httpx.AsyncClient(timeout=300) as client:
        return list(await asyncio.gather(*(one(i) for i in range(streams))))


def _until_all_take_requests(fleet: Fleet, urls: set[str]) -> None:
    """Routers re-read the registry every few seconds: a replica that just registered gets traffic
    within a bound, not at once. Send batches until every one of ``urls`` has answered some."""
    before = {url: _served(url) for url in urls}
    deadline = time.monotonic() + 120
    while not all(_served(url) > before[url] for url in urls) and time.monotonic() < deadline:
        assert asyncio.run(_load(fleet.base_url, streams=12, concurrency=6, tokens=8)) == [8] * 12
    assert all(_served(url) > before[url] for url in urls), {u: _served(u) - before[u] for u in urls}


@pytest.fixture(scope="module")
def two_replicas(fleet: Fleet, ray_driver: None) -> Iterator[set[str]]:
    fleet.models[GEN]["replicas"] = 2
    fleet.apply()
    try:
        urls = _wait_urls(lambda urls: len(urls) == 2, "two replicas did not both register")
        _until_all_take_requests(fleet, urls)  # every router knows both
        yield urls
    finally:
        fleet.models[GEN].pop("replicas")
        fleet.apply()
        _wait_urls(lambda urls: len(urls) == 1, "the model did not go back to one replica")


def test_both_replicas_take_requests(fleet: Fleet, two_replicas: set[str]) -> None:
    before = {url: _served(url) for url in two_replicas}
    results = asyncio.run(_load(fleet.base_url, streams=12, concurrency=6, tokens=16))
    assert results == [16] * 12
    assert all(_served(url) > before[url] for url in two_replicas), {u: _served(u) - before[u] for u in two_replicas}


def test_streams_complete_while_other_clients_vanish(fleet: Fleet, two_replicas: set[str]) -> None:
    # Every 4th client leaves after its first chunk; every other stream must end complete.
    results = asyncio.run(_load(fleet.base_url, streams=24, concurrency=8, tokens=64, leave_every=4))
    assert [r for i, r in enumerate(results) if i % 4] == [64] * 18
    # The abandoned requests were aborted in vLLM, not left generating.
    deadline = time.monotonic() + 60
    while any(_running(url) for url in two_replicas) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [_running(url) for url in two_replicas] == [0, 0]


def test_dead_replica_drops_out_and_returns(fleet: Fleet, two_replicas: set[str]) -> None:
    """One replica SIGKILLed (as the OOM killer would): its vLLM goes with it (no orphan), the other
    replica serves meanwhile, and Serve's replacement registers and serves. (A vLLM that dies under
    a live replica: tests/serve/test_resilience.py.)"""
    victim = engine_info(GEN)
    assert alive(vllm_server(victim["guard_pid"]))
    os.kill(victim["replica_pid"], signal.SIGKILL)
    assert wait_session_gone(victim["guard_pid"], timeout_s=30) == []  # no vLLM process left behind
    # The survivor takes every request meanwhile: the router skips a replica that refuses.
    results = asyncio.run(_load(fleet.base_url, streams=6, concurrency=3, tokens=8))
    assert results == [8] * 6
    # Serve replaces the dead replica; the new one registers and takes requests again.
    urls = _wait_urls(lambda u: len(u) == 2 and victim["url"] not in u, "no replacement replica registered")
    _until_all_take_requests(fleet, urls)
