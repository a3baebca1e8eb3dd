"""The fleet's OpenAI endpoint: one Serve deployment (``router``) whose replicas serve HTTP themselves.

Each router replica runs its own HTTP server (uvicorn with uvloop and httptools, in a thread of
its own) on the fleet's OpenAI port, bound with SO_REUSEPORT: ``openai.workers`` replicas on a
node are that many processes sharing the port, and the kernel spreads connections over them.
Serve's own HTTP proxy is off (``proxy_location: Disabled``), so no request crosses a Ray actor
call: bytes go client → router process → the engine's vLLM server and back. It is still a Serve
app, so the reconciler starts, updates and stops it with the fleet like any other.

Inside a replica:
- ``Ingress`` (raw ASGI) answers the relay routes (``RELAY_PATHS``) itself: API key, the body's
  ``model``, one upstream request on a kept-alive connection (aiohttp), streamed back as it comes.
  Whatever else arrives goes to the FastAPI app ``api`` (``/v1/models``; other modules add routes
  there and reach the relay through ``request.app.state.relay``, see ``Relay.request``).
- ``Relay`` (in the server's loop) knows every engine replica's URL (``serve_app.endpoints``) and
  sends each request to the one of its model with the fewest requests in flight from this process.
- ``Router`` (the Serve deployment, in Serve's loop) does what needs Serve: finding a model's
  engine and waiting, bounded by ``load_timeout_s``, while it starts (``endpoint()`` on its
  handle, which also wakes it), the applications' states, and refreshing the URL registry.

Errors have OpenAI's shape ``{"error": {"message", "type", "code"}}``: unknown model → 404,
engine unavailable → 503 with the reason, missing/wrong API key → 401, a model outside the key's scope →
403, past its requests per minute → 429 with Retry-After (serve_app.keys). A model its engine unloaded
or put to sleep is brought back by the engine's ``endpoint()``, which the relay reaches when it
knows no URL or the known ones refuse; /v1/models shows each model's lifecycle state from the
engine's ``state()``. Only the OpenAI paths below are relayed: vLLM's dev endpoints (/sleep,
/wake_up) never are. The model list, API-key env names and load timeout are ``user_config``
(docs/contracts.md): ``reconfigure`` swaps them in place. Host and port are the app's ``args``:
changing them restarts the router on the new port. The same port answers Ollama's API under
/api/ (serve_app/ollama.py translates it onto the same engines, through the relay).
import_path ``serve_app.router:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import ray
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve_app import endpoints, key_gate, keys, ollama
from serve_app.contract import (
    ENGINE_DEPLOYMENT,
    ENGINE_TOKEN_HEADER,
    ROUTER_DEPLOYMENT,
    SERVE_APP_STATE,
    ModelState,
    missing_node,
    node_gone_message,
    node_resource,
)

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
# Routes whose JSON body names the model; relayed as-is to the same path on vLLM.
RELAY_PATHS = frozenset({
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/v1/score",
    "/v1/rerank",
})
STATUS_POLL_S = 1.0
STATUS_CACHE_S = 2.0
REGISTRY_REFRESH_S = 2.0
# vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s). A pooled
# connection kept exactly as long races that close: the request goes out as the server hangs
# up and fails with a reset (the "ReadError('')" of a healthy engine). Drop ours well before.
UPSTREAM_KEEPALIVE_S = 2.0
# Tries per request: another replica (or a fresh connection) when nothing came back yet.
ATTEMPTS = 3
# A replica that refused a connection is skipped this long; Serve replaces it if it is dead.
DOWN_S = 3.0
SHUTDOWN_GRACE_S = 5.0
LIFECYCLE_TIMEOUT_S = 5.0
# A model whose own measured load takes longer than load_timeout_s is still waited for: a fixed bound
# below its real start time would answer every cold request with a 503. Bound: 1.5 x its last load + 30 s.
HOLD_FACTOR, HOLD_MARGIN_S = 1.5, 30.0


def hold_bound(load_timeout_s: float, last_load_s: float | None) -> float:
    """Seconds the router holds a request for a model coming up: load_timeout_s, or longer when the
    model's last measured load (the engine's own) says it needs longer."""
    if last_load_s is None:
        return load_timeout_s
    return max(load_timeout_s, HOLD_FACTOR * last_load_s + HOLD_MARGIN_S)
# Application status → the model's live state as /v1/models shows it (the fleet's one vocabulary).
LIVE_STATE = {status: state.value for status, state in SERVE_APP_STATE.items()}

api = FastAPI(title="vLLM Fleet", docs_url=None, redoc_url=None, openapi_url=None)


class Unavailable(Exception):
    """The model's engine cannot take the request now; the message says why."""


@dataclass(frozen=True)
class Settings:
    """The router's in-place settings (its user_config), replaced wholesale on reconfigure."""

    models: dict[str, dict[str, Any]]
    keyring: keys.KeyRing  # the accepted keys and each one's scope (serve_app.keys)
    load_timeout_s: float


def settings_from(user_config: dict[str, Any]) -> Settings:
    """Parse user_config; API keys are read from the named env vars of this replica."""
    timeout = user_config.get("load_timeout_s", 600.0)
    return Settings(
        models=dict(user_config.get("models") or {}),
        keyring=keys.KeyRing.from_config(user_config, os.environ),
        load_timeout_s=float("inf") if timeout is None else float(timeout),
    )


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    """An OpenAI-style error response (for FastAPI routes)."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


def authorized(settings: Settings, header: str | None) -> bool:
    # Fail closed: key env names configured but none set means nobody gets in.
    return settings.keyring.caller(header) is not None


def model_of(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None


def _reason(exc: BaseException) -> str:
    # Serve wraps the engine's exception (RayTaskError); its `cause` has the readable message.
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip()[-2000:] or type(cause).__name__


def _model_state(app_state: str, message: str, lifecycle: dict[str, Any] | None) -> dict[str, Any]:
    """A running app shows its model's lifecycle state and since when; others the app's own state
    (with the reason when it is unavailable: its node is gone)."""
    if app_state == ModelState.UNAVAILABLE.value:
        return {"state": app_state, "since": None, "reason": message}
    if app_state != "ready" or lifecycle is None:
        return {"state": app_state, "since": None}
    out = {"state": lifecycle["state"], "since": lifecycle["since"]}
    if lifecycle.get("reason"):
        out["reason"] = lifecycle["reason"]
    return out


GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def _live_state(app: Any) -> tuple[str, str]:
    """A Serve application's state word and message; "unavailable" while its node is gone."""
    status = str(getattr(app.status, "value", app.status))
    if status != "RUNNING":
        for dep in (getattr(app, "deployments", None) or {}).values():
            node = missing_node(str(getattr(dep, "message", "") or ""))
            if node:
                return ModelState.UNAVAILABLE.value, node_gone_message(node)
    return LIVE_STATE.get(status, "unknown"), app.message


def wrong_task(model: str, spec: dict[str, Any], path: str) -> str | None:
    """Why an embedding model can't answer a chat request (vLLM itself only says "Not Found")."""
    if spec.get("task") == "embed" and path in GENERATE_PATHS:
        return f"`{model}` is an embedding model (task: embed); it cannot answer {path}. Pick a chat model."
    if spec.get("task", "generate") == "generate" and path == "/v1/embeddings":
        return f"`{model}` is a generative model (task: generate); use an embedding model for {path}."
    return None


def _chat_first(item: tuple[str, dict[str, Any]]) -> tuple[bool, str]:
    # Chat UIs (OpenWebUI among them) preselect the first model listed: never an embedding model.
    return (item[1].get("task") == "embed", item[0])


def _ui_hints(spec: dict[str, Any]) -> dict[str, Any]:
    """Fields OpenWebUI reads from a listed model (other clients ignore them).

    ``hidden`` keeps an embedding model out of its chat model picker (RAG still uses it by name);
    ``builtin_tools: false`` stops it from sending its built-in tools to a model whose engine has
    no tool-call parser: vLLM refuses any request with tools then ("auto" tool choice requires
    --enable-auto-tool-choice), so the chat failed on its first message.
    """
    meta: dict[str, Any] = {}
    if spec.get("task") == "embed":
        meta["hidden"] = True
    elif not spec.get("tool_parser"):
        meta["capabilities"] = {"builtin_tools": False}
    return {"info": {"meta": meta}} if meta else {}


# ---- the relay (runs in the HTTP server's loop) ----


@dataclass(eq=False)
class Backend:
    """One engine replica's vLLM server, as this process sees it."""

    url: str
    inflight: int = 0
    down_until: float = 0.0


@dataclass(eq=False)
class Upstream:
    """An engine's answer whose headers have arrived; ``finish`` must follow (``Relay.request`` does it)."""

    response: aiohttp.ClientResponse
    backend: Backend
    complete: bool = field(default=False, init=False)

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def content_type(self) -> str | None:
        return self.response.headers.get("content-type")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; what piled up since the last read comes as one chunk."""
        async for chunk in self.response.content.iter_any():
            yield chunk
        self.complete = True

    async def read(self) -> bytes:
        content = await self.response.read()
        self.complete = True
        return content

    def abort(self) -> None:
        """Close the connection: vLLM sees the client gone and aborts the request."""
        self.response.close()

    def finish(self) -> None:
        """Back to the pool when read to the end, else closed (which aborts it in vLLM)."""
        self.backend.inflight -= 1
        if self.complete:
            self.response.release()
        else:
            self.response.close()


class Relay:
    """Sends requests to engine replicas, least requests in flight first; lives in the server's loop.

    ``discover`` and ``app_states`` run in Serve's loop (they need Serve); the router passes them
    in already bridged to this loop.
    """

    def __init__(
        self,
        settings: Settings,
        discover: Callable[[str], Awaitable[str]],
        app_states: Callable[[], Awaitable[dict[str, tuple[str, str]]]],
        lifecycles: Callable[[list[str]], Awaitable[dict[str, dict[str, Any] | None]]] | None = None,
        engine_token: str = "",
    ) -> None:
        self.settings = settings
        # engines on other nodes require it on every request (serve_app.engine_auth); loopback ones ignore it
        self._engine_headers = {ENGINE_TOKEN_HEADER: engine_token} if engine_token else {}
        self.app_states = app_states
        self.lifecycles = lifecycles
        self._discover = discover
        self._backends: dict[str, list[Backend]] = {}
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.limiter = keys.RateLimiter()  # kept across reconfigures: a key's window outlives an edit

    def start(self) -> None:
        """Open the upstream connection pool (must run in the server's loop)."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            # generation may run long; connecting may not
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def authorized(self, header: str | None) -> bool:
        return authorized(self.settings, header)

    def set_registered(self, registered: dict[str, list[str]]) -> None:
        """The registry's URLs per model; a model it lists nothing for keeps what discovery found."""
        for model in set(self._backends) - set(self.settings.models):
            del self._backends[model]
        for model, urls in registered.items():
            if model not in self.settings.models or not urls:
                continue
            known = {b.url: b for b in self._backends.get(model, [])}
            self._backends[model] = [known.get(url) or Backend(url) for url in sorted(set(urls))]

    async def ensure(self, model: str) -> None:
        """Wait (bounded) until the model has an engine to send to: loads or wakes it if need be."""
        if self._pick(model, set()) is None:
            await self._found(model)

    def backends(self, model: str) -> list[Backend]:
        return list(self._backends.get(model, []))

    def _pick(self, model: str, tried: set[str]) -> Backend | None:
        now = time.monotonic()
        ready = [b for b in self._backends.get(model, []) if b.down_until <= now and b.url not in tried]
        if not ready:
            return None
        fewest = min(b.inflight for b in ready)
        return random.choice([b for b in ready if b.inflight == fewest])

    async def _found(self, model: str) -> Backend:
        """Wait for the model's engine (bounded); concurrent waiters share one discovery."""
        task = self._pending.get(model)
        if task is None:
            task = asyncio.ensure_future(self._discover(model))
            self._pending[model] = task
            task.add_done_callback(lambda _: self._pending.pop(model, None))
        url = await asyncio.shield(task)  # one waiter leaving must not cancel the others' wait
        backends = self._backends.setdefault(model, [])
        for backend in backends:
            if backend.url == url:
                backend.down_until = 0.0  # the engine itself just answered with it
                return backend
        backend = Backend(url)
        backends.append(backend)
        return backend

    async def open(self, model: str, path: str, body: bytes, request_id: str) -> Upstream:
        """POST to one of the model's engines; raises Unavailable (the message says why)."""
        headers = {"content-type": "application/json", "x-request-id": request_id, **self._engine_headers}
        session = self._session
        assert session is not None, "Relay.start() was not called"
        tried: set[str] = set()
        failure = ""
        for _ in range(ATTEMPTS):
            backend = self._pick(model, tried) or await self._found(model)
            backend.inflight += 1
            try:
                response = await session.post(backend.url + path, data=body, headers=headers)
                return Upstream(response, backend)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                # Refused, or not connected within sock_connect (a box too busy, a port that hangs):
                # nothing was sent, so another replica, or the engine's endpoint(), may take it.
                backend.inflight -= 1
                backend.down_until = time.monotonic() + DOWN_S
                tried.add(backend.url)
                failure = f"The engine of `{model}` cannot be reached: {e}"
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # Closed before any answer: a kept-alive connection the server had just dropped,
                # or an engine that died. Nothing was generated, so a new try is safe.
                backend.inflight -= 1
                failure = f"The engine of `{model}` failed mid-request: {e!r}"
            except BaseException:
                backend.inflight -= 1
                raise
        raise Unavailable(failure)

    @contextlib.asynccontextmanager
    async def request(self, model: str, path: str, body: bytes, request_id: str | None = None
                      ) -> AsyncIterator[Upstream]:
        """``async with relay.request(model, "/v1/chat/completions", body) as up:`` read
        ``up.chunks()`` or ``up.read()``; leaving early closes the connection (vLLM aborts)."""
        upstream = await self.open(model, path, body, request_id or uuid.uuid4().hex)
        try:
            yield upstream
        finally:
            upstream.finish()


# ---- the ASGI front (runs in the HTTP server's loop) ----


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes | None:
    """The whole request body, or None when the client left before sending it."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _send_json(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: bytes,
                     request_id: str, extra: dict[str, str] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()), *((k.encode(), v.encode()) for k, v in (extra or {}).items()),
    ]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Ingress:
    """The ASGI app each router replica serves: relay routes here, the rest to ``api``."""

    def __init__(self, relay: Relay, fallback: Callable[..., Awaitable[None]]) -> None:
        self.relay = relay
        self.fallback = fallback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in RELAY_PATHS:
            await self.relay_route(scope, receive, send)
        else:
            await self.fallback(scope, receive, send)

    async def relay_route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # One id through our answer and vLLM's logs (vLLM takes it as its request id).
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        settings = self.relay.settings
        caller = settings.keyring.caller(_header(scope, b"authorization"))
        if caller is None:
            body = error_body("Invalid or missing API key.", "invalid_request_error", "invalid_api_key")
            return await _send_json(send, 401, body, request_id)
        body = await _read_body(receive)
        if body is None:
            return
        model = model_of(body)
        if model is None:
            message = error_body("The JSON body must name a `model`.", "invalid_request_error", "invalid_body")
            return await _send_json(send, 400, message, request_id)
        if model not in settings.models:
            known = ", ".join(sorted(caller.scope.visible(settings.models))) or "(none)"
            message = error_body(f"The model `{model}` does not exist. Models: {known}.",
                                 "invalid_request_error", "model_not_found")
            return await _send_json(send, 404, message, request_id)
        if denial := keys.admit(caller, model, settings.models, self.relay.limiter):  # 403 or 429
            return await _send_json(send, denial.status, json.dumps(denial.openai_error()).encode(), request_id,
                                    denial.headers())
        wrong = wrong_task(model, settings.models[model], scope["path"])
        if wrong:
            return await _send_json(send, 400, error_body(wrong, "invalid_request_error", "model_not_supported"),
                                    request_id)
        try:
            upstream = await self.relay.open(model, scope["path"], body, request_id)
        except Unavailable as e:
            return await _send_json(send, 503, error_body(str(e), "service_unavailable", "model_unavailable"),
                                    request_id)
        try:
            await self._pass(upstream, receive, send, request_id)
        finally:
            upstream.finish()

    @staticmethod
    async def _pass(upstream: Upstream, receive: Any, send: Any, request_id: str) -> None:
        """Stream the engine's answer to the client; the client leaving closes the upstream."""
        done = False

        def on_disconnect(task: asyncio.Future[Any]) -> None:
            if not done and not task.cancelled() and task.exception() is None:
                upstream.abort()

        watcher = asyncio.ensure_future(_read_until_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        headers = [(b"x-request-id", request_id.encode())]
        if upstream.content_type:
            headers.append((b"content-type", upstream.content_type.encode("latin-1")))
        try:
            if upstream.content_type and upstream.content_type.startswith("text/event-stream"):
                await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
                async for chunk in upstream.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                content = b""
            else:
                content = await upstream.read()
                headers.append((b"content-length", str(len(content)).encode()))
                await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
            done = True
            watcher.cancel()
            await send({"type": "http.response.body", "body": content, "more_body": False})
        except aiohttp.ClientError:
            if watcher.done() and not watcher.cancelled():
                return  # the client left and we closed the upstream: nobody to answer
            raise  # the engine broke off: the response ends unfinished, so the client sees it
        finally:
            done = True
            watcher.cancel()


async def _read_until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- FastAPI routes (non-relay); other modules add theirs to `api` ----


@api.get("/v1/models")
async def list_models(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    settings = relay.settings
    caller = settings.keyring.caller(request.headers.get("authorization"))
    if caller is None:
        return error(401, "Invalid or missing API key.", "invalid_request_error", "invalid_api_key")
    models = caller.scope.visible(settings.models)  # a scoped key sees only its models
    states = await relay.app_states()
    running = [name for name in models if states.get(name, ("absent", ""))[0] == "ready"]
    lifecycles = await relay.lifecycles(running) if relay.lifecycles and running else {}
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "vllm-fleet",
            "task": spec.get("task", "generate"),
            "always_on": bool(spec.get("always_on", False)),
            **({"swap_group": spec["swap_group"]} if spec.get("swap_group") else {}),
            **_model_state(*states.get(name, ("absent", "")), lifecycles.get(name)),
            **_ui_hints(spec),
        }
        for name, spec in sorted(models.items(), key=_chat_first)
    ]
    return JSONResponse({"object": "list", "data": data})


# ---- Ollama's API (serve_app/ollama.py translates; off the OpenAI hot path) ----


class _OllamaResponse:
    """An engine's answer with the few httpx.Response methods serve_app.ollama reads."""

    def __init__(self, upstream: Upstream) -> None:
        self._up = upstream

    @property
    def status_code(self) -> int:
        return self._up.status

    async def aread(self) -> bytes:
        return await self._up.read()

    async def aiter_lines(self) -> AsyncIterator[str]:
        pending = b""
        async for chunk in self._up.chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode()
        if pending:
            yield pending.decode()

    async def aclose(self) -> None:
        self._up.finish()  # not read to the end: closed, so vLLM aborts the request


class _OllamaUpstream:
    """The relay as serve_app.ollama sees it (ollama.Upstream)."""

    def __init__(self, relay: Relay, caller: keys.Caller | None) -> None:
        self._relay = relay
        # a scoped key lists and finds only its models (a model outside gets key_gate's 403 first)
        self.models = caller.scope.visible(relay.settings.models) if caller else relay.settings.models

    def authorized(self, header: str | None) -> bool:
        return self._relay.authorized(header)

    async def states(self) -> dict[str, tuple[str, str]]:
        return await self._relay.app_states()

    async def load(self, model: str) -> None:
        try:
            await self._relay.ensure(model)
        except Unavailable as e:
            raise ollama.UpstreamUnavailable(str(e)) from e

    async def post(self, model: str, path: str, body: dict[str, Any], request_id: str) -> _OllamaResponse:
        try:
            return _OllamaResponse(await self._relay.open(model, path, json.dumps(body).encode(), request_id))
        except Unavailable as e:
            raise ollama.UpstreamUnavailable(str(e)) from e


@api.api_route("/", methods=["GET", "HEAD"])
@api.api_route("/api/{name}", methods=["GET", "POST", "HEAD", "DELETE"])
async def ollama_api(request: Request) -> Response:
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    relay: Relay = request.app.state.relay
    caller = relay.settings.keyring.caller(request.headers.get("authorization"))
    if denial := await key_gate.ollama_denial(request, caller, relay.settings.models, relay.limiter):
        return denial  # 403 or 429
    return await ollama.handle(request, _OllamaUpstream(relay, caller), request_id)


# ---- the HTTP server ----


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that the router's other processes on this node share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RuntimeError(
            f"The fleet's OpenAI endpoint cannot listen on {host}:{port} (openai.host / openai.port in "
            f"fleet.yaml): {e}. Another program holds that port, e.g. Ray Serve's own HTTP proxy from a "
            "Serve started with proxy_location other than Disabled: stop the fleet (fleetctl down) and "
            "start it again, or pick another openai.port."
        ) from e
    sock.setblocking(False)
    return sock


class Server:
    """uvicorn serving ``Ingress`` on a pre-bound socket, in a thread with its own event loop."""

    def __init__(self, sock: socket.socket, relay: Relay) -> None:
        api.state.relay = relay
        config = uvicorn.Config(
            Ingress(relay, api), loop="none", http="httptools", ws="none", lifespan="off",
            access_log=False, log_level="warning", server_header=False, date_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )  # fmt: skip
        self.relay = relay
        self._uvicorn = uvicorn.Server(config)
        self._sock = sock
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name="fleet-ingress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except Exception:
            logger.exception("the fleet ingress stopped")
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self.relay.start()
        try:
            await self._uvicorn.serve(sockets=[self._sock])
        finally:
            await self.relay.close()

    def wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the fleet ingress's HTTP server stopped while starting (see the replica log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fleet ingress's HTTP server did not start within {timeout_s:.0f} s")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the server's loop (the relay's state is only touched there)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(SHUTDOWN_GRACE_S + 2.0)
        self._sock.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard] and Ray
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ---- the Serve deployment ----


@serve.deployment(name=ROUTER_DEPLOYMENT)
class Router:
    """The fleet ingress: an HTTP server per replica; Serve-side discovery for the relay."""

    async def __init__(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        self._loop = asyncio.get_running_loop()  # Serve's loop for this replica's methods
        self._settings = settings_from({})
        self._handles: dict[str, DeploymentHandle] = {}
        self._status: tuple[float, dict[str, tuple[str, str]]] = (0.0, {})
        relay = Relay(self._settings, self._bridge(self._discover), self._bridge(self._app_states),
                      self._bridge(self._lifecycles), await asyncio.to_thread(endpoints.engine_token))
        self._server = Server(listen_socket(host, port), relay)
        await asyncio.to_thread(self._server.wait_started, 30.0)
        self._refresher = asyncio.ensure_future(self._refresh_registry())
        logger.info("fleet ingress listening on %s:%d (pid %d)", host, port, os.getpid())

    def _bridge(self, fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Awaitable[T]]:
        """``fn`` runs in Serve's loop; the wrapper is awaited in the server's loop."""
        def call(*args: Any) -> Awaitable[T]:
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), self._loop))
        return call

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Swap the model list, keys and load timeout in place."""
        self._settings = settings_from(user_config)
        self._server.call(setattr, self._server.relay, "settings", self._settings)
        for gone in set(self._handles) - set(self._settings.models):
            self._handles.pop(gone, None)

    def check_health(self) -> None:
        if not self._server.alive:
            raise RuntimeError("the fleet ingress's HTTP server is not running (see the replica log)")

    async def _refresh_registry(self) -> None:
        """Keep the relay's view of every engine replica's URL current."""
        while True:
            try:
                listed = await asyncio.to_thread(endpoints.listed)
                urls = {model: [r.url for r in regs] for model, regs in listed.items()}
                self._server.call(self._server.relay.set_registered, urls)
            except Exception as e:  # the GCS may be briefly away; the next round tries again
                logger.warning("reading the engine registry failed: %r", e)
            await asyncio.sleep(REGISTRY_REFRESH_S)

    # ---- discovery (Serve's loop; off the hot path) ----

    async def _discover(self, model: str) -> str:
        """A URL of the model's engine, waiting (bounded) while it starts.

        ``endpoint()`` on the app's handle goes to a live replica (and is where a sleeping model
        is woken); meanwhile the app's state ends the wait early when it failed or is gone.
        """
        call = asyncio.ensure_future(self._call_endpoint(self._handle(model)))
        t0 = time.monotonic()
        bound = self._settings.load_timeout_s
        measured = False
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=STATUS_POLL_S)
                if call.done():
                    break
                state, message = (await self._app_states(fresh=True)).get(model, ("absent", ""))
                if state in ("failed", "absent", "unavailable"):
                    raise Unavailable(f"The model `{model}` is {state}: {message}".rstrip(": "))
                if time.monotonic() - t0 > bound and not measured:
                    measured = True  # past load_timeout_s: does this model's own last load say it needs longer?
                    lifecycle = (await self._lifecycles([model])).get(model) or {}
                    bound = hold_bound(bound, lifecycle.get("load_seconds"))
                if time.monotonic() - t0 > bound:
                    state = "loading" if state == "ready" else state  # a running engine loading on demand
                    raise Unavailable(
                        f"The model `{model}` is still {state} after {bound:.0f} s (load_timeout_s "
                        f"{self._settings.load_timeout_s:.0f} s, or longer when its last load took longer). "
                        f"{message}".strip()
                    )
            return call.result()
        except Unavailable:
            raise
        except Exception as e:
            raise Unavailable(f"The engine of `{model}` is not available: {_reason(e)}") from e
        finally:
            call.cancel()

    def _handle(self, model: str) -> DeploymentHandle:
        handle = self._handles.get(model)
        if handle is None:
            handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model, _check_exists=False)
            self._handles[model] = handle
        return handle

    async def _lifecycles(self, models: list[str]) -> dict[str, dict[str, Any] | None]:
        """Each running engine's lifecycle state (awake, asleep, unloaded, loading...); None if it does not answer."""
        async def one(model: str) -> dict[str, Any] | None:
            try:
                return dict(await asyncio.wait_for(self._handle(model).state.remote(), LIFECYCLE_TIMEOUT_S))
            except Exception as e:
                logger.warning("no lifecycle state from %s: %s", model, _reason(e))
                return None

        return dict(zip(models, await asyncio.gather(*(one(m) for m in models)), strict=True))

    @staticmethod
    async def _call_endpoint(handle: DeploymentHandle) -> str:
        return str(await handle.endpoint.remote())

    async def _app_states(self, fresh: bool = False) -> dict[str, tuple[str, str]]:
        """Live state and message per Serve application, cached for STATUS_CACHE_S."""
        at, states = self._status
        if fresh or time.monotonic() - at > STATUS_CACHE_S:
            status = await asyncio.to_thread(serve.status)  # a blocking controller call
            states = {name: _live_state(app) for name, app in status.applications.items()}
            pinned = {name: spec["node"] for name, spec in self._settings.models.items() if spec.get("node")}
            if pinned:  # a pinned model's node gone: unavailable at once, before Serve's own word
                alive = await asyncio.to_thread(ray.cluster_resources)  # alive nodes only
                for name, node in pinned.items():
                    if node_resource(node) not in alive and name in states:
                        states[name] = (ModelState.UNAVAILABLE.value, node_gone_message(node))
            self._status = (time.monotonic(), states)
        return states

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: let streams in flight end, free the port.
        refresher = getattr(self, "_refresher", None)
        if refresher is not None:
            refresher.cancel()
        server = getattr(self, "_server", None)  # __del__ may run on a half-built instance
        if server is not None:
            server.stop()


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: host and port come as args, everything else as user_config."""
    return Router.bind(host=str(args.get("host", "127.0.0.1")), port=int(args.get("port", 8000)))
