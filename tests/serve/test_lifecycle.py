"""Model lifecycle on the shared fleet (real Serve + vLLM, CPU): idle unload, load on demand, failed loads.

A third model, ``tiny-cold`` (the tiny Llama copied to its own folder, idle_timeout 5s), joins the
shared fleet for this module and leaves at the end. Bounds below are bounds for the test, never
expectations of speed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures import serve_api
from tests.fixtures.procs import alive, wait_session_gone
from tests.serve.conftest import ANSWERED, EMB, Answered, Fleet, ask, engine_info

pytestmark = pytest.mark.serve
COLD = "tiny-cold"
BOUND_S = 900.0


def _state(model: str) -> dict[str, Any]:
    from ray import serve

    return dict(serve.get_app_handle(model).state.remote().result(timeout_s=60))


def _wait_state(model: str, wanted: str, timeout_s: float = BOUND_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (state := _state(model))["state"] != wanted:
        assert time.monotonic() < deadline, f"{model} is still {state['state']}, not {wanted}: {state}"
        time.sleep(0.5)
    return state


def _listed(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(fleet.base_url + "/models", timeout=30).json()["data"]}


def _fleetctl(ray_address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from reconciler.cli.fleetctl import main; main()", *args,
                           "--address", ray_address], capture_output=True, text=True, timeout=BOUND_S)


@pytest.fixture(scope="module")
def cold(fleet: Fleet, tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory,
         ray_driver: None) -> Iterator[Path]:
    """tiny-cold served with idle_timeout 5s; yields its model folder (tests break and mend it)."""
    source = tmp_path_factory.mktemp("cold") / "model"
    shutil.copytree(tiny_llama_path, source)
    fleet.models[COLD] = {"source": str(source), "task": "generate", "idle_timeout": "5s"}
    fleet.apply(load_timeout=f"{BOUND_S:.0f}s")  # a bound: loads on demand are slow on a busy 2-core box
    serve_api.wait_running(fleet.dashboard, [COLD])
    yield source
    fleet.models.pop(COLD)
    fleet.apply()
    serve_api.wait_absent(fleet.dashboard, COLD)


def test_idle_model_is_unloaded_and_its_vllm_is_gone(fleet: Fleet, cold: Path) -> None:
    always_on = engine_info(EMB)
    state = _wait_state(COLD, "unloaded")
    info = engine_info(COLD)
    assert info["guard_pid"] is None and not info["alive"]
    assert state["counts"]["unload"] >= 1 and state["in_flight"] == 0
    # the whole vLLM process tree (the guard's session) is gone; the replica stays, RUNNING and healthy
    assert wait_session_gone(info["last_guard_pid"]) == []
    assert serve_api.app_statuses(fleet.dashboard)[COLD][0] == "RUNNING"
    assert alive(info["replica_pid"])
    listed = _listed(fleet)
    assert listed[COLD]["state"] == "unloaded" and listed[COLD]["since"] > 0
    # the always-on model was idle all along and never left awake
    assert listed[EMB]["state"] == "awake"
    assert engine_info(EMB)["guard_pid"] == always_on["guard_pid"] and alive(always_on["guard_pid"])


def _ask(fleet: Fleet, i: int) -> Answered:
    """One request: a completion for odd i, a streamed chat for even i. == ANSWERED when answered."""
    client = fleet.client(timeout=BOUND_S)
    if i % 2:
        return ask(client, COLD, chat=False, stream=False, text=f"count {i}")
    return ask(client, COLD, chat=True, stream=True, text=f"hi {i}")


def test_ten_concurrent_requests_to_an_unloaded_model_load_it_once(fleet: Fleet, cold: Path) -> None:
    loads = _wait_state(COLD, "unloaded")["counts"].get("load", 0)
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # what a client polling /v1/models sees meanwhile
        while not done.is_set():
            seen.add(_listed(fleet)[COLD]["state"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    answers: dict[int, Answered | BaseException] = {}

    def ask(i: int) -> None:
        try:
            answers[i] = _ask(fleet, i)
        except BaseException as e:  # noqa: BLE001 - reported below
            answers[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert {i: a for i, a in answers.items() if a != ANSWERED} == {}
    assert len(answers) == 10
    assert _state(COLD)["counts"]["load"] == loads + 1  # one load for all ten
    assert "loading" in seen


def test_fleetctl_load_and_unload(fleet: Fleet, cold: Path, ray_head: Any) -> None:
    _wait_state(COLD, "unloaded")  # the idle rule, after the last test's requests
    loaded = _fleetctl(ray_head.gcs_address, "load", COLD, "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert '"state": "awake"' in loaded.stdout
    guard = engine_info(COLD)["guard_pid"]
    assert guard is not None and alive(guard)  # a vLLM started

    unloaded = _fleetctl(ray_head.gcs_address, "unload", COLD)
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.startswith(f"{COLD}: unloaded since ")
    assert _state(COLD)["state"] == "unloaded"
    assert wait_session_gone(guard) == []

    refused = _fleetctl(ray_head.gcs_address, "unload", EMB)
    assert refused.returncode == 1 and "always_on" in refused.stderr
    assert _state(EMB)["state"] == "awake"
    unknown = _fleetctl(ray_head.gcs_address, "unload", "no-such-model")
    assert unknown.returncode == 1 and "not a served model" in unknown.stderr


def test_failed_load_answers_503_with_the_reason_and_the_next_request_tries_again(
        fleet: Fleet, cold: Path, ray_head: Any) -> None:
    _wait_state(COLD, "unloaded")
    (cold / "config.json").rename(cold / "config.json.off")  # the model folder is broken
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            _ask(fleet, 1)
        assert failed.value.status_code == 503
        error = failed.value.response.json()["error"]
        assert error["code"] == "model_unavailable"
        assert f"loading '{COLD}' failed" in error["message"] and "exited with code" in error["message"]
        listed = _listed(fleet)[COLD]
        assert listed["state"] == "failed" and "exited with code" in listed["reason"]
        assert serve_api.app_statuses(fleet.dashboard)[COLD][0] == "RUNNING"  # the replica is fine
    finally:
        (cold / "config.json.off").rename(cold / "config.json")
    assert _ask(fleet, 2) == ANSWERED  # mended: the next request loads it and is answered
    assert _state(COLD)["state"] in ("awake", "unloading", "unloaded")


def test_router_never_relays_vllm_dev_endpoints(fleet: Fleet, cold: Path) -> None:
    root = fleet.base_url.removesuffix("/v1")
    for path in ("/sleep?level=1", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache"):
        response = httpx.post(root + path, json={"model": COLD}, timeout=30)
        assert response.status_code in (404, 405), (path, response.status_code)
