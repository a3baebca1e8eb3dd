"""The daemon's read-only status API and page (FastAPI), bound to loopback unless told otherwise.

    GET /         a page a person leaves open: per model requests/s, tokens/s, TTFT p50, in flight and
                  state (since when); the last lifecycle events; a bar per GPU; the last plan. It polls
                  GET /fragment every PULSE_S and swaps it in (inline script, no build step)
    GET /fragment the page's live part, as HTML
    GET /pulse    the motion behind it, as JSON (reconciler.loop.pulse)
    GET /logs/M   the tail of model M's engine log, as text
    GET /status   the status document (as `fleetctl status --json`) with the daemon's section
    GET /healthz  200 while the reconcile loop is alive, 503 when it has stalled
    GET /metrics  Prometheus text: reconciles, their duration and errors, drift, per-model state

Every other method is refused with 405: nothing here changes the fleet. Reads only what the
daemon's loop recorded (`Daemon.snapshot()`); never talks to Serve itself.

On loopback it is open. On any other address it needs a bearer token (`check_exposure`: the daemon
refuses to start without one): every route but /healthz then wants ``Authorization: Bearer <token>``,
or the cookie a browser gets by opening ``/?token=<token>`` once (it is redirected to the same page
without the token in its address). What it serves is scrubbed of the fleet's env values.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import ipaddress
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from reconciler.errors import FleetError
from reconciler.fleetfiles.inventory import nvml_memory
from reconciler.fleetfiles.redact import ScrubFilter, env_values, scrub
from reconciler.fleetfiles.spec import DaemonSettings
from reconciler.fleetfiles.units import format_size
from reconciler.live.health import Health
from reconciler.loop.daemon import Daemon, DaemonState
from reconciler.loop.pulse import PULSE_S
from serve_app.contract import ModelState

READ_METHODS = {"GET", "HEAD"}
PAGE_REFRESH_S = 5
OPEN_PATHS = {"/healthz"}  # liveness probes (and `fleetctl up`) need no token
COOKIE = "fleet_status"
MIN_TOKEN_CHARS = 16
_MAKE_TOKEN = "e.g. `openssl rand -hex 32`"


class ExposureError(FleetError):
    """The status API would be reachable from the network without a token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, settings: DaemonSettings, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token the status API on ``host`` requires; None when it stays open (loopback, no
    daemon.token_env). Raises ExposureError, saying what to set, for a non-loopback address without
    a token, or a token_env whose variable is unset or too short."""
    name = settings.token_env
    if name is None:
        if is_loopback(host):
            return None
        raise ExposureError(
            f"the status API would listen on {host} without a token, so anyone who can reach the port could "
            "read the fleet's status. Set daemon.token_env: FLEET_STATUS_TOKEN in the fleet file and export "
            f"FLEET_STATUS_TOKEN=<a long random string> ({_MAKE_TOKEN}) before starting the daemon, or keep "
            "daemon.host on 127.0.0.1 (and put a reverse proxy in front)")
    token = environ.get(name, "")
    if not token:
        raise ExposureError(f"daemon.token_env names {name}, but {name} is not set in the daemon's environment; "
                            f"export {name}=<a long random string> ({_MAKE_TOKEN})")
    if len(token) < MIN_TOKEN_CHARS:
        raise ExposureError(f"{name} holds {len(token)} characters; a status API token needs at least "
                            f"{MIN_TOKEN_CHARS} ({_MAKE_TOKEN})")
    return token


def _cookie_value(token: str) -> str:
    """What the browser keeps: derived from the token, not the token itself."""
    return hmac.new(token.encode(), b"vllm-fleet status cookie", hashlib.sha256).hexdigest()


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return (scheme.lower() == "bearer" and _same(given.strip(), token)) \
        or _same(request.cookies.get(COOKIE), _cookie_value(token))


def _unauthorized() -> JSONResponse:
    return JSONResponse({"error": "this status API needs its token: send Authorization: Bearer <token> (the "
                         "value of the variable daemon.token_env names), or open /?token=<token> in a browser "
                         "once"}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="vLLM Fleet"'})


def _secrets(daemon: Daemon) -> set[str]:
    placed = daemon.placed()
    return env_values([{"env": m.env} for m in placed.models]) if placed is not None else set()


def scrub_logs(daemon: Daemon) -> None:
    """The daemon's log lines (every handler of the root logger) scrubbed of the fleet's env values."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(ScrubFilter(lambda: _secrets(daemon)))


class Metrics:
    """Counters fed by each pass; per-model gauges read from the last status at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        disable_created_metrics()  # *_created series only add noise for a single process
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter("fleet_reconciles", "Reconcile passes by result", ["result"],
                                  registry=self.registry)
        self.errors = Counter("fleet_reconcile_errors", "Passes that did not end synced or applied",
                              ["result"], registry=self.registry)
        self.duration = Histogram("fleet_reconcile_duration_seconds", "Time of one reconcile pass",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
                                  registry=self.registry)
        self.drift = Counter("fleet_drift_corrections", "Passes that healed drift (changes not from an edit)",
                             registry=self.registry)
        self.registry.register(_StateCollector(daemon))
        self._drift_seen = 0

    def observe(self, state: DaemonState) -> None:
        if state.last is None:
            return
        result = state.last.result.value
        self.reconciles.labels(result).inc()
        if not state.last.result.ok:
            self.errors.labels(result).inc()
        self.duration.observe(state.last.seconds)
        if state.drift_corrections > self._drift_seen:
            self.drift.inc(state.drift_corrections - self._drift_seen)
            self._drift_seen = state.drift_corrections


class _StateCollector:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._daemon.snapshot()
        models = (s.status or {}).get("models", [])
        state = GaugeMetricFamily("fleet_model_state", "1 for each model's current state", labels=["model", "state"])
        health = GaugeMetricFamily("fleet_model_healthy", "1 when the model is Healthy", labels=["model"])
        for row in models:
            for st in ModelState:
                state.add_metric([row["model"], st.value], 1.0 if row["state"] == st.value else 0.0)
            health.add_metric([row["model"]], 1.0 if row["health"] == Health.HEALTHY.value else 0.0)
        yield state
        yield health
        starting = GaugeMetricFamily("fleet_model_starting_seconds", "Seconds since a start the daemon follows "
                                     "was sent (absent when none)", labels=["model"])
        for st in (s.status or {}).get("starting", []):
            starting.add_metric([st["model"]], float(st["elapsed_s"]))
        yield starting
        yield GaugeMetricFamily("fleet_spec_error", "1 while the fleet files are invalid",
                                value=1.0 if s.spec_error else 0.0)
        yield GaugeMetricFamily("fleet_in_sync", "1 when the live fleet matches the files",
                                value=1.0 if (s.status or {}).get("in_sync") else 0.0)
        yield GaugeMetricFamily("fleet_last_reconcile_timestamp_seconds", "When the last pass started",
                                value=s.last.started_at if s.last else 0.0)


def make_app(daemon: Daemon, metrics: Metrics | None = None, *, token: str | None = None) -> FastAPI:
    """``token``: the bearer token every route but /healthz requires (`check_exposure`); None = open."""
    metrics = metrics or Metrics(daemon)
    app = FastAPI(title="vLLM Fleet status", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def read_only(request: Request, call_next: Any) -> Response:
        if request.method not in READ_METHODS:
            return JSONResponse({"error": "the status API is read-only: change the fleet files instead"},
                                status_code=405, headers={"Allow": "GET, HEAD"})
        if token is None or request.url.path in OPEN_PATHS or _authorized(request, token):
            return await call_next(request)
        if _same(request.query_params.get("token"), token):  # a browser, once: a cookie, and the token
            url = request.url.remove_query_params("token")  # out of its address bar and history
            response = RedirectResponse(url.path + (f"?{url.query}" if url.query else ""), status_code=303)
            response.set_cookie(COOKIE, _cookie_value(token), httponly=True, samesite="strict")
            return response
        return _unauthorized()

    # async handlers: no thread hop per request; the JSON is made once per pass (Daemon.status_json)
    @app.get("/status")
    async def status() -> Response:
        body = daemon.status_json()
        secrets = _secrets(daemon)
        if secrets:  # Serve's and apply's messages may quote a replica's arguments
            body = scrub(body.decode(), secrets).encode()
        return Response(body, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        s = daemon.snapshot()
        age = time.time() - (s.last.started_at + s.last.seconds) if s.last else None
        # A pass may legitimately run long (a model starting); stalled is "no pass and no progress".
        stalled = age is not None and age > 3 * daemon.resync_s() + 60 and not s.progress
        body = {"ok": not stalled, "reconciles": s.reconciles, "seconds_since_last_pass": age,
                "spec_error": bool(s.spec_error)}
        return JSONResponse(body, status_code=503 if stalled else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(scrub(render_page(daemon.status_document(), daemon.placed(), daemon.pulse()),
                                  _secrets(daemon)))

    @app.get("/fragment", response_class=HTMLResponse)
    async def fragment() -> HTMLResponse:
        return HTMLResponse(scrub(render_live(daemon.status_document(), daemon.placed(), daemon.pulse()),
                                  _secrets(daemon)))

    @app.get("/pulse")
    async def pulse() -> JSONResponse:
        return JSONResponse(daemon.pulse())

    @app.get("/logs/{model}", response_class=PlainTextResponse)
    async def logs(model: str) -> PlainTextResponse:
        text = await asyncio.to_thread(daemon.engine_log, model)  # a dashboard call: off the API's loop
        if text is None:
            return PlainTextResponse(f"{model}: no engine replica of this model runs now\n", status_code=404)
        return PlainTextResponse(scrub(text, _secrets(daemon)) or f"{model}: its engine log is empty or "
                                 "unreadable now (see Ray's dashboard)\n")

    return app


# ---- the page ------------------------------------------------------------------------------

_HEALTH_COLOURS = {"Healthy": "#1a7f37", "Suspended": "#6e7781", "Progressing": "#9a6700",
                   "Missing": "#bc4c00", "Degraded": "#cf222e", "Unknown": "#6e7781"}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:15px;margin:24px 0 8px}
table{border-collapse:collapse} th,td{text-align:left;padding:4px 12px 4px 0;vertical-align:top}
th{color:#656d76;font-weight:600;border-bottom:1px solid #d0d7de}
.pill{display:inline-block;padding:0 8px;border-radius:10px;color:#fff;font-size:12px}
.muted{color:#656d76} .err{background:#ffebe9;border:1px solid #ff8182;padding:8px 12px;margin:12px 0}
.gpu{margin:6px 0} .bar{display:flex;width:480px;height:18px;border:1px solid #d0d7de;background:#f6f8fa}
.bar.used{height:8px;margin-top:2px;font-size:0} td.rps,td.tps,td.ttft,td.inflight{text-align:right}
.seg{height:100%;font-size:11px;color:#fff;overflow:hidden;white-space:nowrap;padding-left:4px;box-sizing:border-box}
code,pre{font:12px ui-monospace,monospace} pre{white-space:pre-wrap;max-width:900px}
"""
_SEG_COLOURS = ("#0969da", "#8250df", "#1a7f37", "#bf3989", "#9a6700", "#0550ae")


def _e(value: Any) -> str:
    return html.escape(str(value if value is not None else ""))


def _pill(text: str) -> str:
    return f'<span class="pill" style="background:{_HEALTH_COLOURS.get(text, "#6e7781")}">{_e(text)}</span>'


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(0, int(time.time() - ts))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago"


_REFRESH_JS = """<script>
// Short polling of the page's live part; read-only, no build step. Without JavaScript: <noscript> refresh.
setInterval(async () => {
  try {
    const r = await fetch("fragment", {credentials: "same-origin", cache: "no-store"});
    if (r.ok) document.getElementById("live").innerHTML = await r.text();
  } catch (e) { /* the daemon restarting: the next poll tries again */ }
}, %d);
</script>"""


def render_page(doc: dict[str, Any], placed: Any, pulse: dict[str, Any] | None = None) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><noscript><meta http-equiv='refresh' "
            f"content='{PAGE_REFRESH_S}'></noscript><title>vLLM Fleet</title><style>{_CSS}</style></head><body>"
            f"<div id=live>{render_live(doc, placed, pulse)}</div>{_REFRESH_JS % int(PULSE_S * 1000)}</body></html>")


def render_live(doc: dict[str, Any], placed: Any, pulse: dict[str, Any] | None = None) -> str:
    """The part of the page that refreshes: header, models with their motion, events, GPUs, last change."""
    pulse = pulse or {}
    d = doc.get("daemon") or {}
    last = d.get("last_reconcile") or {}
    rev = d.get("revision") or {}
    parts = [f"<h1>vLLM Fleet {_pill(doc.get('health', 'Unknown'))} "
             f"{'<span class=muted>in sync</span>' if doc.get('in_sync') else '<b>out of sync</b>'}</h1>",
             f"<div class=muted>{_e(d.get('path'))}"
             + (f" · git {_e(str(rev.get('commit', ''))[:10])}{' (uncommitted edits)' if rev.get('dirty') else ''}"
                if rev else "")
             + f" · last reconcile {_ago(last.get('started_at'))}: {_e(last.get('result', '-'))}"
             + f" · {d.get('reconciles', 0)} passes, {d.get('drift_corrections', 0)} drift corrections"
             + f" · endpoint read {_ago(pulse.get('at'))}</div>"]
    if d.get("spec_error"):
        errs = "".join(f"<li><code>{_e(p.get('file'))}:{_e(p.get('line'))}:{_e(p.get('column'))}</code> "
                       f"{_e(p.get('field'))}: {_e(p.get('message'))}</li>" for p in d["spec_error"])
        held = d.get("holding") or {}
        keeps = (f"the live fleet holds to the last good files ({_e(held.get('describe'))})" if held
                 else "the live fleet keeps what it runs (no valid version of the files seen yet)")
        parts.append(f"<div class=err><b>The fleet files are invalid</b>; {keeps} until they are fixed."
                     f"<ul>{errs}</ul></div>")
    if doc.get("error"):
        parts.append(f"<div class=err>{_e(doc['error'])}</div>")
    if (fol := d.get("follow")) is not None:  # daemon.follow: the last look at the git remote
        parts.append(f"<div class={'muted' if fol.get('ok') else 'err'}>git {_e(fol.get('revision', '')[:12])}: "
                     f"{_e(fol.get('message'))} ({_ago(fol.get('at'))})</div>")
    if d.get("progress"):
        parts.append(f"<div class=muted>working: {_e(d['progress'])}</div>")
    parts.append(_models(doc.get("models", []), pulse.get("models") or {}))
    parts.append(_events(pulse.get("events") or []))
    motion = pulse.get("models") or {}
    parts.append(_gpu_map(placed, {r["model"]: row_state(r, motion.get(r["model"]) or {})[0]
                                   for r in doc.get("models", [])}))
    parts.append(_last_change(d.get("last_change")))
    return "".join(parts)


# Serve runs the app: the engine's own record (read every PULSE_S) says more, and sooner, than the pass.
_ENGINE_SAYS = {s.value for s in (ModelState.READY, ModelState.LOADING, ModelState.AWAKE, ModelState.SLEEPING,
                                  ModelState.ASLEEP, ModelState.WAKING, ModelState.UNLOADING, ModelState.UNLOADED)}


def row_state(row: dict[str, Any], motion: dict[str, Any]) -> tuple[str, float | None]:
    """The model's state and since when: the engine's own record (read every PULSE_S) while Serve runs
    its app, else the pass's word (starting, failed, absent...)."""
    if row.get("state") in _ENGINE_SAYS and motion.get("state"):
        return str(motion["state"]), motion.get("since")
    return str(row.get("state")), row.get("since")


def _rate(value: Any, unit: str) -> str:
    if value is None:
        return "<span class=muted>-</span>"
    return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"


def _ms(seconds: Any) -> str:
    if seconds is None:
        return "<span class=muted>-</span>"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _for(since: Any) -> str:
    if not since:
        return ""
    s = max(0, int(time.time() - float(since)))
    text = f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"
    return f" <span class=muted>for {text}</span>"


def _models(rows: list[dict[str, Any]], motion: dict[str, dict[str, Any]]) -> str:
    out = ["<h2>Models</h2><table id=models><tr><th>model</th><th>task</th><th>state</th><th>health</th>"
           "<th>req/s</th><th>tok/s</th><th>TTFT p50</th><th>in flight</th><th>sync</th><th>replicas</th>"
           "<th>GPUs</th><th>log</th><th>message</th></tr>"]
    for r in rows:
        m = motion.get(r["model"]) or {}
        state, since = row_state(r, m)
        sync = r["sync"] + (f" ({r['pending']})" if r.get("pending") else "")
        msg = (r.get("message") or "").strip().splitlines()
        if r.get("starting"):  # a start the daemon follows: how long, and what the engine is doing
            msg = [f"{r['starting']['action']} {r['starting']['elapsed_s']:.0f} s: {r['starting']['doing']}"]
        always = " <span class=muted>always on</span>" if r.get("always_on") else ""
        engine = r.get("kind") == "engine"
        log = f"<a href='logs/{_e(r['model'])}' target=_blank>tail</a>" if engine else ""
        p50 = _ms(m.get("ttft_p50_s")) + ("" if m.get("ttft_p50_window", True) else " <span class=muted>(all)</span>")
        out.append(f"<tr data-model='{_e(r['model'])}'><td><b>{_e(r['model'])}</b>{always}</td>"
                   f"<td>{_e(r.get('task') or r.get('kind'))}</td>"
                   f"<td class=state>{_e(state)}{_for(since)}</td><td>{_pill(r['health'])}</td>"
                   f"<td class=rps>{_rate(m.get('requests_per_s'), '') if engine else ''}</td>"
                   f"<td class=tps>{_rate(m.get('tokens_per_s'), '') if engine else ''}</td>"
                   f"<td class=ttft>{p50 if engine else ''}</td>"
                   f"<td class=inflight>{m.get('in_flight', 0) if engine else ''}</td>"
                   f"<td>{_e(sync)}</td><td>{_e(r['replicas'])}</td><td>{_e(r['gpus'])}</td><td>{log}</td>"
                   f"<td class=muted>{_e(msg[-1][:300] if msg else '')}</td></tr>")
        for a in r.get("adapters") or []:  # each LoRA adapter under its base
            out.append(f"<tr><td>&nbsp;&nbsp;↳ {_e(a['name'])}</td><td class=muted>adapter</td>"
                       f"<td>{_e(a['state'])}</td>" + "<td></td>" * 9 +
                       f"<td class=muted>{_e(a['reason'][:300])}</td></tr>")
    out.append("</table>")
    return "".join(out)


def event_words(e: dict[str, Any]) -> str:
    """One lifecycle event as the page says it: "woke in 312 ms", "swapped in 1.4 s"."""
    took = _ms(e.get("seconds"))
    return {
        "load": f"loaded in {took}", "load_failed": f"failed to load ({took})", "sleep": f"asleep in {took}",
        "wake": f"woke in {took}", "unload": f"unloaded in {took}", "swap": f"swapped in {took}",
        "swap_wait": f"waited {took} for room in its swap group", "swapped_out": "swapped out",
    }.get(str(e.get("event")), f"{_e(e.get('event'))} ({took})")


def _events(events: list[dict[str, Any]]) -> str:
    if not events:
        return ("<h2>Lifecycle events</h2><div id=events class=muted>None yet (or the endpoint did not answer): loads, "
                "sleeps, wakes and swaps show here as they happen.</div>")
    rows = "".join(f"<tr><td class=muted>{time.strftime('%H:%M:%S', time.localtime(float(e.get('at') or 0)))}"
                   f"</td><td>{_e(e.get('model'))}</td><td>{event_words(e)}</td></tr>" for e in events)
    return f"<h2>Lifecycle events <span class=muted>(last {len(events)})</span></h2><table id=events>{rows}</table>"


def _gpu_map(placed: Any, states: dict[str, str] | None = None) -> str:
    """A bar per GPU: each engine's share (its state in the tooltip), and under it NVML's used memory."""
    if placed is None:
        return ""
    if not placed.inventory.gpus:
        return "<h2>GPUs</h2><div class=muted>No GPUs on this machine: every model runs on the CPU.</div>"
    used = nvml_memory() if placed.inventory.source == "nvml" else {}
    states = states or {}
    out = ["<h2>GPUs</h2>"]
    for gpu in placed.inventory.gpus:
        segs, i = [], 0
        for m in placed.models:
            if gpu.index in m.gpus and m.gpu_memory:
                colour = _SEG_COLOURS[i % len(_SEG_COLOURS)]
                state = states.get(m.name) or ""
                faded = ";opacity:.45" if state in ("asleep", "unloaded", "failed", "absent") else ""
                segs.append(f"<div class=seg title='{_e(m.name)} {m.gpu_memory:g} {_e(state)}' "
                            f"style='width:{m.gpu_memory * 100:.1f}%;background:{colour}{faded}'>{_e(m.name)} "
                            f"{m.gpu_memory:g} {_e(state)}</div>")
                i += 1
        mem = used.get(gpu.index)
        if mem:
            memtxt = f" · {format_size(mem[0])} of {format_size(mem[1])} in use (NVML)"
            membar = (f"<div class='bar used' title='NVML: used memory'><div class=seg style='width:"
                      f"{100 * mem[0] / max(mem[1], 1):.1f}%;background:#6e7781'></div></div>")
        else:
            memtxt, membar = " · NVML: no reading on this machine", ""
        out.append(f"<div class=gpu><b>GPU {gpu.index}</b> <span class=muted>{_e(gpu.name or '')} "
                   f"{format_size(gpu.memory_bytes)}{memtxt}</span>"
                   f"<div class=bar>{''.join(segs)}</div>{membar}</div>")
    return "".join(out)


def _last_change(last: dict[str, Any] | None) -> str:
    if not last:
        return "<h2>Last change</h2><div class=muted>None since the daemon started: the fleet was in sync.</div>"
    rows = "".join(f"<li><code>{_e(c['action'])}</code> {_e(c['model'])}"
                   f"{': ' + _e('; '.join(c['reasons'])) if c.get('reasons') else ''}</li>"
                   for c in last.get("changes", []))
    msg = f"<pre>{_e(last['message'])}</pre>" if last.get("message") else ""
    return (f"<h2>Last change</h2><div>{_ago(last.get('started_at'))}: <b>{_e(last['result'])}</b> in "
            f"{last.get('seconds', 0):.1f} s</div><ul>{rows}</ul>{msg}")
