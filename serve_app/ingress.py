"""The ingress HTTP server of a router replica: uvicorn on a shared port, in a thread of its own.

``listen_socket`` binds the fleet's OpenAI port with SO_REUSEPORT, so ``openai.workers`` replicas
on a node share it. ``Ingress`` (raw ASGI) answers the relay routes (``RELAY_PATHS``) itself: API
key, the body's ``model``, one upstream request through the relay, streamed back as it comes;
whatever else arrives goes to the ASGI app it is given (the FastAPI app of /v1/models and Ollama's
/api/). ``Server`` runs that ASGI app in its own event loop; the relay lives in that loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvicorn

from serve_app import keys, metrics
from serve_app.relay import Relay, Unavailable, Upstream, error_body, model_of

logger = logging.getLogger("ray.serve")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
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
SHUTDOWN_GRACE_S = 5.0
# How long an idle client connection stays open: longer than the keep-alive of the clients people use
# (httpx, so the openai SDK: 5 s; aiohttp, so OpenWebUI: 15 s; Node's agent: 5 s), so the client is the
# side that closes an idle connection. At uvicorn's default (5 s, the same as httpx's), a client that
# reused a connection just as the server closed it got a read error (bench/soak.py: 3 of 210k).
KEEP_ALIVE_S = 75  # nginx's default


GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def wrong_task(model: str, spec: dict[str, Any], path: str) -> str | None:
    """Why an embedding model can't answer a chat request (vLLM itself only says "Not Found")."""
    if spec.get("task") == "embed" and path in GENERATE_PATHS:
        return f"`{model}` is an embedding model (task: embed); it cannot answer {path}. Pick a chat model."
    if spec.get("task", "generate") == "generate" and path == "/v1/embeddings":
        return f"`{model}` is a generative model (task: generate); use an embedding model for {path}."
    return None



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
    """The ASGI app each router replica serves: relay routes here, the rest to ``fallback``."""

    def __init__(self, relay: Relay, fallback: ASGIApp, recorder: metrics.Recorder | None = None) -> None:
        self.relay = relay
        self.fallback = fallback
        self.recorder = recorder or metrics.Recorder()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in RELAY_PATHS:
            await self.relay_route(scope, receive, send)
        else:
            await self.fallback(scope, receive, send)

    async def relay_route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        # One id through our answer and vLLM's logs (vLLM takes it as its request id).
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        settings = self.relay.settings
        recorder = self.recorder
        caller = settings.keyring.caller(_header(scope, b"authorization"))
        if caller is None:
            body = error_body("Invalid or missing API key.", "invalid_request_error", "invalid_api_key")
            recorder.refused(401)
            return await _send_json(send, 401, body, request_id)
        body = await _read_body(receive)
        if body is None:
            return recorder.refused(metrics.CLIENT_GONE)
        model = model_of(body)
        if model is None:
            message = error_body("The JSON body must name a `model`.", "invalid_request_error", "invalid_body")
            recorder.refused(400)
            return await _send_json(send, 400, message, request_id)
        if model not in settings.models:
            known = ", ".join(sorted(caller.scope.visible(settings.models))) or "(none)"
            message = error_body(f"The model `{model}` does not exist. Models: {known}.",
                                 "invalid_request_error", "model_not_found")
            recorder.refused(404)
            return await _send_json(send, 404, message, request_id)
        stats = recorder.model(model)
        if denial := keys.admit(caller, model, settings.models, self.relay.limiter):  # 403 or 429
            recorder.finish(stats, denial.status)
            return await _send_json(send, denial.status, json.dumps(denial.openai_error()).encode(), request_id,
                                    denial.headers())
        wrong = wrong_task(model, settings.models[model], scope["path"])
        if wrong:
            recorder.finish(stats, 400)
            return await _send_json(send, 400, error_body(wrong, "invalid_request_error", "model_not_supported"),
                                    request_id)
        stats.in_flight += 1
        code = 500
        try:
            try:
                upstream = await self.relay.open(model, scope["path"], body, request_id)
            except Unavailable as e:
                code = 503
                return await _send_json(send, 503, error_body(str(e), "service_unavailable", "model_unavailable"),
                                        request_id)
            try:
                code = await self._pass(upstream, receive, send, request_id, stats, t0, scope["path"])
            except aiohttp.ClientError:
                code = metrics.ENGINE_BROKE
                raise
            finally:
                upstream.finish()
        finally:
            stats.in_flight -= 1
            recorder.finish(stats, code)

    @staticmethod
    async def _pass(upstream: Upstream, receive: Any, send: Any, request_id: str, stats: metrics.ModelStats,
                    t0: float, path: str) -> int:
        """Stream the engine's answer to the client; the client leaving closes the upstream. Records the
        hops, TTFT and tokens in ``stats``; returns the code to count (the status, or CLIENT_GONE)."""
        done = False

        def on_disconnect(task: asyncio.Future[Any]) -> None:
            if not done and not task.cancelled() and task.exception() is None:
                upstream.abort()

        watcher = asyncio.ensure_future(_read_until_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        headers = [(b"x-request-id", request_id.encode())]
        if upstream.content_type:
            headers.append((b"content-type", upstream.content_type.encode("latin-1")))
        first_in = first_out = 0.0
        try:
            if upstream.content_type and upstream.content_type.startswith("text/event-stream"):
                await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
                newlines, last, before = 0, b"", b""
                async for chunk in upstream.chunks():
                    if not first_in:
                        first_in = time.perf_counter()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if not first_out:
                        first_out = time.perf_counter()
                    newlines += chunk.count(b"\n")  # vLLM's events are "data: <JSON>\n\n"; JSON has no raw newline
                    before, last = last, chunk
                content = b""
                usage = metrics.usage_tokens(before[-metrics.USAGE_TAIL:] + last) if newlines else None
                if usage is None:
                    stats.chunks += metrics.stream_output_events(newlines // 2, path)
            else:
                content = await upstream.read()
                first_in = time.perf_counter()
                headers.append((b"content-length", str(len(content)).encode()))
                await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
                usage = metrics.usage_tokens(content) if upstream.status == 200 else None
            gone = watcher.done() and not watcher.cancelled()
            done = True
            watcher.cancel()
            await send({"type": "http.response.body", "body": content, "more_body": False})
            if not first_out:
                first_in, first_out = first_in or time.perf_counter(), time.perf_counter()
            if usage is not None:
                stats.prompt += usage[0]
                stats.completion += usage[1]
        except aiohttp.ClientError:
            if watcher.done() and not watcher.cancelled():
                return metrics.CLIENT_GONE  # the client left and we closed the upstream: nobody to answer
            raise  # the engine broke off: the response ends unfinished, so the client sees it
        finally:
            done = True
            watcher.cancel()
            if first_out:
                _hops(stats, t0, upstream, first_in, first_out)
        return metrics.CLIENT_GONE if gone else upstream.status


def _hops(stats: metrics.ModelStats, t0: float, upstream: Upstream, first_in: float, first_out: float) -> None:
    route, connect, engine, out = stats.hops
    route.observe(upstream.chosen_at - t0)
    connect.observe(upstream.connected_at - upstream.chosen_at)
    engine.observe(first_in - upstream.connected_at)
    out.observe(first_out - first_in)
    stats.ttft.observe(first_out - t0)


async def _read_until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass



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
    """uvicorn serving ``Ingress(relay, app)`` on a pre-bound socket, in a thread with its own event loop.

    ``app`` is the ASGI app for whatever is not relayed; the relay's connection pool opens and
    closes with the server's loop."""

    def __init__(self, sock: socket.socket, relay: Relay, app: ASGIApp, recorder: metrics.Recorder | None = None,
                 metrics_dir: Any = None) -> None:
        self.recorder = recorder or metrics.Recorder()
        self._metrics_dir = metrics_dir  # where this process writes its totals for the others' scrapes
        config = uvicorn.Config(
            Ingress(relay, app, self.recorder), loop="none", http="httptools", ws="none", lifespan="off",
            access_log=False, log_level="warning", server_header=False, date_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S, timeout_keep_alive=KEEP_ALIVE_S,
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
        flusher = asyncio.ensure_future(self._flush_totals())
        try:
            await self._uvicorn.serve(sockets=[self._sock])
        finally:
            flusher.cancel()
            self.recorder.flush(self._metrics_dir)
            await self.relay.close()

    async def _flush_totals(self) -> None:
        """This process's totals to its file, for a scrape that reaches another router process."""
        while True:
            await asyncio.sleep(metrics.FLUSH_S)
            self.recorder.flush(self._metrics_dir)

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
