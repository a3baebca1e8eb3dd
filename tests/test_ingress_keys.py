"""Keys scoped to models, through the router's real HTTP front (no Ray): 403 and 429 in OpenAI's and
Ollama's shapes, listings filtered per key, Retry-After. Stand-in engines as in tests/test_ingress.py;
the same on real Ray Serve + vLLM: tests/serve/test_relay.py::test_scoped_keys_*."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from serve_app.keys import KeyRing
from tests.test_ingress import Engine, Front, _front

MODELS = {"tiny-chat": {"task": "generate"}, "tiny-coder": {"task": "generate"}, "minilm": {"task": "embed"}}
ADMIN, TEAM_A, TEAM_B = "admin-key-1", "team-a-key-1", "team-b-key-1"
RING = KeyRing.of({"ADMIN_KEY": ADMIN, "TEAM_A_KEY": TEAM_A, "TEAM_B_KEY": TEAM_B},
                  {"TEAM_A_KEY": {"models": ["tiny-*"]}, "TEAM_B_KEY": {"models": ["tiny-chat", "minilm"], "rpm": 3}})


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def front() -> Iterator[Front]:
    engine = Engine()
    engine.start()
    made = _front([engine], keyring=RING, models=MODELS)
    yield made
    made.server.stop()


def test_a_model_outside_the_key_s_scope_is_403_in_openai_s_shape(front: Front) -> None:
    denied = httpx.post(front.base + "/v1/embeddings", json={"model": "minilm", "input": "hi"}, headers=auth(TEAM_A))
    assert denied.status_code == 403
    assert denied.json() == {"error": {
        "message": "This API key may not use the model `minilm`. Models it may use: tiny-chat, tiny-coder.",
        "type": "invalid_request_error", "code": "model_not_allowed"}}
    ok = httpx.post(front.base + "/v1/completions", json={"model": "tiny-coder"}, headers=auth(TEAM_A))
    assert ok.status_code == 200 and ok.json()["model"] == "tiny-coder"
    admin = httpx.post(front.base + "/v1/embeddings", json={"model": "minilm", "input": "hi"}, headers=auth(ADMIN))
    assert admin.status_code == 200  # a bare name: every model


def test_unknown_model_404_names_only_the_key_s_models(front: Front) -> None:
    unknown = httpx.post(front.base + "/v1/completions", json={"model": "nope"}, headers=auth(TEAM_A))
    assert unknown.status_code == 404
    assert "tiny-chat, tiny-coder." in unknown.json()["error"]["message"]
    assert "minilm" not in unknown.json()["error"]["message"]


def test_model_lists_show_only_what_the_key_may_use(front: Front) -> None:
    def listed(key: str) -> tuple[set[str], set[str], set[str]]:
        openai_ids = {m["id"] for m in httpx.get(front.base + "/v1/models", headers=auth(key)).json()["data"]}
        tags = {m["name"] for m in httpx.get(front.base + "/api/tags", headers=auth(key)).json()["models"]}
        ps = {m["name"] for m in httpx.get(front.base + "/api/ps", headers=auth(key)).json()["models"]}
        return openai_ids, tags, ps

    assert listed(TEAM_A) == ({"tiny-chat", "tiny-coder"}, {"tiny-chat:latest", "tiny-coder:latest"},
                              {"tiny-chat:latest", "tiny-coder:latest"})
    assert listed(TEAM_B)[0] == {"tiny-chat", "minilm"}
    assert listed(ADMIN)[0] == set(MODELS)
    assert httpx.get(front.base + "/v1/models", headers=auth("wrong")).status_code == 401


def test_ollama_routes_answer_403_in_ollama_s_shape(front: Front) -> None:
    for path, body in (("/api/embed", {"model": "minilm", "input": "hi"}), ("/api/show", {"model": "minilm:latest"})):
        denied = httpx.post(front.base + path, json=body, headers=auth(TEAM_A))
        assert denied.status_code == 403 and denied.json() == {
            "error": "This API key may not use the model `minilm`. Models it may use: tiny-chat, tiny-coder."}
    loaded = httpx.post(front.base + "/api/chat", json={"model": "tiny-chat"}, headers=auth(TEAM_A))
    assert loaded.status_code == 200 and loaded.json()["done_reason"] == "load"


def test_past_rpm_the_key_gets_429_with_retry_after(front: Front) -> None:
    body = {"model": "tiny-chat"}
    answers = [httpx.post(front.base + "/v1/completions", json=body, headers=auth(TEAM_B)) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    limited = answers[-1]
    assert 55 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    error = limited.json()["error"]
    assert error["type"] == "requests" and "3 requests per minute" in error["message"]
    # Ollama's routes share the key's window, and answer in Ollama's shape
    ollama = httpx.post(front.base + "/api/chat", json=body, headers=auth(TEAM_B))
    assert ollama.status_code == 429 and int(ollama.headers["retry-after"]) >= 55 and "error" in ollama.json()
    # listing is not a request to a model: it still answers; other keys have their own window
    assert httpx.get(front.base + "/v1/models", headers=auth(TEAM_B)).status_code == 200
    assert httpx.post(front.base + "/v1/completions", json=body, headers=auth(ADMIN)).status_code == 200


def test_a_denied_request_never_reaches_an_engine_nor_counts() -> None:
    engine = Engine()
    engine.start()
    ring = KeyRing.of({"TEAM_B_KEY": TEAM_B}, {"TEAM_B_KEY": {"models": ["tiny-chat"], "rpm": 1}})
    made = _front([engine], keyring=ring, models=MODELS)
    try:
        for _ in range(3):
            assert httpx.post(made.base + "/v1/completions", json={"model": "tiny-coder"},
                              headers=auth(TEAM_B)).status_code == 403
        assert httpx.post(made.base + "/v1/completions", json={"model": "tiny-chat"},
                          headers=auth(TEAM_B)).status_code == 200
        time.sleep(0.05)
        assert engine.served == 1
    finally:
        made.server.stop()
