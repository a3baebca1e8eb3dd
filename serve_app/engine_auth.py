"""The fleet's guard on an engine that listens on the network: vLLM loads it with ``--middleware``.

vLLM's own ``--api-key`` covers /v1 only; /metrics, /health, /load, /sleep, /wake_up, /tokenize and
the rest stay open. This pure ASGI middleware wraps vLLM's whole app (mounted apps included) and
answers 401 to any request, on any path, without the fleet's internal token in
``ENGINE_TOKEN_HEADER``. It runs inside vLLM's own server: no extra hop. The token comes from the
environment (``ENGINE_TOKEN_ENV``), never the command line, which every user of the node can read.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serve_app.contract import ENGINE_TOKEN_ENV, ENGINE_TOKEN_HEADER

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

_HEADER = ENGINE_TOKEN_HEADER.encode()
_REFUSED = json.dumps({"error": {"message": "This engine answers the fleet's routers only.",
                                 "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()


def token_ok(expected: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """Does the request carry the token? Constant-time; an empty expected token lets nothing in."""
    given = next((v for k, v in headers if k.lower() == _HEADER), None)
    return bool(expected) and given is not None and hmac.compare_digest(given, expected)


class RequireFleetToken:
    """ASGI middleware: every HTTP or WebSocket request needs the fleet's engine token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.token = os.environ.get(ENGINE_TOKEN_ENV, "").encode()
        if not self.token:  # fail closed: a misstarted engine must not be open
            raise RuntimeError(f"{ENGINE_TOKEN_ENV} is not set: refusing to serve unprotected")

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] not in ("http", "websocket") or token_ok(self.token, scope.get("headers") or []):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(_REFUSED)).encode())]})
        await send({"type": "http.response.body", "body": _REFUSED})
