"""Ollama's API on the fleet's port, translated onto the engines' OpenAI endpoints.

Tools that speak only Ollama (its CLI clients, the `ollama` Python library, OpenWebUI's Ollama
connection) reach the same engines, with the same API keys, as OpenAI clients do:

    /api/tags, /api/ps, /api/show, /api/version      answered from the router's model list
    /api/chat, /api/generate                         → /v1/chat/completions (raw generate: /v1/completions)
    /api/embed, /api/embeddings                      → /v1/embeddings

Streaming answers are NDJSON (one JSON object a line, the last with ``"done": true``), translated
chunk by chunk from vLLM's SSE. Errors have Ollama's shape ``{"error": "<message>"}``. A fleet
model ``name`` is listed as ``name:latest`` and is asked for by either spelling. A request for a
model that is not running waits for it to load, as Ollama does; ``keep_alive`` is ignored
(``idle_timeout`` in the fleet file decides unloading).

The translation functions are pure (dicts in, dicts out); only ``handle`` does I/O, through the
small ``Upstream`` interface the router implements.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any, Protocol

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

# The Ollama API version we answer to /api/version; clients gate features on it (0.5: structured
# outputs, tools in streams).
VERSION = "0.9.0"
TAG = ":latest"
NDJSON = "application/x-ndjson"
# Ollama `options` that map 1:1 onto vLLM sampling parameters of the same name.
SAME_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty")


class UpstreamUnavailable(Exception):
    """The model's engine cannot take the request now; the message says why."""


class Upstream(Protocol):
    """What the router lends this module: its settings, engine states and the relay."""

    models: dict[str, dict[str, Any]]

    def authorized(self, header: str | None) -> bool: ...

    async def states(self) -> dict[str, tuple[str, str]]: ...

    async def load(self, model: str) -> None: ...

    async def post(self, model: str, path: str, body: dict[str, Any], request_id: str) -> httpx.Response: ...


# ---- names and listings ----


def ollama_name(model: str) -> str:
    return model + TAG


def fleet_model(name: str, models: dict[str, Any]) -> str | None:
    """The fleet model an Ollama name means (``x`` or ``x:latest``), or None."""
    if name in models:
        return name
    if name.endswith(TAG) and name[: -len(TAG)] in models:
        return name[: -len(TAG)]
    return None


def _digest(model: str) -> str:
    # Stable per name: clients use the digest only to tell models apart.
    return hashlib.sha256(model.encode()).hexdigest()


def _details(spec: dict[str, Any]) -> dict[str, Any]:
    family = "bert" if spec.get("task") == "embed" else ""
    parent = ollama_name(spec["parent"]) if spec.get("parent") else ""  # a LoRA adapter's base model
    return {"parent_model": parent, "format": "", "family": family, "families": [family] if family else None,
            "parameter_size": "", "quantization_level": ""}


def capabilities(spec: dict[str, Any]) -> list[str]:
    """Ollama's capability words: what OpenWebUI and others use to tell embedders from chat models."""
    if spec.get("task") == "embed":
        return ["embedding"]
    return ["completion", "tools"] if spec.get("tool_parser") else ["completion"]


def tags(models: dict[str, dict[str, Any]], modified_at: str) -> dict[str, Any]:
    """GET /api/tags: every fleet model, loaded or not (Ollama lists what it *can* run).

    Chat models first: UIs preselect the first model listed.
    """
    return {"models": [
        {"name": ollama_name(m), "model": ollama_name(m), "modified_at": modified_at, "size": 0,
         "digest": _digest(m), "details": _details(spec)}
        for m, spec in sorted(models.items(), key=lambda kv: (kv[1].get("task") == "embed", kv[0]))
    ]}


def ps(models: dict[str, dict[str, Any]], states: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """GET /api/ps: the models whose engines are running now."""
    return {"models": [
        {"name": ollama_name(m), "model": ollama_name(m), "size": 0, "digest": _digest(m),
         "details": _details(spec), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}
        for m, spec in sorted(models.items())
        if states.get(m, ("absent", ""))[0] == "ready"
    ]}


def show(model: str, spec: dict[str, Any], modified_at: str) -> dict[str, Any]:
    """POST /api/show: what the fleet knows of one model (no Modelfile: vLLM applies the template)."""
    return {"modelfile": "", "parameters": "", "template": "", "details": _details(spec),
            "model_info": {"general.basename": model}, "capabilities": capabilities(spec),
            "modified_at": modified_at}


# ---- requests: Ollama → OpenAI ----


def sampling(options: dict[str, Any] | None) -> dict[str, Any]:
    """Ollama ``options`` → OpenAI/vLLM sampling fields. num_ctx is the engine's (max_model_len)."""
    options = options or {}
    out = {k: options[k] for k in SAME_OPTIONS if options.get(k) is not None}
    if isinstance(options.get("stop"), str):
        out["stop"] = [options["stop"]]
    num_predict = options.get("num_predict")
    if isinstance(num_predict, int) and num_predict >= 0:  # -1: unbounded, -2: fill the context
        out["max_tokens"] = num_predict
    if options.get("repeat_penalty") is not None:
        out["repetition_penalty"] = options["repeat_penalty"]
    return out


def response_format(fmt: Any) -> dict[str, Any] | None:
    """Ollama ``format``: "json" or a JSON schema."""
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    return None


def _content(text: str, images: list[str] | None) -> Any:
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}} for b64 in images]
    return parts


def _message(msg: dict[str, Any], index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"role": msg.get("role", "user"),
                           "content": _content(msg.get("content") or "", msg.get("images"))}
    calls = msg.get("tool_calls")
    if calls:
        out["tool_calls"] = [
            {"id": f"call_{index}_{i}", "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"].get("arguments", {}))}}
            for i, c in enumerate(calls)
        ]
    if out["role"] == "tool":
        # Ollama ties a result to its call by order/name; OpenAI by id: point at the latest call of that name.
        out["tool_call_id"] = msg.get("tool_call_id") or f"call_{msg.get('tool_name', '')}"
    return out


def _link_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each tool result the id of the assistant tool call it answers (in order, by name)."""
    pending: list[tuple[str, str]] = []  # (name, id) of calls not yet answered
    for msg in messages:
        for call in msg.get("tool_calls", []):
            pending.append((call["function"]["name"], call["id"]))
        if msg["role"] == "tool" and pending:
            wanted = msg["tool_call_id"].removeprefix("call_")
            match = next((p for p in pending if p[0] == wanted), pending[0])
            pending.remove(match)
            msg["tool_call_id"] = match[1]
    return messages


def _common(req: dict[str, Any], model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, **sampling(req.get("options"))}
    stream = req.get("stream", True) is not False  # Ollama streams unless told not to
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    fmt = response_format(req.get("format"))
    if fmt:
        body["response_format"] = fmt
    if req.get("think") is not None:
        body["chat_template_kwargs"] = {"enable_thinking": bool(req["think"])}
    return body


def chat_request(req: dict[str, Any], model: str, takes_tools: bool = True) -> dict[str, Any]:
    """POST /api/chat body → /v1/chat/completions body.

    ``takes_tools``: the engine has a tool-call parser. Without one, vLLM refuses any request that
    carries tools, so they are left out and the model simply chats: OpenWebUI's Ollama connection
    sends its built-in tools with every chat, and (unlike /v1/models) /api/tags has no field that
    tells it not to."""
    body = _common(req, model)
    body["messages"] = _link_tool_results([_message(m, i) for i, m in enumerate(req.get("messages") or [])])
    if req.get("tools") and takes_tools:
        body["tools"] = req["tools"]
    return body


def generate_request(req: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """POST /api/generate body → (OpenAI path, body): chat with the model's template, or raw completion."""
    body = _common(req, model)
    prompt = req.get("prompt") or ""
    if req.get("raw"):
        body["prompt"] = prompt
        body.pop("response_format", None)
        return "/v1/completions", body
    messages = [{"role": "system", "content": req["system"]}] if req.get("system") else []
    messages.append({"role": "user", "content": _content(prompt, req.get("images"))})
    body["messages"] = messages
    return "/v1/chat/completions", body


def embed_request(req: dict[str, Any], model: str) -> dict[str, Any]:
    """POST /api/embed ({input: str | [str]}) or /api/embeddings ({prompt}) → /v1/embeddings body."""
    text = req.get("input", req.get("prompt", ""))
    body: dict[str, Any] = {"model": model, "input": text}
    if req.get("dimensions"):
        body["dimensions"] = req["dimensions"]
    if req.get("truncate") is not False:
        body["truncate_prompt_tokens"] = -1  # Ollama truncates to the context by default
    return body


# ---- responses: OpenAI → Ollama ----


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {"_raw": fn.get("arguments")}
        out.append({"function": {"name": fn.get("name", ""), "arguments": args}})
    return out


def _counts(usage: dict[str, Any] | None, elapsed_ns: int) -> dict[str, Any]:
    usage = usage or {}
    return {"total_duration": elapsed_ns, "load_duration": 0,
            "prompt_eval_count": usage.get("prompt_tokens", 0), "prompt_eval_duration": 0,
            "eval_count": usage.get("completion_tokens", 0), "eval_duration": elapsed_ns}


def _reasoning(part: dict[str, Any]) -> str:
    return str(part.get("reasoning_content") or part.get("reasoning") or "")


def chat_response(model: str, openai: dict[str, Any], elapsed_ns: int) -> dict[str, Any]:
    """A /v1/chat/completions answer → an /api/chat answer."""
    choice = (openai.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    if _reasoning(msg):
        message["thinking"] = _reasoning(msg)
    if msg.get("tool_calls"):
        message["tool_calls"] = _tool_calls(msg["tool_calls"])
    return {"model": model, "created_at": now_iso(), "message": message, "done": True,
            "done_reason": _done_reason(choice.get("finish_reason")), **_counts(openai.get("usage"), elapsed_ns)}


def generate_response(model: str, openai: dict[str, Any], elapsed_ns: int) -> dict[str, Any]:
    """A chat or completions answer → an /api/generate answer."""
    choice = (openai.get("choices") or [{}])[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("message") or {}).get("content") or ""
    out = {"model": model, "created_at": now_iso(), "response": text, "done": True,
           "done_reason": _done_reason(choice.get("finish_reason")), "context": [],
           **_counts(openai.get("usage"), elapsed_ns)}
    reasoning = _reasoning(choice.get("message") or {})
    if reasoning:
        out["thinking"] = reasoning
    return out


def embed_response(model: str, openai: dict[str, Any], elapsed_ns: int) -> dict[str, Any]:
    data = sorted(openai.get("data") or [], key=lambda d: d.get("index", 0))
    return {"model": model, "embeddings": [d["embedding"] for d in data], "total_duration": elapsed_ns,
            "load_duration": 0, "prompt_eval_count": (openai.get("usage") or {}).get("prompt_tokens", 0)}


def embeddings_response(openai: dict[str, Any]) -> dict[str, Any]:
    data = openai.get("data") or [{"embedding": []}]
    return {"embedding": data[0]["embedding"]}


class StreamTranslator:
    """OpenAI stream chunks (parsed SSE ``data:``) → Ollama NDJSON objects, for chat or generate.

    Tool-call fragments are gathered and sent whole in one message once the choice finishes, as
    Ollama sends them; the final ``done`` object carries the usage counts.
    """

    def __init__(self, model: str, kind: str, started_ns: int) -> None:
        self.model, self.kind, self.started_ns = model, kind, started_ns
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}

    def _piece(self, content: str = "", thinking: str = "", tool_calls: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_iso(), "done": False}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        return out

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = choice.get("text") if "text" in choice else delta.get("content")
            for call in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
                fn = call.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if text or _reasoning(delta):
                out.append(self._piece(content=text or "", thinking=_reasoning(delta)))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                if self.calls:
                    calls = [self.calls[i] for i in sorted(self.calls)]
                    out.append(self._piece(tool_calls=_tool_calls(calls)))
                    self.calls = {}
        return out

    def done(self) -> dict[str, Any]:
        elapsed = time.monotonic_ns() - self.started_ns
        last = {**self._piece(), "done": True, "done_reason": _done_reason(self.finish),
                **_counts(self.usage, elapsed)}
        if self.kind == "generate":
            last["context"] = []
        return last


def error_message(status: int, body: bytes) -> str:
    """The message of an OpenAI-shaped (or vLLM-shaped) error body, for Ollama's ``{"error": ...}``."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:2000] or f"HTTP {status}"
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if isinstance(err, str):
        return err
    if isinstance(payload, dict) and (payload.get("message") or payload.get("detail")):
        return str(payload.get("message") or payload["detail"])
    return f"HTTP {status}"


def sse_data(line: str) -> dict[str, Any] | None:
    """One SSE line → its JSON data, or None for blank lines, comments and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    parsed = json.loads(data)
    return parsed if isinstance(parsed, dict) else None


# ---- I/O: the HTTP handler the router mounts ----


def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _ndjson(upstream: httpx.Response, translator: StreamTranslator) -> AsyncIterator[bytes]:
    try:
        async for line in upstream.aiter_lines():
            chunk = sse_data(line)
            if chunk is None:
                continue
            if "error" in chunk:  # vLLM reports a failure mid-stream as a data event
                yield (json.dumps({"error": error_message(500, json.dumps(chunk).encode())}) + "\n").encode()
                return
            for piece in translator.feed(chunk):
                yield (json.dumps(piece) + "\n").encode()
        yield (json.dumps(translator.done()) + "\n").encode()
    finally:
        await upstream.aclose()


async def _relay(up: Upstream, model: str, path: str, body: dict[str, Any], request_id: str, kind: str,
                 respond: Callable[[dict[str, Any], int], dict[str, Any]]) -> Response:
    started = time.monotonic_ns()
    try:
        upstream = await up.post(model, path, body, request_id)
    except UpstreamUnavailable as e:
        return ollama_error(503, str(e))
    if upstream.status_code >= 400:
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        return ollama_error(upstream.status_code, error_message(upstream.status_code, content))
    if body.get("stream"):
        translator = StreamTranslator(model, kind, started)
        return StreamingResponse(_ndjson(upstream, translator), media_type=NDJSON)
    try:
        content = await upstream.aread()
    finally:
        await upstream.aclose()
    return JSONResponse(respond(json.loads(content), time.monotonic_ns() - started))


async def handle(request: Request, up: Upstream, request_id: str) -> Response:
    """Answer one request under /api/ (or the root probe) in Ollama's terms."""
    path = request.url.path.rstrip("/") or "/"
    if path == "/":
        return PlainTextResponse("Ollama is running")
    if path == "/api/version":
        return JSONResponse({"version": VERSION})
    if not up.authorized(request.headers.get("authorization")):
        return ollama_error(401, "unauthorized: invalid or missing API key")
    models = up.models
    started = now_iso()
    if path == "/api/tags" and request.method == "GET":
        return JSONResponse(tags(models, started))
    if path == "/api/ps" and request.method == "GET":
        return JSONResponse(ps(models, await up.states()))
    if request.method != "POST":
        return ollama_error(405, f"method {request.method} not allowed on {path}")
    try:
        req = json.loads(await request.body() or b"{}")
        if not isinstance(req, dict):
            raise ValueError("not an object")
    except ValueError as e:
        return ollama_error(400, f"invalid JSON body: {e}")
    name = str(req.get("model") or req.get("name") or "")
    if not name:
        return ollama_error(400, "model is required")
    model = fleet_model(name, models)
    if model is None:
        known = ", ".join(ollama_name(m) for m in sorted(models)) or "(none)"
        return ollama_error(404, f'model "{name}" not found; this fleet serves: {known}')
    spec = models[model]
    task = spec.get("task", "generate")
    if (path in ("/api/chat", "/api/generate") and task == "embed") or (
            path in ("/api/embed", "/api/embeddings") and task != "embed"):
        verb = {"/api/chat": "chat", "/api/generate": "generate"}.get(path, "embeddings")
        return ollama_error(400, f'"{name}" does not support {verb} (fleet task: {task})')
    if path == "/api/show":
        return JSONResponse(show(model, spec, started))
    if path == "/api/chat":
        if not req.get("messages"):  # Ollama's "load the model" idiom
            return await _load(up, model, {"message": {"role": "assistant", "content": ""}})
        return await _relay(up, model, "/v1/chat/completions", chat_request(req, model, bool(spec.get("tool_parser"))),
                            request_id, "chat",
                            lambda r, ns: chat_response(model, r, ns))
    if path == "/api/generate":
        if not req.get("prompt") and not req.get("images"):
            return await _load(up, model, {"response": ""})
        upstream_path, body = generate_request(req, model)
        return await _relay(up, model, upstream_path, body, request_id, "generate",
                            lambda r, ns: generate_response(model, r, ns))
    if path == "/api/embed":
        return await _relay(up, model, "/v1/embeddings", embed_request(req, model), request_id, "embed",
                            lambda r, ns: embed_response(model, r, ns))
    if path == "/api/embeddings":
        return await _relay(up, model, "/v1/embeddings", embed_request(req, model), request_id, "embed",
                            lambda r, ns: embeddings_response(r))
    if path in ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"):
        return ollama_error(501, f"{path} is not served here: the fleet file (fleet.yaml) decides which models run")
    return ollama_error(404, f"{path} is not part of the Ollama API served here")


async def _load(up: Upstream, model: str, empty: dict[str, Any]) -> Response:
    """Load (wait for) the model and answer as Ollama does to an empty prompt."""
    try:
        await up.load(model)
    except UpstreamUnavailable as e:
        return ollama_error(503, str(e))
    return JSONResponse({"model": model, "created_at": now_iso(), **empty, "done": True, "done_reason": "load"})
