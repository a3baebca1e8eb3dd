"""The router's HTTP front and relay, without Ray: real sockets, a stand-in engine speaking vLLM's HTTP.

The stand-in (a raw asyncio server) answers like vLLM's OpenAI server does on the routes the relay
uses: SSE for ``"stream": true``, JSON otherwise. It can also drop a connection without answering,
as vLLM does when its keep-alive timeout closes a connection just as a request arrives on it.
What needs Serve (discovery while a model starts, the engines' registry) is covered by
tests/serve; here the relay is given its engines' URLs directly.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from reconciler.live.cluster import free_port
from serve_app import ingress, metrics, router
from serve_app import relay as relay_mod
from serve_app.keys import KeyRing


@dataclass
class Engine:
    """A stand-in vLLM server on loopback, in a thread of its own."""

    drop_first: int = 0  # drop this many requests (connection closed, no answer)
    port: int = field(default_factory=free_port)
    served: int = 0
    dropped: int = 0
    open_streams: int = 0
    aborted: int = 0
    heads: list[bytes] = field(default_factory=list)  # each request's head, as received
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = threading.Event()

        async def main() -> None:
            await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            ready.set()
            await asyncio.Event().wait()

        threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True).start()
        assert ready.wait(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on the connection
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                body = json.loads(await reader.readexactly(length)) if length else {}  # a GET: no body
                if self.dropped < self.drop_first:
                    self.dropped += 1
                    writer.close()
                    return
                self.served += 1
                if body.get("stream"):
                    await self._stream(writer, int(body.get("max_tokens", 4)))
                else:
                    data = json.dumps({"model": body["model"], "served_by": self.port,
                                       "usage": {"prompt_tokens": 5, "completion_tokens": 7}}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(data)).encode() + b"\r\n\r\n" + data)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, tokens: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        self.open_streams += 1
        try:
            for i in range(tokens):
                event = f"data: {json.dumps({'token': i})}\n\n".encode()
                writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            done = b"data: [DONE]\n\n"
            writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            self.aborted += 1  # the relay closed the connection: vLLM would abort the request
            raise
        finally:
            self.open_streams -= 1


@dataclass
class Front:
    server: ingress.Server
    base: str


def _front(engines: list[Engine], *, keyring: KeyRing | None = None, engine_token: str = "",
           models: dict[str, dict[str, Any]] | None = None) -> Front:
    """A router front on loopback; every model in ``models`` (default: one, ``m``) goes to ``engines``."""
    models = models or {"m": {"task": "generate"}}
    settings = relay_mod.Settings(models=models, keyring=keyring or KeyRing(), load_timeout_s=5.0)

    async def discover(model: str) -> str:
        raise relay_mod.Unavailable(f"The model `{model}` has no engine in this test")

    async def app_states() -> dict[str, tuple[str, str]]:
        return {name: ("ready", "") for name in models}

    port = free_port()
    relay = relay_mod.Relay(settings, discover, app_states, engine_token=engine_token)
    recorder = metrics.Recorder()
    server = ingress.Server(ingress.listen_socket("127.0.0.1", port), relay, router.web_app(relay, recorder), recorder)
    server.wait_started(10)
    server.call(relay.set_registered, {name: [e.url for e in engines] for name in models})
    return Front(server, f"http://127.0.0.1:{port}")


@pytest.fixture
def engines() -> list[Engine]:
    made = [Engine(), Engine()]
    for engine in made:
        engine.start()
    return made


@pytest.fixture
def front(engines: list[Engine]) -> Iterator[Front]:
    made = _front(engines)
    yield made
    made.server.stop()


def _until(condition: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


def test_stream_is_relayed_whole(front: Front) -> None:
    body = {"model": "m", "stream": True, "max_tokens": 5}
    with httpx.stream("POST", front.base + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) == 6


def test_an_idle_keep_alive_connection_outlives_the_clients_own_expiry(front: Front) -> None:
    """A client that idles past httpx's (the openai SDK's) 5 s keep-alive and then reuses its
    connection finds it open: the server never closes it first (that race is a read error)."""
    conn = http.client.HTTPConnection(front.base.removeprefix("http://"), timeout=10)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read() and conn.sock is not None
    first = conn.sock
    time.sleep(6.0)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 200 and conn.sock is first  # the same connection, still open
    conn.close()


def test_errors_have_openai_shape(front: Front) -> None:
    unknown = httpx.post(front.base + "/v1/completions", json={"model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    no_model = httpx.post(front.base + "/v1/completions", content=b"not json")
    assert no_model.status_code == 400 and no_model.json()["error"]["code"] == "invalid_body"
    assert httpx.get(front.base + "/v1/models").json()["data"][0]["state"] == "ready"


def test_api_key_on_every_route(engines: list[Engine]) -> None:
    front = _front(engines, keyring=KeyRing.of({"FLEET_KEY": "k1"}))
    try:
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
            answer = httpx.request(method, front.base + path, json={"model": "m"})
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.post(front.base + "/v1/completions", json={"model": "m"}, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
    finally:
        front.server.stop()


def test_requests_spread_over_the_model_s_engines(front: Front, engines: list[Engine]) -> None:
    async def many() -> None:
        async with httpx.AsyncClient() as client:
            body = {"model": "m", "stream": True, "max_tokens": 20}
            await asyncio.gather(*(client.post(front.base + "/v1/completions", json=body) for _ in range(20)))

    asyncio.run(many())
    assert all(e.served > 0 for e in engines), [e.served for e in engines]


def test_dropped_connection_before_any_answer_is_retried() -> None:
    engine = Engine(drop_first=1)  # as vLLM closing a kept-alive connection a request just used
    engine.start()
    front = _front([engine])
    try:
        answer = httpx.post(front.base + "/v1/completions", json={"model": "m"})
        assert answer.status_code == 200 and engine.dropped == 1 and engine.served == 1
    finally:
        front.server.stop()


def test_dead_engine_is_skipped(engines: list[Engine]) -> None:
    dead = Engine()  # never started: refuses connections
    front = _front([dead, *engines])
    try:
        for _ in range(6):
            assert httpx.post(front.base + "/v1/completions", json={"model": "m"}).status_code == 200
    finally:
        front.server.stop()


@dataclass
class Unreachable:
    """An address whose connections hang (a listening socket whose accept queue is full): as an
    engine port on a box too busy to complete a connect within the relay's connect timeout."""

    sock: socket.socket
    fillers: list[socket.socket]

    @classmethod
    def make(cls) -> Unreachable:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        fillers = []
        for _ in range(8):  # never accepted: the queue fills, later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(sock.getsockname())
            fillers.append(filler)
        return cls(sock, fillers)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        for s in (*self.fillers, self.sock):
            s.close()


def test_an_engine_that_cannot_be_reached_in_time_is_skipped(engines: list[Engine]) -> None:
    unreachable = Unreachable.make()
    front = _front([unreachable, *engines])  # type: ignore[list-item]
    try:
        for _ in range(4):
            answer = httpx.post(front.base + "/v1/completions", json={"model": "m"}, timeout=30)
            assert answer.status_code == 200, answer.text
    finally:
        front.server.stop()
        unreachable.close()


def test_client_leaving_mid_stream_closes_the_engine_request(front: Front, engines: list[Engine]) -> None:
    body = {"model": "m", "stream": True, "max_tokens": 1000}
    with httpx.stream("POST", front.base + "/v1/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    assert _until(lambda: sum(e.aborted for e in engines) == 1)
    assert sum(e.open_streams for e in engines) == 0


def test_clients_leaving_mid_stream_leave_nothing_behind(front: Front, engines: list[Engine]) -> None:
    """Nothing of a request whose client left stays alive: the router's memory stays flat (issue 16;
    aiohttp's shared "Connection closed" exception used to keep every such request's frames)."""
    body = {"model": "m", "stream": True, "max_tokens": 1000}
    for n in range(1, 6):
        with httpx.stream("POST", front.base + "/v1/completions", json=body) as response:
            assert next(response.iter_lines()).startswith("data: ")
        assert _until(lambda n=n: sum(e.aborted for e in engines) == n)
    time.sleep(0.2)  # the relay's side of the last one ends after the engine saw it go
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on every live object wakes torch's deprecated aliases
        warnings.simplefilter("ignore", FutureWarning)
        left = [o for o in gc.get_objects() if isinstance(o, relay_mod.Upstream)]
    assert left == []


def test_engines_get_the_fleet_token_and_clients_never_see_it(engines: list[Engine]) -> None:
    front = _front(engines, engine_token="fleet-secret")
    try:
        r = httpx.post(front.base + "/v1/chat/completions", json={"model": "m", "messages": []}, timeout=10)
    finally:
        front.server.stop()
    assert r.status_code == 200 and "fleet-secret" not in r.text and "fleet-secret" not in str(r.headers)
    [head] = [h for e in engines for h in e.heads]
    assert b"x-fleet-engine-token: fleet-secret" in head.lower()


def _scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_ttft_hops_and_tokens(front: Front) -> None:
    with httpx.Client(base_url=front.base, timeout=10) as client:
        for _ in range(3):  # streams without usage: their output events are counted
            r = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True, "max_tokens": 4})
            assert r.status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code == 404
    got = _scrape(front.base)
    m = (("model", "m"),)
    assert got[("fleet_requests_total", (("code", "200"), *m))] == 4
    assert got[("fleet_requests_total", (("code", "404"), ("model", metrics.NO_MODEL)))] == 1
    assert not any(dict(labels).get("model") == "nope" for _, labels in got)  # a client's word is no label
    assert got[("fleet_requests_in_flight", m)] == 0
    assert got[("fleet_ttft_seconds_count", m)] == 4
    assert 0 < got[("fleet_ttft_seconds_sum", m)] < 10
    hops = {hop: got[("fleet_router_hop_seconds_sum", (("hop", hop), *m))] for hop in metrics.HOPS}
    assert all(got[("fleet_router_hop_seconds_count", (("hop", hop), *m))] == 4 for hop in metrics.HOPS)
    assert all(v >= 0 for v in hops.values()) and hops["connect"] > 0  # the connector noted its connection
    # the hops add up to the TTFT: nothing of the router's time is left out
    assert abs(sum(hops.values()) - got[("fleet_ttft_seconds_sum", m)]) < 1e-6
    assert got[("fleet_tokens_total", (("kind", "completion"), *m, ("source", "chunks")))] == 12
    assert got[("fleet_tokens_total", (("kind", "completion"), *m, ("source", "usage")))] == 7
    assert got[("fleet_tokens_total", (("kind", "prompt"), *m, ("source", "usage")))] == 5


def test_metrics_count_a_client_that_left_mid_stream(front: Front, engines: list[Engine]) -> None:
    with httpx.Client(base_url=front.base, timeout=10) as client, client.stream(
            "POST", "/v1/completions", json={"model": "m", "prompt": "hi", "stream": True, "max_tokens": 500}) as r:
        next(r.iter_bytes())
    assert _until(lambda: _scrape(front.base).get(("fleet_requests_total", (("code", "499"), ("model", "m")))) == 1)
    assert _scrape(front.base)[("fleet_requests_in_flight", (("model", "m"),))] == 0


def test_v1_models_lists_each_model_in_openais_shape_then_the_fleets_extras(front: Front) -> None:
    """OpenAI's four fields first (clients read those), then task, always_on, the live state and
    OpenWebUI's hints; built through the contract's ModelEntry, as the engine side reads it."""
    entry = httpx.get(front.base + "/v1/models").json()["data"][0]
    assert entry == {"id": "m", "object": "model", "created": 0, "owned_by": "vllm-fleet", "task": "generate",
                     "always_on": False, "state": "ready", "since": None,
                     "info": {"meta": {"capabilities": {"builtin_tools": False}}}}
    assert list(entry)[:4] == ["id", "object", "created", "owned_by"]
