"""Soak benchmark: does the fleet's data path hold up over minutes of streaming, with clients that vanish?

The issue's bar: a 5-minute soak at 64 streams with 10 % of the clients going away mid-stream gives
0 errors for the others, vLLM's running requests are back to 0 at the end, and the relay's memory
stays flat.

One fleet stack (as ``bench/relay.py``'s ``fleet`` target: our own Ray head, the router app with
``--workers`` replicas serving the port themselves, one engine app) gets ``--streams`` concurrent
streams for ``--duration-s``. Each stream sends one streamed chat completion of exactly ``--tokens``
tokens after another. A share ``--vanish`` of the requests are *vanishers*: after a random number
of content chunks (1 .. tokens/2) the client closes its connection. The rest, the *stayers*, read
to the end; a stayer fails on a non-200 answer, an exception, or fewer tokens than asked.

Every ``--sample-s`` seconds: the resident memory (VmRSS) of the router replicas, summed, and vLLM's
running + waiting requests (its /metrics gauges). After the load: how long vLLM takes to get back
to 0 requests (at most 30 s). Reported: requests, stayer errors (goal 0), stayer tokens/s and TTFT,
the relay's RSS at the first sample, its maximum and last, its growth over the run and over the
second half (warm-up against a leak), vLLM's requests at the end (goal 0), and how many of the
vanishers vLLM stopped before their end. Exit code 0 when both goals hold, 1 otherwise.

    python bench/soak.py                     # CPU: tiny random Llama, 64 streams for 5 minutes
    python bench/soak.py --streams 4 --duration-s 40 --tokens 32 --vanish 0.25 --sample-s 5 --json
    python bench/soak.py --model DIR --gpu 0 --streams 64 --duration-s 300 --workers 4 --client-procs 4 \
        --engine-argv "--dtype bfloat16 --max-model-len 1024 --kv-cache-memory-bytes 4294967296"

``--standin``: the relay alone, on any CPU, no GPU, Ray or vLLM: the router in a process of its own
(``bench/router_alone.py``) in front of a stand-in engine (``bench/standin.py``), ``--requests``
requests (streamed and not, in turn, a share ``--vanish`` of the streams left mid-way) from
``--streams`` clients. Its RSS is read after ``--warmup`` requests and every ``--sample-every`` after;
exit code 1 when it grew more than ``--max-growth-mib`` from the warm-up to the end (a leak: the
one fixed in ``serve_app/relay.py`` grew 1.2 MiB per 1000 requests here), or on any error.

    python bench/soak.py --standin                          # 10k warm-up, then 200k requests
    python bench/soak.py --standin --requests 30000 --warmup 5000 --sample-every 5000

Everything started is stopped at the end (our Ray head by its process group, never a global
``ray stop``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

# relay.py lives next to this file; serve_app and reconciler in the repository above it.
BENCH_DIR = Path(__file__).resolve().parent
for _path in (BENCH_DIR.parent, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from relay import (  # noqa: E402
    RELAY_TITLES,
    RayServeStack,
    Sample,
    ServeEndpoint,
    _exit_on_sigterm,
    _split,
    add_engine_options,
    build_tiny_llama,
    chat_body,
    engine_setup,
    free_port,
    one_request,
    percentile,
    stop_process_group,
    wait_http_ok,
)

from serve_app import lifecycle, proctable  # noqa: E402

# How the engine replica starts vLLM (serve_app/vllm_child.py vllm_argv); its guard's argv carries it too.
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# Requests vLLM finished, by reason. vLLM 0.32 leaves aborted ones out of it (its abort path skips
# the stats), so the vanishers it cut are told by those that it finished anyway.
FINISHED, ABORT_LABEL = "vllm:request_success_total", 'finished_reason="abort"'
# A stayer waits at most this long for its next chunk: a stream that stalls this long is an error.
READ_TIMEOUT_S = 120.0
# Streams still running this long after the end of the load are cut and counted as errors.
DRAIN_CAP_S = 300.0
# After the load, vLLM must be back to 0 requests within this (polled every ZERO_POLL_S).
ZERO_WAIT_S, ZERO_POLL_S = 30.0, 0.5


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------

@dataclass
class Vanish:
    """One request whose client hung up after ``chunks`` content chunks."""

    wanted: int  # content chunks it meant to read before leaving
    chunks: int = 0
    error: str = ""  # what went wrong before it could leave (informative, not a goal)


@dataclass
class ShareResult:
    """What one client process saw."""

    stayers: list[Sample] = field(default_factory=list)
    vanishers: list[Vanish] = field(default_factory=list)
    stuck: int = 0  # streams cut DRAIN_CAP_S after the end of the load


def _token_chunk(line: str) -> bool:
    """True for an SSE data line of generated tokens: a delta with content, even empty (a random
    model's tokens often decode to ""), but not vLLM's first chunk, which carries the role."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    deltas = [c.get("delta") or {} for c in json.loads(line[6:]).get("choices") or []]
    return any("content" in d and "role" not in d for d in deltas)


async def vanish_request(url: str, body: dict[str, Any], after: int, tls: ssl.SSLContext) -> Vanish:
    """Read ``after`` content chunks, then hang up mid-stream.

    A client of its own, closed on the way out: the half-read connection is really closed (the
    relay sees the client go away), never handed back to a pool.
    """
    out = Vanish(after)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=30.0), verify=tls) as client, \
                client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return out
            async for line in r.aiter_lines():
                if _token_chunk(line):
                    out.chunks += 1
                    if out.chunks >= after:
                        return out  # leaving the blocks closes the response and the connection
        out.error = f"stream ended after {out.chunks} chunks, before the client left"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = repr(e)[:200]
    return out


async def stay_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], tokens: int) -> Sample:
    """One request read to its end (relay.one_request); fewer tokens than asked is an error too."""
    try:
        s = await one_request(client, url, body)
    except Exception as e:  # anything one_request does not catch still only fails this request
        return Sample(-1.0, 0, 0.0, repr(e)[:200])
    if not s.error and s.tokens < tokens:
        s.error = f"short stream: {s.tokens} of {tokens} tokens"
    return s


async def stream_loop(client: httpx.AsyncClient, url: str, body: dict[str, Any], tokens: int, vanish: float,
                      rng: random.Random, end_at: float, tls: ssl.SSLContext, out: ShareResult) -> None:
    """One stream: request after request until ``end_at``; each one a vanisher with odds ``vanish``."""
    while time.monotonic() < end_at:
        if rng.random() < vanish:
            out.vanishers.append(await vanish_request(url, body, rng.randint(1, max(1, tokens // 2)), tls))
        else:
            out.stayers.append(await stay_request(client, url, body, tokens))


async def client_share(url: str, model: str, tokens: int, vanish: float, streams: int, end_at: float,
                       seed: int) -> ShareResult:
    """``streams`` streams from this process until ``end_at`` (time.monotonic, which is system-wide on
    Linux, so the parent's deadline holds in a client process too); requests in flight then finish."""
    body = chat_body(model, tokens)
    rng = random.Random(seed)
    tls = ssl.create_default_context()  # once: httpx would load the CA file for every vanisher's client
    out = ShareResult()
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=30.0), limits=limits,
                                 verify=tls) as client:
        tasks = [asyncio.create_task(stream_loop(client, url, body, tokens, vanish, rng, end_at, tls, out))
                 for _ in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, end_at - time.monotonic()) + DRAIN_CAP_S)
        for t in pending:
            t.cancel()
        out.stuck = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    return out


def _client_process(url: str, model: str, tokens: int, vanish: float, streams: int, end_at: float,
                    seed: int) -> ShareResult:
    return asyncio.run(client_share(url, model, tokens, vanish, streams, end_at, seed))


async def run_load(args: argparse.Namespace, ep: ServeEndpoint, end_at: float) -> ShareResult:
    """All streams until ``end_at``, split over ``--client-procs`` processes: one Python client parsing
    SSE tops out near what one Python relay does, and must not be what limits the soak."""
    url = f"{ep.base_url}/v1/chat/completions"
    procs = max(1, min(args.client_procs, args.streams))
    if procs == 1:
        return await client_share(url, ep.model, args.tokens, args.vanish, args.streams, end_at, args.seed)
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = await asyncio.gather(*(
            loop.run_in_executor(pool, _client_process, url, ep.model, args.tokens, args.vanish, n, end_at,
                                 args.seed + i)
            for i, n in enumerate(_split(args.streams, procs))))
    merged = ShareResult()
    for part in parts:
        merged.stayers += part.stayers
        merged.vanishers += part.vanishers
        merged.stuck += part.stuck
    return merged


# --------------------------------------------------------------------------------------------
# What the soak watches: the relay's memory, vLLM's requests
# --------------------------------------------------------------------------------------------

@dataclass
class Reading:
    """One look during the soak."""

    t_s: float  # seconds since the load started
    relay_rss_kb: int  # VmRSS of the router replicas, summed
    relay_pids: list[int]
    vllm_busy: float | None  # running + waiting requests; None when /metrics did not answer
    phase: str = "load"  # "start", "load", or "end" (after vLLM drained)


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # gone, or a kernel thread


def relay_rss(session: int) -> tuple[int, list[int]]:
    """(VmRSS in kB summed, pids) of our head's router replicas, found by Ray process title as
    relay.relay_cpu_s finds them: looked up at every reading, so a restarted replica shows."""
    from reconciler.live import cluster

    titles = RELAY_TITLES["fleet"]
    pids = sorted(pid for pid in cluster.session_processes(session)
                  if (argv := _argv(pid)) and argv[0].startswith(titles))
    return sum(_rss_kb(p) for p in pids), pids


def vllm_urls(head_pid: int) -> list[str]:
    """Base URLs of the vLLM servers under our head, from their command lines.

    The engine starts vLLM under a guard in a session of its own, so it is found among the head's
    descendants, not its session. vLLM listens on loopback on the head (serve_app/vllm_child.py), where
    /metrics needs no engine token.
    """
    urls: set[str] = set()
    for pid in proctable.descendants({head_pid}):
        argv = _argv(pid)
        if VLLM_MODULE not in argv:
            continue
        server = argv[argv.index(VLLM_MODULE):]  # the guard's argv holds vLLM's after its own
        flags = dict(zip(server, server[1:], strict=False))
        if "--port" in flags:
            urls.add(f"http://{flags.get('--host', '127.0.0.1')}:{flags['--port']}")
    return sorted(urls)


def _finished(metrics_text: str) -> float:
    """vLLM's requests finished other than by an abort (stop, length, ...)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(FINISHED) and ABORT_LABEL not in line:
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[-1])
    return total


async def vllm_metrics(client: httpx.AsyncClient, urls: list[str]) -> tuple[float, float] | None:
    """(running + waiting, finished so far) over every vLLM server; None when one does not answer."""
    busy = finished = 0.0
    for url in urls:
        try:
            r = await client.get(f"{url}/metrics")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        busy += lifecycle.counter_total(r.text, lifecycle.BUSY_GAUGES)
        finished += _finished(r.text)
    return busy, finished


@dataclass
class Watch:
    """Our head's session and its vLLM servers; ``look`` takes one reading."""

    session: int
    urls: list[str]
    client: httpx.AsyncClient
    t0: float = 0.0

    async def metrics(self) -> tuple[float, float] | None:
        """vllm_metrics, looking for the servers again once when one does not answer (a restarted
        engine's vLLM comes back on another port)."""
        m = await vllm_metrics(self.client, self.urls)
        if m is None:
            self.urls = await asyncio.to_thread(vllm_urls, self.session) or self.urls
            m = await vllm_metrics(self.client, self.urls)
        return m

    async def look(self, phase: str = "load") -> Reading:
        rss, pids = await asyncio.to_thread(relay_rss, self.session)  # a /proc scan: off the event loop
        m = await self.metrics()
        return Reading(round(time.monotonic() - self.t0, 1), rss, pids, None if m is None else m[0], phase)

    async def sample(self, every_s: float, stop: asyncio.Event, out: list[Reading]) -> None:
        """A reading every ``every_s`` (on a fixed beat: a slow look does not stretch it) until ``stop``."""
        beat = time.monotonic()
        while not stop.is_set():
            beat += every_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, beat - time.monotonic()))
            if not stop.is_set():
                r = await self.look()
                out.append(r)
                print(f"  t={r.t_s:6.1f}s relay RSS {r.relay_rss_kb / 1024:7.1f} MiB  vLLM running+waiting "
                      f"{r.vllm_busy}", file=sys.stderr)

    async def until_idle(self) -> tuple[float | None, float]:
        """Poll vLLM until it has no request (at most ZERO_WAIT_S): (running + waiting at the end, seconds)."""
        t0 = time.monotonic()
        busy: float | None = None
        while True:
            m = await self.metrics()
            busy = None if m is None else m[0]
            waited = time.monotonic() - t0
            if busy == 0 or waited >= ZERO_WAIT_S:
                return busy, waited
            await asyncio.sleep(ZERO_POLL_S)


@dataclass
class SoakResult:
    load: ShareResult
    load_wall_s: float
    readings: list[Reading]
    vllm_end: float | None
    vllm_zero_s: float
    vllm_finished: float | None  # requests vLLM finished (not aborted) during the load


async def soak(args: argparse.Namespace, ep: ServeEndpoint) -> SoakResult:
    """Run the load while sampling, then wait for vLLM to drain."""
    urls = vllm_urls(ep.session_id)
    if not urls:
        raise RuntimeError("no vLLM server found under our Ray head")
    async with httpx.AsyncClient(timeout=10.0) as client:
        watch = Watch(ep.session_id, urls, client, time.monotonic())
        before = await watch.metrics()
        readings = [await watch.look("start")]
        stop = asyncio.Event()
        sampler = asyncio.create_task(watch.sample(args.sample_s, stop, readings))
        start = time.monotonic()
        print(f"load: {args.streams} streams for {args.duration_s:.0f} s against {ep.base_url}; vLLM at "
              f"{', '.join(urls)}", file=sys.stderr)
        try:
            load = await run_load(args, ep, start + args.duration_s)
        finally:
            stop.set()
            await sampler
        wall = time.monotonic() - start
        busy, waited = await watch.until_idle()
        after = await watch.metrics()
        readings.append(await watch.look("end"))
    finished = after[1] - before[1] if before is not None and after is not None else None
    return SoakResult(load, wall, readings, busy, waited, finished)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _mib(kb: float) -> float:
    return kb / 1024.0


def _finite(x: float | None) -> float | None:
    """NaN as None, so the JSON stays strict."""
    return None if x is None or math.isnan(x) else x


def summarize(args: argparse.Namespace, r: SoakResult) -> dict[str, Any]:
    """The report as a dict (what --json prints)."""
    stayers = r.load.stayers
    ok = [s for s in stayers if not s.error]
    errors = [s.error for s in stayers if s.error]
    errors += [f"stream still running {DRAIN_CAP_S:.0f} s after the end"] * r.load.stuck
    ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s >= 0]
    rss = [x.relay_rss_kb for x in r.readings]
    first, middle, last = (rss[0], rss[len(rss) // 2], rss[-1]) if rss else (math.nan,) * 3
    busy = [x.vllm_busy for x in r.readings if x.phase == "load" and x.vllm_busy is not None]
    report = {
        "duration_s": args.duration_s, "load_wall_s": round(r.load_wall_s, 1), "streams": args.streams,
        "vanish": args.vanish, "tokens": args.tokens, "workers": args.workers, "client_procs": args.client_procs,
        "seed": args.seed, "machine": f"{os.cpu_count()} CPUs", "gpu": args.gpu, "engine_argv": args.engine_argv,
        "requests": len(stayers) + len(r.load.vanishers) + r.load.stuck,
        "stayers": len(stayers), "stayers_done": len(ok), "vanishers": len(r.load.vanishers),
        "vanisher_errors": sum(1 for v in r.load.vanishers if v.error),
        # vanishers vLLM stopped early: those it did not finish (every stayer it finished)
        "vllm_cut": None if r.vllm_finished is None else len(r.load.vanishers) - (r.vllm_finished - len(stayers)),
        "stayer_errors": len(errors), "first_errors": list(dict.fromkeys(errors))[:5],
        "first_vanisher_errors": list(dict.fromkeys(v.error for v in r.load.vanishers if v.error))[:5],
        "tok_s": sum(s.tokens for s in ok) / r.load_wall_s if r.load_wall_s else 0.0,
        "ttft_p50_ms": _finite(percentile(ttfts, 50)), "ttft_p99_ms": _finite(percentile(ttfts, 99)),
        "relay_rss_first_mib": _finite(_mib(first)), "relay_rss_max_mib": _finite(_mib(max(rss, default=math.nan))),
        "relay_rss_last_mib": _finite(_mib(last)), "relay_rss_growth_mib": _finite(_mib(last - first)),
        "relay_rss_growth_second_half_mib": _finite(_mib(last - middle)),
        # a replica that restarted mid-soak resets its RSS and would hide a leak
        "relay_pids_changed": len({tuple(x.relay_pids) for x in r.readings}) > 1,
        "relay_processes": len(r.readings[-1].relay_pids) if r.readings else 0,
        "vllm_busy_max": max(busy, default=None), "vllm_busy_end": r.vllm_end,
        "vllm_zero_after_s": round(r.vllm_zero_s, 1),
    }
    report["goals"] = {"stayer_errors_0": report["stayer_errors"] == 0 and len(ok) > 0,
                       "vllm_back_to_0": r.vllm_end == 0}
    report["ok"] = all(report["goals"].values())
    report["readings"] = [asdict(x) for x in r.readings]
    return report


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def render(rep: dict[str, Any]) -> str:
    """The report for people: one line per figure, the goals marked."""
    def mark(goal: str) -> str:
        return "ok" if rep["goals"][goal] else "FAILED"

    gpu = "CPU" if rep["gpu"] is None else f"GPU {rep['gpu']}"
    rows = [
        ("soak", f"{rep['load_wall_s']} s (asked {rep['duration_s']:.0f} s), {rep['streams']} streams, "
                 f"{100 * rep['vanish']:.0f} % vanish, {rep['tokens']} tokens, {rep['workers']} router "
                 f"worker(s), {rep['client_procs']} client proc(s)"),
        ("machine", f"{rep['machine']}, {gpu}"),
        ("requests sent", f"{rep['requests']}"),
        ("stayers done", f"{rep['stayers_done']} of {rep['stayers']}"),
        ("vanishers", f"{rep['vanishers']} (vLLM cut {_num(rep['vllm_cut'], '.0f')} short, "
                      f"{rep['vanisher_errors']} failed before leaving)"),
        ("stayer errors", f"{rep['stayer_errors']}   goal 0: {mark('stayer_errors_0')}"),
        ("stayer tokens/s", f"{rep['tok_s']:.1f}"),
        ("stayer TTFT p50/p99", f"{_num(rep['ttft_p50_ms'])} / {_num(rep['ttft_p99_ms'])} ms"),
        ("relay RSS first/max/last", f"{_num(rep['relay_rss_first_mib'])} / {_num(rep['relay_rss_max_mib'])} / "
                                     f"{_num(rep['relay_rss_last_mib'])} MiB ({rep['relay_processes']} process(es)"
                                     f"{', RESTARTED mid-soak' if rep['relay_pids_changed'] else ''})"),
        ("relay RSS growth", f"{_num(rep['relay_rss_growth_mib'], '+.1f')} MiB, second half "
                             f"{_num(rep['relay_rss_growth_second_half_mib'], '+.1f')} MiB"),
        ("vLLM running+waiting", f"max {_num(rep['vllm_busy_max'], '.0f')} during the load; "
                                 f"{_num(rep['vllm_busy_end'], '.0f')} at the end, after "
                                 f"{rep['vllm_zero_after_s']} s   goal 0: {mark('vllm_back_to_0')}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"error: {e}" for e in rep["first_errors"]]
    lines += [f"vanisher error: {e}" for e in rep["first_vanisher_errors"]]
    lines.append("result: " + ("ok" if rep["ok"] else "FAILED"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# --standin: the relay alone (router_alone.py in front of standin.py), memory against requests
# --------------------------------------------------------------------------------------------

@dataclass
class StandinResult:
    """What a stand-in soak saw: RSS samples (requests done, router RSS in KiB) and the failures."""

    done: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    vanished: int = 0
    wall_s: float = 0.0


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


async def _whole_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], tokens: int) -> str:
    """A non-streamed request: '' when it came back whole, else what went wrong."""
    try:
        r = await client.post(url, json={**{k: v for k, v in body.items() if k != "stream_options"}, "stream": False})
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        got = r.json()["usage"]["completion_tokens"]
        return "" if got == tokens else f"whole answer of {got} of {tokens} tokens"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return repr(e)[:200]


async def standin_load(args: argparse.Namespace, url: str, router_pid: int) -> StandinResult:
    """``--requests`` requests from ``--streams`` clients; the router's RSS at the warm-up and every
    ``--sample-every`` requests after. Streamed and whole requests alternate per client; a share
    ``--vanish`` of the streamed ones leave mid-stream."""
    out = StandinResult()
    body = chat_body("m", args.tokens)
    rng = random.Random(args.seed)
    tls = ssl.create_default_context()
    started = 0
    marks = {args.warmup + i * args.sample_every
             for i in range((args.requests - args.warmup) // args.sample_every + 1)}

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal started
        whole = False
        while started < args.requests:
            started += 1
            whole = not whole
            if whole:
                error = await _whole_request(client, url, body, args.tokens)
            elif rng.random() < args.vanish:
                v = await vanish_request(url, body, rng.randint(1, max(1, args.tokens // 2)), tls)
                error, out.vanished = v.error, out.vanished + 1
            else:
                error = (await stay_request(client, url, body, args.tokens)).error
            if error:
                out.errors.append(error)
            out.done += 1
            if out.done in marks:
                out.samples.append((out.done, _rss_kb(router_pid)))
                if len(out.samples) == 1 or out.done % (5 * args.sample_every) == 0:
                    print(f"  {out.done} requests: router RSS {_mib(out.samples[-1][1]):.1f} MiB",
                          file=sys.stderr)

    limits = httpx.Limits(max_connections=args.streams + 2, max_keepalive_connections=args.streams + 2)
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=30.0), limits=limits,
                                 verify=tls) as client:
        await asyncio.gather(*(one_client(client) for _ in range(args.streams)))
    out.wall_s = time.monotonic() - t0
    return out


def run_standin(args: argparse.Namespace, work: Path) -> StandinResult:
    """Start the stand-in engine and the router alone, load them, stop them."""
    engine_port, router_port = free_port(), free_port()
    engine = _spawn([str(BENCH_DIR / "standin.py"), "--port", str(engine_port),
                     "--token-delay-s", str(args.token_delay_s)], work / "standin.log")
    router = _spawn([str(BENCH_DIR / "router_alone.py"), "--port", str(router_port),
                     "--engine", f"http://127.0.0.1:{engine_port}"], work / "router.log")
    try:
        wait_http_ok(f"http://127.0.0.1:{engine_port}/health", 60, alive=lambda: engine.poll() is None)
        wait_http_ok(f"http://127.0.0.1:{router_port}/v1/models", 120, alive=lambda: router.poll() is None)
        print(f"router (pid {router.pid}) and stand-in engine up", file=sys.stderr)
        return asyncio.run(standin_load(args, f"http://127.0.0.1:{router_port}/v1/chat/completions", router.pid))
    finally:
        for proc in (router, engine):
            stop_process_group(proc)


def summarize_standin(args: argparse.Namespace, r: StandinResult) -> dict[str, Any]:
    """The report: RSS at the warm-up and at the end, the growth between, its slope; ok or not."""
    first, last = (r.samples[0], r.samples[-1]) if r.samples else ((0, 0), (0, 0))
    xs, ys = [n for n, _ in r.samples], [_mib(kb) for _, kb in r.samples]
    slope = 0.0
    if len(xs) > 1:  # least squares, MiB per 100k requests: a trend, where first and last may be noise
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs) * 1e5
    growth = _mib(last[1] - first[1])
    complete = r.done == args.requests and len(r.samples) >= 2
    return {
        "mode": "standin", "requests": r.done, "warmup": args.warmup, "streams": args.streams,
        "vanish": args.vanish, "vanished": r.vanished, "tokens": args.tokens, "wall_s": round(r.wall_s, 1),
        "requests_per_s": round(r.done / r.wall_s, 1) if r.wall_s else None,
        "errors": len(r.errors), "first_errors": sorted(set(r.errors))[:5],
        "rss_mib_at_warmup": round(_mib(first[1]), 1), "rss_mib_at_end": round(_mib(last[1]), 1),
        "growth_mib": round(growth, 2), "slope_mib_per_100k": round(slope, 3),
        "max_growth_mib": args.max_growth_mib, "samples": [[n, round(_mib(kb), 2)] for n, kb in r.samples],
        "ok": complete and not r.errors and growth <= args.max_growth_mib,
    }


def render_standin(rep: dict[str, Any]) -> str:
    lines = [
        f"relay alone, stand-in engine: {rep['requests']} requests ({rep['warmup']} warm-up), {rep['streams']} "
        f"clients, {rep['vanished']} left mid-stream, {rep['requests_per_s']} requests/s",
        f"router RSS after the warm-up {rep['rss_mib_at_warmup']} MiB, at the end {rep['rss_mib_at_end']} MiB: "
        f"growth {rep['growth_mib']:+.2f} MiB (bound {rep['max_growth_mib']} MiB), trend "
        f"{rep['slope_mib_per_100k']:+.3f} MiB per 100k requests",
        f"errors {rep['errors']}" + "".join(f"\n  {e}" for e in rep["first_errors"]),
        "OK: flat" if rep["ok"] else "FAIL: the router's memory grew (or requests failed)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_options(p)
    p.add_argument("--streams", type=int, default=64, help="concurrent streams")
    p.add_argument("--duration-s", type=float, default=300.0, help="no request starts after this")
    p.add_argument("--vanish", type=float, default=0.1, help="share of requests whose client leaves mid-stream")
    p.add_argument("--tokens", type=int, default=128, help="completion tokens per request")
    p.add_argument("--client-procs", type=int, default=1,
                   help="load-generator processes the streams are split over (use several on a GPU)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between looks at RSS and vLLM")
    p.add_argument("--seed", type=int, default=1, help="seed of who vanishes and when (client process i: seed+i)")
    p.add_argument("--start-timeout-s", type=float, default=600.0, help="time to bring the stack up")
    p.add_argument("--keep-dir", action="store_true", help="keep the work folder (logs) at the end")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    standin = p.add_argument_group("--standin: the relay alone on the CPU (no GPU, Ray or vLLM)")
    standin.add_argument("--standin", action="store_true", help="router_alone.py in front of standin.py")
    standin.add_argument("--requests", type=int, default=210_000, help="requests in all, the warm-up included")
    standin.add_argument("--warmup", type=int, default=10_000, help="requests before the first RSS reading")
    standin.add_argument("--sample-every", type=int, default=10_000, help="requests between RSS readings")
    standin.add_argument("--token-delay-s", type=float, default=0.002, help="the stand-in's pause per token")
    standin.add_argument("--max-growth-mib", type=float, default=1.0,
                         help="RSS growth from the warm-up to the end above this fails the run")
    args = p.parse_args(argv)
    if args.standin and "--tokens" not in (argv if argv is not None else sys.argv):
        args.tokens = 32
    if args.standin and not 0 < args.warmup < args.requests or args.sample_every < 1:
        p.error("need 0 < --warmup < --requests and --sample-every >= 1")
    if args.streams < 1 or args.tokens < 2 or not 0.0 <= args.vanish <= 1.0 or args.sample_s <= 0:
        p.error("need --streams >= 1, --tokens >= 2, 0 <= --vanish <= 1, --sample-s > 0")
    return args


def run(args: argparse.Namespace, work: Path) -> SoakResult:
    """Start the fleet stack, soak it, stop it."""
    model_dir = args.model.resolve() if args.model else build_tiny_llama(work / "model")
    stack = RayServeStack(model_dir, work / "ray-main", engine_setup(args), True, False, workers=args.workers)
    try:
        stack.launch()
        ep = stack.wait(time.monotonic() + args.start_timeout_s)[0]
        print(f"fleet up at {ep.base_url}", file=sys.stderr)
        return asyncio.run(soak(args, ep))
    finally:
        with contextlib.suppress(Exception):
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print the report; 0 when the goals hold."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the finally blocks stop what we started
    work = Path(tempfile.mkdtemp(prefix="soak-bench-"))
    print(f"work folder {work}", file=sys.stderr)
    try:
        if args.standin:
            report = summarize_standin(args, run_standin(args, work))
            text = render_standin(report)
        else:
            report = summarize(args, run(args, work))
            text = render(report)
        print(json.dumps(report, indent=1) if args.json else text)
        return 0 if report["ok"] else 1
    finally:
        if args.keep_dir:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
