"""The OpenAI endpoint of a two-model fleet, as a client sees it (real Ray Serve + vLLM, CPU)."""

from __future__ import annotations

import math
import time

import httpx
import openai
import pytest

from tests.fixtures.prom import metric
from tests.serve.conftest import EMB, GEN, Fleet, engine_info

pytestmark = pytest.mark.serve


def test_models_lists_the_fleet_with_task_and_state(fleet: Fleet) -> None:
    assert {m.id for m in fleet.client().models.list()} == {GEN, EMB}
    data = httpx.get(fleet.base_url + "/models").json()["data"]
    assert {(m["id"], m["task"], m["state"]) for m in data} == {(GEN, "generate", "awake"), (EMB, "embed", "awake")}
    assert all(m["since"] > 0 for m in data)


def test_chat(fleet: Fleet) -> None:
    reply = fleet.client().chat.completions.create(
        model=GEN, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8
    )
    assert reply.model == GEN
    assert isinstance(reply.choices[0].message.content, str)
    assert 0 < reply.usage.completion_tokens <= 8


def test_chat_stream(fleet: Fleet) -> None:
    stream = fleet.client().chat.completions.create(
        model=GEN, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 2  # arrives in pieces, not as one body
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_completions(fleet: Fleet) -> None:
    reply = fleet.client().completions.create(model=GEN, prompt="The quick brown", max_tokens=5)
    assert reply.choices[0].text and reply.usage.completion_tokens <= 5


def test_embeddings(fleet: Fleet) -> None:
    texts = ["a cat sat on the mat", "a cat sat on the mat", "quarterly tax filing deadlines"]
    vectors = [d.embedding for d in fleet.client().embeddings.create(model=EMB, input=texts).data]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert [len(v) for v in vectors] == [384, 384, 384]
    assert cosine(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-5)
    assert cosine(vectors[0], vectors[2]) < 0.9


def test_tokenize_is_relayed_per_model(fleet: Fleet) -> None:
    answer = httpx.post(fleet.base_url.removesuffix("/v1") + "/tokenize", json={"model": GEN, "prompt": "hello"})
    assert answer.status_code == 200 and answer.json()["tokens"]


def test_unknown_model_is_a_404_that_names_the_models(fleet: Fleet) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        fleet.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.response.json()["error"]
    assert error["code"] == "model_not_found" and GEN in error["message"] and EMB in error["message"]
    assert set(error) >= {"message", "type", "code"}


def test_request_id_goes_through_and_is_made_when_absent(fleet: Fleet) -> None:
    body = {"model": EMB, "input": "hi"}
    given = httpx.post(fleet.base_url + "/embeddings", json=body, headers={"X-Request-Id": "req-123"})
    assert given.headers["x-request-id"] == "req-123"
    assert given.json()["id"].endswith("req-123")  # vLLM used it as its own request id
    made = httpx.post(fleet.base_url + "/embeddings", json=body)
    assert made.headers["x-request-id"]


def test_abandoned_stream_is_aborted_in_vllm(fleet: Fleet, ray_driver: None) -> None:
    metrics_url = engine_info(GEN)["url"] + "/metrics"
    tokens_before = metric(httpx.get(metrics_url).text, "vllm:generation_tokens_total")
    max_tokens = 1000
    body = {
        "model": GEN, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with httpx.stream("POST", fleet.base_url + "/completions", json=body, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")
    # Leaving the block closed the connection after the first chunk: vLLM must stop generating.
    deadline = time.monotonic() + 60
    text = httpx.get(metrics_url).text
    while metric(text, "vllm:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        text = httpx.get(metrics_url).text
    assert metric(text, "vllm:num_requests_running") == 0
    time.sleep(2.0)  # let the counters settle (they are flushed per engine step)
    text = httpx.get(metrics_url).text
    assert metric(text, "vllm:generation_tokens_total") - tokens_before < max_tokens


def _without_keys(fleet: Fleet) -> None:
    """The shared fleet back as the other tests use it: no API keys, /v1/models open again."""
    fleet.apply()
    deadline = time.monotonic() + 60
    while httpx.get(fleet.base_url + "/models").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)


def test_api_key_is_required_when_configured(fleet: Fleet, api_key: str) -> None:
    from tests.fixtures.serve_api import replicas, wait_running
    from tests.serve.conftest import TEST_API_KEY_ENV

    router_before = {r["replica_id"] for r in replicas(fleet.dashboard, "router", "router")}
    fleet.apply(api_keys=[TEST_API_KEY_ENV])
    try:
        deadline = time.monotonic() + 60  # the PUT returns before the router is reconfigured
        while httpx.get(fleet.base_url + "/models").status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.5)
        with pytest.raises(openai.AuthenticationError):
            fleet.client("wrong-key").embeddings.create(model=EMB, input="hi")
        with pytest.raises(openai.AuthenticationError):
            fleet.client("wrong-key").models.list()
        assert len(fleet.client(api_key).embeddings.create(model=EMB, input="hi").data[0].embedding) == 384
        # In place: same router replica (read once the router has settled: while Serve updates
        # its config, the dashboard may list the replica as updating, or not at all).
        wait_running(fleet.dashboard, ["router"])
        assert {r["replica_id"] for r in replicas(fleet.dashboard, "router", "router")} == router_before
    finally:
        _without_keys(fleet)


def test_scoped_keys_forbid_other_models_filter_the_lists_and_limit_the_rate(fleet: Fleet, api_key: str) -> None:
    """One key scoped to the chat model with rpm 3, applied in place: the embedding model is 403 (OpenAI's and
    Ollama's shapes) and unlisted, and the 4th request to a model in a minute is 429 with Retry-After."""
    from tests.fixtures.serve_api import replicas, wait_running
    from tests.serve.conftest import TEST_API_KEY_ENV

    router_before = {r["replica_id"] for r in replicas(fleet.dashboard, "router", "router")}
    fleet.apply(api_keys=[{"env": TEST_API_KEY_ENV, "models": [GEN], "rpm": 3}])
    headers = {"Authorization": f"Bearer {api_key}"}
    root = fleet.base_url.removesuffix("/v1")
    try:
        deadline = time.monotonic() + 60  # the PUT returns before the router is reconfigured
        while time.monotonic() < deadline:
            listed = httpx.get(fleet.base_url + "/models", headers=headers)
            if listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {GEN}:
                break
            time.sleep(0.5)
        assert {m.id for m in fleet.client(api_key).models.list()} == {GEN}
        assert [m["name"] for m in httpx.get(root + "/api/tags", headers=headers).json()["models"]] == [f"{GEN}:latest"]
        with pytest.raises(openai.PermissionDeniedError) as caught:
            fleet.client(api_key).embeddings.create(model=EMB, input="hi")
        assert caught.value.response.json()["error"]["code"] == "model_not_allowed"
        ollama_denied = httpx.post(root + "/api/embed", json={"model": EMB, "input": "hi"}, headers=headers)
        assert ollama_denied.status_code == 403 and GEN in ollama_denied.json()["error"]
        for _ in range(3):  # the denied requests above did not count
            reply = fleet.client(api_key).completions.create(model=GEN, prompt="Hello", max_tokens=2)
            assert reply.choices[0].text is not None
        with pytest.raises(openai.RateLimitError) as limited:
            fleet.client(api_key).completions.create(model=GEN, prompt="Hello", max_tokens=2)
        assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
        assert limited.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        wait_running(fleet.dashboard, ["router"])  # in place: the same router replica
        assert {r["replica_id"] for r in replicas(fleet.dashboard, "router", "router")} == router_before
    finally:
        _without_keys(fleet)
