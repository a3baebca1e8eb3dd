"""An engine that listens on the network answers the fleet's routers only: every path needs the token.

The live check (a real vLLM on a second Ray node) is tests/serve_apply/test_nodes.py; this one is the
middleware alone, in front of a stand-in ASGI app, and the reading of Serve's "waiting" message.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve_app.contract import ENGINE_TOKEN_ENV, ENGINE_TOKEN_HEADER, missing_node
from serve_app.engine_auth import RequireFleetToken

TOKEN = "t0ken-for-this-test"
PATHS = ["/v1/models", "/v1/chat/completions", "/metrics", "/health", "/load", "/sleep", "/wake_up",
         "/tokenize", "/version", "/metrics/"]


async def _inner(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"inner"})


def call(method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    """One request through the middleware (the token in the environment, as vLLM's child has it)."""
    async def go() -> httpx.Response:
        app = RequireFleetToken(_inner)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://e") as c:
            return await c.request(method, path, headers=headers)
    return asyncio.run(go())


@pytest.fixture(autouse=True)
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE_TOKEN_ENV, TOKEN)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("headers", [{}, {ENGINE_TOKEN_HEADER: "wrong"}, {"Authorization": f"Bearer {TOKEN}"}],
                         ids=["none", "wrong", "as-bearer"])
def test_every_path_refuses_without_the_token(path: str, headers: dict[str, str]) -> None:
    for method in ("GET", "POST"):
        r = call(method, path, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_the_token_lets_the_request_through() -> None:
    r = call("POST", "/v1/chat/completions", {ENGINE_TOKEN_HEADER: TOKEN})
    assert (r.status_code, r.text) == (200, "inner")


def test_an_engine_without_a_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_TOKEN_ENV, raising=False)
    with pytest.raises(RuntimeError, match=ENGINE_TOKEN_ENV):
        RequireFleetToken(_inner)


WAITING = ("Deployment 'engine' in application 'far' has 1 replicas that have taken more than 5s to be scheduled. "
           "This may be due to waiting for the cluster to auto-scale or for a runtime environment to be installed. "
           'Resources required for each replica: {{"CPU": 0.0, "node:127.0.0.2": 0.001}}, total resources '
           'available: {{"CPU": 4.0, {avail}"memory": 1.0}}. Use `ray status` for more details.')


def test_a_replica_waiting_for_a_gone_node_names_the_node() -> None:
    assert missing_node(WAITING.format(avail="")) == "127.0.0.2"
    assert missing_node(WAITING.format(avail='"node:127.0.0.2": 0.999, ')) is None  # there, merely busy
    assert missing_node("Failed to update the deployments ['engine'].") is None
