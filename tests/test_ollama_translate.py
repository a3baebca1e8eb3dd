"""Ollama ↔ OpenAI translation (serve_app/ollama.py), table-driven over plain dicts: no Ray, no vLLM."""

from __future__ import annotations

import json

import pytest

from serve_app import ollama

MODELS = {"emb": {"task": "embed", "always_on": True}, "chat": {"task": "generate", "always_on": False}}


@pytest.mark.parametrize(("name", "model"), [
    ("chat", "chat"), ("chat:latest", "chat"), ("emb:latest", "emb"), ("chat:7b", None), ("nope", None),
])
def test_ollama_names_map_to_fleet_models(name: str, model: str | None) -> None:
    assert ollama.fleet_model(name, MODELS) == model


def test_tags_list_every_model_and_ps_only_running_ones() -> None:
    listed = ollama.tags(MODELS, "2026-01-01T00:00:00Z")["models"]
    assert [m["name"] for m in listed] == ["chat:latest", "emb:latest"]  # chat first: UIs pick the first
    assert listed[0]["digest"] != listed[1]["digest"]
    running = ollama.ps(MODELS, {"chat": ("starting", ""), "emb": ("ready", "")})["models"]
    assert [m["name"] for m in running] == ["emb:latest"]


@pytest.mark.parametrize(("spec", "caps"), [
    ({"task": "embed"}, ["embedding"]),
    ({"task": "generate"}, ["completion"]),
    ({"task": "generate", "tool_parser": "hermes"}, ["completion", "tools"]),
])
def test_capabilities_tell_embedders_from_chat_models(spec: dict[str, str], caps: list[str]) -> None:
    assert ollama.capabilities(spec) == caps
    assert ollama.show("m", spec, "t")["capabilities"] == caps


@pytest.mark.parametrize(("options", "expected"), [
    (None, {}),
    ({"temperature": 0, "num_predict": 5, "stop": "\n", "seed": 1},
     {"temperature": 0, "max_tokens": 5, "stop": ["\n"], "seed": 1}),
    ({"num_predict": -1, "num_ctx": 4096, "repeat_penalty": 1.1}, {"repetition_penalty": 1.1}),
])
def test_options_become_sampling_fields(options: dict[str, object] | None, expected: dict[str, object]) -> None:
    assert ollama.sampling(options) == expected


def test_chat_request_streams_by_default_and_asks_for_usage() -> None:
    body = ollama.chat_request({"model": "chat:latest", "messages": [{"role": "user", "content": "hi"}]}, "chat")
    assert body == {"model": "chat", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]}
    body = ollama.chat_request({"messages": [], "stream": False, "format": "json"}, "chat")
    assert body["stream"] is False and "stream_options" not in body
    assert body["response_format"] == {"type": "json_object"}


def test_chat_request_images_and_tool_round_trip() -> None:
    req = {"messages": [
        {"role": "user", "content": "see", "images": ["AAAA"]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "42", "tool_name": "f"},
    ], "tools": [{"type": "function", "function": {"name": "f"}}]}
    body = ollama.chat_request(req, "chat")
    user, assistant, tool = body["messages"]
    assert user["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    call = assistant["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"x": 1}
    assert tool["tool_call_id"] == call["id"]
    assert body["tools"] == req["tools"]
    # A model whose engine has no tool-call parser still chats: its tools are left out (vLLM would refuse).
    assert "tools" not in ollama.chat_request(req, "chat", takes_tools=False)


def test_generate_uses_the_chat_template_unless_raw() -> None:
    path, body = ollama.generate_request({"prompt": "p", "system": "s", "stream": False}, "chat")
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]
    path, body = ollama.generate_request({"prompt": "p", "raw": True}, "chat")
    assert (path, body["prompt"]) == ("/v1/completions", "p")


def test_non_streamed_answers() -> None:
    openai = {"choices": [{"message": {"content": "Paris", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": '{"a": 2}'}}]}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    chat = ollama.chat_response("chat", openai, 1000)
    assert chat["message"]["content"] == "Paris" and chat["done"] is True
    assert chat["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 2}}}]
    assert (chat["done_reason"], chat["prompt_eval_count"], chat["eval_count"]) == ("length", 7, 3)
    gen = ollama.generate_response("chat", {"choices": [{"text": "x", "finish_reason": "stop"}]}, 1)
    assert (gen["response"], gen["done_reason"]) == ("x", "stop")


def test_embeddings_both_shapes() -> None:
    assert ollama.embed_request({"input": ["a", "b"]}, "emb") == {
        "model": "emb", "input": ["a", "b"], "truncate_prompt_tokens": -1}
    assert ollama.embed_request({"prompt": "a", "truncate": False}, "emb") == {"model": "emb", "input": "a"}
    openai = {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}], "usage": {}}
    assert ollama.embed_response("emb", openai, 1)["embeddings"] == [[1.0], [2.0]]
    assert ollama.embeddings_response(openai) == {"embedding": [2.0]}


def test_stream_translation_text_tools_and_final_counts() -> None:
    t = ollama.StreamTranslator("chat", "chat", 0)
    lines = [ollama.sse_data(x) for x in [
        'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}',
        "",
        'data: {"choices": [{"delta": {"content": "Pa"}}]}',
        'data: {"choices": [{"delta": {"content": "ris"}}]}',
        'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, '
        '"function": {"name": "f", "arguments": "{\\"a\\""}}]}}]}',
        'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, '
        '"finish_reason": "tool_calls"}]}',
        'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}',
        "data: [DONE]",
    ]]
    out = [piece for chunk in lines if chunk is not None for piece in t.feed(chunk)]
    assert [p["message"]["content"] for p in out] == ["Pa", "ris", ""]
    assert out[-1]["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]
    assert not any(p["done"] for p in out)
    last = t.done()
    assert (last["done"], last["done_reason"], last["eval_count"]) == (True, "stop", 2)

    g = ollama.StreamTranslator("chat", "generate", 0)
    assert [p["response"] for p in g.feed({"choices": [{"text": "x", "index": 0}]})] == ["x"]
    assert g.done()["context"] == []


@pytest.mark.parametrize(("body", "message"), [
    (b'{"error": {"message": "too long", "type": "BadRequestError"}}', "too long"),
    (b'{"object": "error", "message": "bad", "code": 400}', "bad"),
    (b'{"error": "plain"}', "plain"),
    (b"oops", "oops"),
])
def test_error_messages_become_ollama_shape(body: bytes, message: str) -> None:
    assert ollama.error_message(400, body) == message
