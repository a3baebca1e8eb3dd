"""LoRA adapters through the router's real HTTP front (no Ray): each adapter is a model name of its own,
listed with its parent (/v1/models, Ollama's /api/tags and /api/ps), and its requests go to its parent's
engine with the adapter's name as the model (vLLM serves it under that name). Stand-in engines as in
tests/test_ingress.py; the same on real Serve + vLLM: tests/serve_apply/test_apply_scenarios.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reconciler.live.cluster import free_port
from serve_app import ingress, router
from serve_app import relay as relay_mod
from serve_app.keys import KeyRing
from tests.test_ingress import Engine, Front

# as compile writes them: the adapter carries its parent's fields and names it
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"task": "generate", "always_on": False},
    "sql-helper": {"task": "generate", "always_on": False, "parent": "tiny"},
    "other": {"task": "generate", "always_on": False},
}
RING = KeyRing.of({"ADMIN_KEY": "admin", "SQL_KEY": "sql"}, {"SQL_KEY": {"models": ["sql-*"]}})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def fronts() -> Iterator[tuple[Front, Engine, Engine]]:
    """A front whose registry knows only engine applications (as Ray's does): tiny's and other's."""
    tiny, other = Engine(), Engine()
    tiny.start()
    other.start()
    settings = relay_mod.Settings(models=MODELS, keyring=RING, load_timeout_s=5.0)

    async def discover(model: str) -> str:
        raise relay_mod.Unavailable(f"The model `{model}` has no engine in this test")

    async def app_states() -> dict[str, tuple[str, str]]:
        return {"tiny": ("ready", ""), "other": ("ready", "")}  # Serve has no app for an adapter

    async def lifecycles(models: list[str]) -> dict[str, dict[str, Any] | None]:
        return {m: {"state": "awake", "since": 1.0, **({"adapters": {"sql-helper": "loaded"}} if m == "tiny" else {})}
                for m in models}

    port = free_port()
    relay = relay_mod.Relay(settings, discover, app_states, lifecycles)
    server = ingress.Server(ingress.listen_socket("127.0.0.1", port), relay, router.web_app(relay))
    server.wait_started(10)
    server.call(relay.set_registered, {"tiny": [tiny.url], "other": [other.url]})
    yield Front(server, f"http://127.0.0.1:{port}"), tiny, other
    server.stop()


def test_an_adapter_s_request_goes_to_its_parent_s_engine_under_its_own_name(fronts: Any) -> None:
    front, tiny, other = fronts
    for path in ("/v1/chat/completions", "/v1/completions"):
        answer = httpx.post(front.base + path, json={"model": "sql-helper"}, headers=auth("admin"))
        assert answer.status_code == 200
        got = answer.json()
        assert (got["model"], got["served_by"]) == ("sql-helper", tiny.port)
    assert other.served == 0
    ollama = httpx.post(front.base + "/api/chat", json={"model": "sql-helper:latest", "stream": False,
                                                         "messages": [{"role": "user", "content": "hi"}]},
                        headers=auth("admin"))
    assert ollama.status_code == 200 and tiny.served == 3


def test_adapters_are_listed_with_their_parent(fronts: Any) -> None:
    front = fronts[0]
    data = {m["id"]: m for m in httpx.get(front.base + "/v1/models", headers=auth("admin")).json()["data"]}
    assert set(data) == {"tiny", "sql-helper", "other"}
    assert data["sql-helper"]["parent"] == "tiny" and "parent" not in data["tiny"]
    assert data["sql-helper"]["state"] == "awake"  # loaded in its parent's awake vLLM
    tags = {m["name"]: m for m in httpx.get(front.base + "/api/tags", headers=auth("admin")).json()["models"]}
    assert tags["sql-helper:latest"]["details"]["parent_model"] == "tiny:latest"
    ps = {m["name"] for m in httpx.get(front.base + "/api/ps", headers=auth("admin")).json()["models"]}
    assert ps == {"tiny:latest", "sql-helper:latest", "other:latest"}


def test_a_key_scoped_to_an_adapter_uses_it_and_not_its_parent(fronts: Any) -> None:
    front = fronts[0]
    ids = [m["id"] for m in httpx.get(front.base + "/v1/models", headers=auth("sql")).json()["data"]]
    assert ids == ["sql-helper"]
    assert httpx.post(front.base + "/v1/completions", json={"model": "sql-helper"}, headers=auth("sql")).status_code \
        == 200
    denied = httpx.post(front.base + "/v1/completions", json={"model": "tiny"}, headers=auth("sql"))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"


def test_an_adapter_its_parent_s_vllm_lacks_shows_loading_or_failed_with_the_reason() -> None:
    from serve_app.openai_api import _adapter_state

    awake = {"state": "awake", "since": 1.0}
    assert _adapter_state(awake, {"adapters": {"a": "not loaded yet"}}, "a")["state"] == "loading"
    failed = _adapter_state(awake, {"adapters": {"a": "loading adapter 'a' from /x failed: no such folder"}}, "a")
    assert failed["state"] == "failed" and failed["reason"].endswith("no such folder")
    asleep = {"state": "asleep", "since": 1.0}
    assert _adapter_state(asleep, {"adapters": {"a": "not loaded yet"}}, "a") == asleep  # as its parent
