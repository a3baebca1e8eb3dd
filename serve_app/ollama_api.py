"""Ollama's API on the router's port: the glue between serve_app.ollama (which translates) and the relay.

Off the OpenAI hot path: ``/`` and ``/api/*`` go through FastAPI to ``ollama.handle``, which sees
the relay through the small ``ollama.Upstream`` interface implemented here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve_app import key_gate, keys, ollama
from serve_app.relay import Relay, Unavailable, Upstream


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
        """Each model name's engine state: a LoRA adapter is as loaded as its parent."""
        states = await self._relay.app_states()
        adapters = {name: states[spec["parent"]] for name, spec in self.models.items()
                    if spec.get("parent") in states}
        return {**states, **adapters}

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



async def ollama_api(request: Request) -> Response:
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    relay: Relay = request.app.state.relay
    caller = relay.settings.keyring.caller(request.headers.get("authorization"))
    if denial := await key_gate.ollama_denial(request, caller, relay.settings.models, relay.limiter):
        return denial  # 403 or 429
    return await ollama.handle(request, _OllamaUpstream(relay, caller), request_id)


def add_routes(api: FastAPI) -> None:
    api.add_api_route("/", ollama_api, methods=["GET", "HEAD"])
    api.add_api_route("/api/{name}", ollama_api, methods=["GET", "POST", "HEAD", "DELETE"])
