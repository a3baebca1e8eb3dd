"""The OpenAI router: one Serve deployment (``router``) at "/" that relays to the engines.

Each request names its ``model``; the router relays the HTTP request unchanged to that model's
vLLM child (the URL comes once from the engine deployment's ``endpoint()`` and is cached) with
one shared httpx client, streaming SSE chunk by chunk. No Serve handle call happens per request.
Errors have OpenAI's shape ``{"error": {"message", "type", "code"}}``: unknown model → 404,
engine unavailable → 503 with the reason (the wait for a starting model is bounded by
``load_timeout_s``), missing/wrong API key → 401.

The model list, API-key env names and load timeout are ``user_config`` (docs/contracts.md):
``reconfigure`` swaps them in place, so adding or removing a model never restarts the router.
The same port answers Ollama's API under /api/ (serve_app/ollama.py translates it onto the
same engines). import_path ``serve_app.router:app``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve_app import ollama
from serve_app.contract import ENGINE_DEPLOYMENT, ROUTER_DEPLOYMENT, SERVE_APP_STATE

logger = logging.getLogger("ray.serve")

# Routes whose JSON body names the model; relayed as-is to the same path on vLLM.
RELAY_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/v1/score",
    "/v1/rerank",
)
STATUS_POLL_S = 1.0
STATUS_CACHE_S = 2.0
# Application status → the model's live state as /v1/models shows it (the fleet's one vocabulary).
LIVE_STATE = {status: state.value for status, state in SERVE_APP_STATE.items()}

api = FastAPI(title="vLLM Fleet", docs_url=None, redoc_url=None, openapi_url=None)


class Unavailable(Exception):
    """The model's engine cannot take the request now; the message says why."""


@dataclass(frozen=True)
class Settings:
    """The router's in-place settings (its user_config), replaced wholesale on reconfigure."""

    models: dict[str, dict[str, Any]]
    keys: frozenset[str]
    require_key: bool
    load_timeout_s: float


def settings_from(user_config: dict[str, Any]) -> Settings:
    """Parse user_config; API keys are read from the named env vars of this replica."""
    envs = list(user_config.get("api_key_envs") or [])
    keys = frozenset(os.environ[name] for name in envs if os.environ.get(name))
    return Settings(
        models=dict(user_config.get("models") or {}),
        keys=keys,
        require_key=bool(envs),
        load_timeout_s=float(user_config.get("load_timeout_s", 600.0)),
    )


def error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


def _authorized(settings: Settings, header: str | None) -> bool:
    if not settings.require_key:
        return True
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    # Fail closed: key env names configured but none set means nobody gets in.
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in settings.keys)


def _model_of(body: bytes) -> str | None:
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


async def _stream(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await _close(upstream)


async def _close(upstream: httpx.Response) -> None:
    # Shielded: on client disconnect we run inside a cancelled scope, and closing the upstream
    # connection is exactly what makes vLLM abort the request.
    with anyio.CancelScope(shield=True):
        await upstream.aclose()


GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


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


class _OllamaUpstream:
    """The router as serve_app.ollama sees it (ollama.Upstream)."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self.models = router._settings.models

    def authorized(self, header: str | None) -> bool:
        return _authorized(self._router._settings, header)

    async def states(self) -> dict[str, tuple[str, str]]:
        return await self._router._app_states()

    async def load(self, model: str) -> None:
        try:
            self._router._urls.get(model) or await self._router._endpoint(model)
        except Unavailable as e:
            raise ollama.UpstreamUnavailable(str(e)) from e

    async def post(self, model: str, path: str, body: dict[str, Any], request_id: str) -> httpx.Response:
        try:
            return await self._router._send(model, path, json.dumps(body).encode(), request_id)
        except Unavailable as e:
            raise ollama.UpstreamUnavailable(str(e)) from e


@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress(api)
class Router:
    """Relays OpenAI requests to the model engines' vLLM servers."""

    def __init__(self) -> None:
        self._settings = settings_from({})
        self._urls: dict[str, str] = {}
        self._handles: dict[str, DeploymentHandle] = {}
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._status: tuple[float, dict[str, Any]] = (0.0, {})
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=2.0),  # generation may run long; connecting may not
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Swap the model list, keys and load timeout in place."""
        self._settings = settings_from(user_config)
        for gone in set(self._urls) - set(self._settings.models):
            self._urls.pop(gone, None)
            self._handles.pop(gone, None)

    # ---- relay (the hot path) ----

    @api.post("/v1/chat/completions")
    @api.post("/v1/completions")
    @api.post("/v1/embeddings")
    @api.post("/tokenize")
    @api.post("/detokenize")
    @api.post("/v1/score")
    @api.post("/v1/rerank")
    async def relay(self, request: Request) -> Response:
        # Serve's proxy puts an X-Request-Id on every request (made when absent) and echoes it in
        # the response; vLLM takes it as its own request id, so one id runs through all logs.
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        settings = self._settings
        if not _authorized(settings, request.headers.get("authorization")):
            return error(401, "Invalid or missing API key.", "invalid_request_error", "invalid_api_key")
        body = await request.body()
        model = _model_of(body)
        if model is None:
            return error(400, "The JSON body must name a `model`.", "invalid_request_error", "invalid_body")
        if model not in settings.models:
            known = ", ".join(sorted(settings.models)) or "(none)"
            message = f"The model `{model}` does not exist. Models: {known}."
            return error(404, message, "invalid_request_error", "model_not_found")
        wrong = wrong_task(model, settings.models[model], request.url.path)
        if wrong:
            return error(400, wrong, "invalid_request_error", "model_not_supported")
        try:
            upstream = await self._send(model, request.url.path, body, request_id)
        except Unavailable as e:
            return error(503, str(e), "service_unavailable", "model_unavailable")
        media_type = upstream.headers.get("content-type")
        if media_type and media_type.startswith("text/event-stream"):
            return StreamingResponse(_stream(upstream), upstream.status_code, media_type=media_type)
        try:
            content = await upstream.aread()
        finally:
            await _close(upstream)
        return Response(content, upstream.status_code, media_type=media_type)

    async def _send(self, model: str, path: str, body: bytes, request_id: str) -> httpx.Response:
        """POST to the engine; on a connection error refresh its URL once (it may be new)."""
        headers = {"content-type": "application/json", "x-request-id": request_id}
        for attempt in (1, 2):
            url = self._urls.get(model) or await self._endpoint(model)
            request = self._client.build_request("POST", url + path, content=body, headers=headers)
            try:
                return await self._client.send(request, stream=True)
            except httpx.ConnectError as e:  # nothing was sent: safe to retry
                self._urls.pop(model, None)
                if attempt == 2:
                    raise Unavailable(f"The engine of `{model}` refuses connections: {e}") from e
            except httpx.TransportError as e:
                self._urls.pop(model, None)
                raise Unavailable(f"The engine of `{model}` failed mid-request: {e!r}") from e
        raise AssertionError("unreachable")

    # ---- endpoint discovery (off the hot path: once per engine start) ----

    async def _endpoint(self, model: str) -> str:
        """The engine's URL; concurrent requests for one model share a single discovery."""
        task = self._pending.get(model)
        if task is None:
            task = asyncio.ensure_future(self._discover(model))
            self._pending[model] = task
            task.add_done_callback(lambda _: self._pending.pop(model, None))
        return await asyncio.shield(task)  # one waiter leaving must not cancel the others' wait

    async def _discover(self, model: str) -> str:
        """Ask the engine for its URL, waiting (bounded) while it starts; cache the answer."""
        handle = self._handles.get(model)
        if handle is None:
            handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model, _check_exists=False)
            self._handles[model] = handle
        call = asyncio.ensure_future(self._call_endpoint(handle))
        deadline = time.monotonic() + self._settings.load_timeout_s
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=STATUS_POLL_S)
                if call.done():
                    break
                state, message = (await self._app_states(fresh=True)).get(model, ("absent", ""))
                if state in ("failed", "absent"):
                    raise Unavailable(f"The model `{model}` is {state}: {message}".rstrip(": "))
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"The model `{model}` is still {state} after load_timeout_s "
                        f"({self._settings.load_timeout_s:.0f} s). {message}".strip()
                    )
            url = call.result()
        except Unavailable:
            raise
        except Exception as e:
            raise Unavailable(f"The engine of `{model}` is not available: {_reason(e)}") from e
        finally:
            call.cancel()
        self._urls[model] = url
        return url

    @staticmethod
    async def _call_endpoint(handle: DeploymentHandle) -> str:
        return str(await handle.endpoint.remote())

    async def _app_states(self, fresh: bool = False) -> dict[str, tuple[str, str]]:
        """Live state and message per Serve application, cached for STATUS_CACHE_S."""
        at, states = self._status
        if fresh or time.monotonic() - at > STATUS_CACHE_S:
            status = await asyncio.to_thread(serve.status)  # a blocking controller call
            states = {
                name: (LIVE_STATE.get(str(getattr(app.status, "value", app.status)), "unknown"), app.message)
                for name, app in status.applications.items()
            }
            self._status = (time.monotonic(), states)
        return states

    # ---- model list ----

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        settings = self._settings
        if not _authorized(settings, request.headers.get("authorization")):
            return error(401, "Invalid or missing API key.", "invalid_request_error", "invalid_api_key")
        states = await self._app_states()
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "vllm-fleet",
                "task": spec.get("task", "generate"),
                "always_on": bool(spec.get("always_on", False)),
                "state": states.get(name, ("absent", ""))[0],
                **_ui_hints(spec),
            }
            for name, spec in sorted(settings.models.items(), key=_chat_first)
        ]
        return JSONResponse({"object": "list", "data": data})

    # ---- Ollama's API (serve_app/ollama.py translates; off the OpenAI hot path) ----

    @api.api_route("/", methods=["GET", "HEAD"])
    @api.api_route("/api/{name}", methods=["GET", "POST", "HEAD", "DELETE"])
    async def ollama_api(self, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        return await ollama.handle(request, _OllamaUpstream(self), request_id)


def app(args: dict[str, Any]) -> Application:
    """Serve application builder; everything the router needs arrives as user_config."""
    return Router.bind()
