"""The endpoint's own observability routes (not relayed): ``GET /metrics`` and ``GET /fleet/lifecycle``.

``/metrics`` is Prometheus text (serve_app.metrics): requests, TTFT, the router's hops and tokens
per model, summed over the node's router processes, and the engines' lifecycle durations.
``/fleet/lifecycle`` is JSON: per model, each engine replica's state and since when, and the model's
last lifecycle events with their times (what the daemon's status page shows). Both want the API key
when the fleet has one, as /v1/models does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve_app import endpoints, metrics
from serve_app.lifecycle import EVENTS_KEPT
from serve_app.relay import Relay, authorized

RECORDS_CACHE_S = 1.0  # the daemon polls every 2 s and Prometheus every 15: one KV read a second at most
_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])


async def _records() -> list[dict[str, Any]]:
    global _cache
    at, records = _cache
    if time.monotonic() - at > RECORDS_CACHE_S:
        try:
            records = await asyncio.to_thread(endpoints.lifecycle_records)
        except Exception:  # the GCS briefly away: the last records, and the router's own numbers
            records = _cache[1]
        _cache = (time.monotonic(), records)
    return records


def _denied(request: Request) -> Response | None:
    relay: Relay = request.app.state.relay
    if authorized(relay.settings, request.headers.get("authorization")):
        return None
    return JSONResponse({"error": {"message": "Invalid or missing API key.", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}}, status_code=401)


async def prometheus(request: Request) -> Response:
    if (denied := _denied(request)) is not None:
        return denied
    body = metrics.render(request.app.state.recorder, request.app.state.metrics_dir, await _records())
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def lifecycle_view(records: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    """Per model of the fleet: its replicas' states (newest first) and its last events, oldest first."""
    out: dict[str, Any] = {}
    for model in models:
        mine = sorted((r for r in records if r.get("model") == model), key=lambda r: -float(r.get("at") or 0))
        events = sorted((e for r in mine for e in r.get("events") or []), key=lambda e: float(e.get("at") or 0))
        out[model] = {
            "replicas": [{"replica": r.get("replica"), "state": r.get("state"), "since": r.get("since"),
                          "at": r.get("at")} for r in mine],
            "events": events[-EVENTS_KEPT:],
        }
    return {"models": out}


async def lifecycle(request: Request) -> Response:
    if (denied := _denied(request)) is not None:
        return denied
    relay: Relay = request.app.state.relay
    return JSONResponse(lifecycle_view(await _records(), sorted(relay.settings.models)))


def add_routes(api: FastAPI) -> None:
    api.add_api_route("/metrics", prometheus, methods=["GET"])
    api.add_api_route("/fleet/lifecycle", lifecycle, methods=["GET"])
