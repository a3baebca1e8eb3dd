"""The real `ollama` Python client against the fleet's port: list, chat (streamed and not), generate, embed."""

from __future__ import annotations

import httpx
import pytest

from .conftest import CHAT, EMBED, ClientFleet

pytestmark = pytest.mark.serve
ollama = pytest.importorskip("ollama", reason="the ollama package is not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def client(client_fleet: ClientFleet) -> ollama.Client:
    return ollama.Client(host=client_fleet.endpoint, timeout=600)


def test_list_shows_fleet_models_and_show_tells_embedders_apart(client: ollama.Client) -> None:
    names = sorted(m.model for m in client.list().models)
    assert names == sorted([f"{CHAT}:latest", f"{EMBED}:latest"])
    assert "embedding" in (client.show(EMBED).capabilities or [])
    assert "completion" in (client.show(f"{CHAT}:latest").capabilities or [])


def test_chat_not_streamed(client: ollama.Client) -> None:
    reply = client.chat(model=CHAT, messages=[{"role": "user", "content": "What is the capital of France?"}],
                        stream=False, options={"temperature": 0, "num_predict": 20})
    assert "Paris" in reply.message.content
    assert reply.done and reply.eval_count and reply.eval_count <= 20


def test_chat_streamed(client: ollama.Client) -> None:
    parts = list(client.chat(model=f"{CHAT}:latest", stream=True, options={"temperature": 0, "num_predict": 20},
                             messages=[{"role": "user", "content": "What is the capital of France?"}]))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "Paris" in "".join(p.message.content for p in parts)


def test_generate_and_ps(client: ollama.Client) -> None:
    reply = client.generate(model=CHAT, prompt="What is the capital of France?",
                            options={"temperature": 0, "num_predict": 20})
    assert "Paris" in reply.response
    assert f"{CHAT}:latest" in [m.model for m in client.ps().models]


def test_embed_both_endpoints(client: ollama.Client) -> None:
    vectors = client.embed(model=EMBED, input=["hello", "world"]).embeddings
    assert [len(v) for v in vectors] == [384, 384]
    assert len(client.embeddings(model=EMBED, prompt="hello").embedding) == 384


def test_errors_have_ollamas_shape(client: ollama.Client, client_fleet: ClientFleet) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and "no-such-model" in err.value.error
    r = httpx.post(client_fleet.endpoint + "/api/chat", json={"model": EMBED, "stream": False,
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code >= 400 and isinstance(r.json()["error"], str)
