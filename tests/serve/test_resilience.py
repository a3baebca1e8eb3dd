"""When things die: a crashed vLLM, a deleted model (real Serve + vLLM). A SIGKILLed replica (its vLLM
goes with it, the other replica serves meanwhile): tests/serve/test_replicas.py.

These run after test_relay.py (file order) because they restart or remove engines.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from tests.fixtures import serve_api
from tests.fixtures.procs import alive, vllm_server, wait_session_gone
from tests.serve.conftest import ANSWERED, EMB, GEN, Answered, Fleet, ask, engine_info

pytestmark = pytest.mark.serve
RECOVERY_S = 900.0  # a bound for the test, not an expectation: a vLLM start is ~1 min here


def _chat(fleet: Fleet) -> Answered:
    return ask(fleet.client(timeout=400.0), GEN, chat=True, stream=False)


def _answers_again(fleet: Fleet) -> list[int]:
    """Retry until the model answers (a whole answer: ANSWERED); the status of every failed attempt."""
    failures = []
    deadline = time.monotonic() + RECOVERY_S
    while time.monotonic() < deadline:
        try:
            answer = _chat(fleet)
        except openai.APIStatusError as e:
            failures.append(e.status_code)
            time.sleep(1.0)
            continue
        assert answer == ANSWERED, (answer, failures)
        return failures
    raise AssertionError(f"{GEN} did not answer again; failures: {failures}")


def test_killed_vllm_gives_503_then_serve_replaces_the_replica(fleet: Fleet, ray_driver: None) -> None:
    before = engine_info(GEN)
    os.kill(vllm_server(before["guard_pid"]), signal.SIGKILL)
    while alive(before["guard_pid"]):  # the guard follows its command out
        time.sleep(0.1)

    # Never a hang: either a 503 that says why at once, or the request is held (bounded by
    # load_timeout) until Serve's new replica answers, which depends on who notices first.
    # Whichever happens, it is checked: the 503's reason, or a whole answer from the new replica.
    try:
        first: Answered | None = _chat(fleet)
    except openai.APIStatusError as e:
        first = None
        assert e.status_code == 503, (e.status_code, e.response.text)
        error = e.response.json()["error"]
        assert error["code"] == "model_unavailable" and "exited with code" in error["message"], error
    if first is not None:  # held, then answered: only a new replica's vLLM can have answered
        assert first == ANSWERED
        assert engine_info(GEN)["replica_pid"] != before["replica_pid"]

    # while it comes back: 503s, or requests held until it answers; then a whole answer
    failures = _answers_again(fleet)
    assert set(failures) <= {503}, failures
    after = engine_info(GEN)
    assert after["replica_pid"] != before["replica_pid"]
    assert wait_session_gone(before["guard_pid"]) == []


def test_deleting_a_model_leaves_no_vllm_process(fleet: Fleet, ray_driver: None) -> None:
    before = engine_info(EMB)
    router_before = {r["replica_id"] for r in serve_api.replicas(fleet.dashboard, "router", "router")}
    fleet.models.pop(EMB)
    fleet.apply()
    serve_api.wait_absent(fleet.dashboard, EMB)
    assert wait_session_gone(before["guard_pid"], timeout_s=30) == []
    assert not alive(before["replica_pid"])

    deadline = time.monotonic() + 60  # the router's model list changes in place, shortly after
    while EMB in {m["id"] for m in httpx.get(fleet.base_url + "/models").json()["data"]}:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    with pytest.raises(openai.NotFoundError):
        fleet.client().embeddings.create(model=EMB, input="hi")
    assert {r["replica_id"] for r in serve_api.replicas(fleet.dashboard, "router", "router")} == router_before
