"""The relay: sends a request to one of its model's engine replicas and streams the answer back.

Runs in the ingress server's loop (serve_app/ingress.py). It knows every engine replica's URL
(``serve_app.endpoints``, refreshed by the Router deployment) and sends each request to the one
of its model with the fewest requests in flight from this process. When it knows no URL, or the
known ones refuse, it asks ``discover`` (the Router, in Serve's loop), which loads or wakes the
model through the engine's ``endpoint()``. ``settings`` is the router's user_config, parsed.

A swap group's member is sent to only once its group's coordinator admitted the request (``admit``,
serve_app.swap: the member holds its turn); the admission's ticket is kept in ``tickets`` until the
request ends and then given back (``leave``), so the coordinator counts every member's requests in
flight exactly, however many router processes relay them. Other models pay nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import math
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from serve_app import keys
from serve_app.contract import (
    ENGINE_TOKEN_HEADER,
    RouterUserConfig,
)

# vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s). A pooled
# connection kept exactly as long races that close: the request goes out as the server hangs
# up and fails with a reset (the "ReadError('')" of a healthy engine). Drop ours well before.
UPSTREAM_KEEPALIVE_S = 2.0
# Tries per request: another replica (or a fresh connection) when nothing came back yet.
ATTEMPTS = 3
# A replica that refused a connection is skipped this long; Serve replaces it if it is dead.
DOWN_S = 3.0


class Unavailable(Exception):
    """The model's engine cannot take the request now; the message says why."""


# When the request running in this task got its upstream connection (pooled or new): set by
# TimedConnector inside session.post, read by Relay.open; per task, so per request.
_CONNECTED: contextvars.ContextVar[float] = contextvars.ContextVar("fleet_connected_at")


class TimedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, noting when a request has its connection (the router's "connect" hop).
    Cheaper than a TraceConfig, which costs a coroutine per received chunk of every stream."""

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super().connect(*args, **kwargs)
        _CONNECTED.set(time.perf_counter())
        return connection




@dataclass(frozen=True)
class Settings:
    """The router's in-place settings (its user_config), replaced wholesale on reconfigure."""

    models: dict[str, dict[str, Any]]
    keyring: keys.KeyRing  # the accepted keys and each one's scope (serve_app.keys)
    load_timeout_s: float


def engine_of(settings: Settings, model: str) -> str:
    """The engine application serving the model name ``model``: a LoRA adapter's parent, else the model's own."""
    spec = settings.models.get(model) or {}
    return str(spec.get("parent") or model)


def settings_from(user_config: dict[str, Any]) -> Settings:
    """Parse user_config (the contract's RouterUserConfig); API keys come from the named env vars here."""
    config = RouterUserConfig.parse(user_config)
    return Settings(
        models={name: model.wire() for name, model in config.models.items()},
        keyring=keys.KeyRing.from_config(config.wire(), os.environ),
        # never (None) is an unbounded wait: infinity compares and formats ("inf") where the wait is measured
        load_timeout_s=math.inf if config.load_timeout_s is None else config.load_timeout_s,
    )


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()



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
    chosen_at: float = 0.0  # time.perf_counter() when its engine was chosen
    connected_at: float = 0.0  # ... and when a connection to it was in hand
    complete: bool = field(default=False, init=False)
    on_finish: Callable[[], None] | None = None  # a swap member's admission given back

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
        self._close()

    def finish(self) -> None:
        """Back to the pool when read to the end, else closed (which aborts it in vLLM)."""
        self.backend.inflight -= 1
        if self.complete:
            self.response.release()
        else:
            self._close()
        if self.on_finish is not None:
            self.on_finish()

    def _close(self) -> None:
        # aiohttp's close() wakes a pending read with one module-wide exception instance
        # (client_reqrep._CONNECTION_CLOSED_EXCEPTION). Each raise prepends to that instance's
        # __traceback__, whose frames hold this request (response, both connections) for good:
        # ~12 KB per client that left mid-answer. A fresh exception set first is raised instead.
        content = self.response.content
        if content.exception() is None:
            content.set_exception(aiohttp.ClientConnectionError("Connection closed"))
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
        admit: Callable[[str, str], Awaitable[str | None]] | None = None,
        leave: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        # swap members: admit(group, model) waits for the member's turn (a ticket, or None when unscheduled,
        # raises Unavailable when refused); leave(ticket) gives it back. Open tickets: {ticket: (group, model)}.
        self._admit, self._leave = admit, leave
        self.tickets: dict[str, tuple[str, str]] = {}
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
            connector=TimedConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
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
        engine = engine_of(self.settings, model)
        if self._pick(engine, set()) is None:
            await self._found(engine)

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
        """POST to one of the model's engines (a LoRA adapter's: its parent's, which serves it under the
        adapter's name, the body's ``model``; a swap member's admission is its parent's); raises Unavailable
        (the message says why)."""
        model = engine_of(self.settings, model)
        session = self._session
        assert session is not None, "Relay.start() was not called"
        ticket = await self._admitted(model)
        try:
            upstream = await self._open(session, model, path, body, request_id)
        except BaseException:
            self._give_back(ticket)
            raise
        if ticket is not None:
            upstream.on_finish = lambda: self._give_back(ticket)
        return upstream

    async def _admitted(self, model: str) -> str | None:
        """A swap member's admission (waits for its turn); None for other models."""
        group = self.settings.models.get(model, {}).get("swap_group")
        if not group or self._admit is None:
            return None
        ticket = await self._admit(group, model)
        if ticket is not None:
            self.tickets[ticket] = (group, model)
        return ticket

    def _give_back(self, ticket: str | None) -> None:
        if ticket is not None and self.tickets.pop(ticket, None) is not None and self._leave is not None:
            self._leave(ticket)

    async def _open(self, session: aiohttp.ClientSession, model: str, path: str, body: bytes,
                    request_id: str) -> Upstream:
        headers = {"content-type": "application/json", "x-request-id": request_id, **self._engine_headers}
        tried: set[str] = set()
        failure = ""
        for _ in range(ATTEMPTS):
            backend = self._pick(model, tried) or await self._found(model)
            backend.inflight += 1
            chosen = time.perf_counter()
            try:
                response = await session.post(backend.url + path, data=body, headers=headers)
                return Upstream(response, backend, chosen, max(chosen, _CONNECTED.get(chosen)))
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

