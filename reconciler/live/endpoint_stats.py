"""What the fleet's endpoint is doing now: its /metrics (requests, TTFT, tokens, in flight per model)
and /fleet/lifecycle (each engine's state and last lifecycle events), read for the status page.

One read is a ``Sample``; rates come from two of them (reconciler.loop.pulse).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class ModelSample:
    """One model's totals at one read (counters since the endpoint's router processes started)."""

    requests: float = 0.0
    errors: float = 0.0  # answers with a status of 500 or more (503: its engine unavailable)
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0  # usage where answers carried it, else a stream's output events
    in_flight: float = 0.0
    ttft: tuple[tuple[float, float], ...] = ()  # (le, cumulative count), +Inf last


@dataclass(frozen=True)
class Sample:
    at: float  # time.time() of the read
    models: dict[str, ModelSample] = field(default_factory=dict)
    lifecycle: dict[str, Any] = field(default_factory=dict)  # /fleet/lifecycle's "models"


def parse_metrics(text: str) -> dict[str, ModelSample]:
    """The endpoint's Prometheus text → per model totals (serve_app.metrics names)."""
    acc: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None or model.startswith("("):
                continue
            m = acc.setdefault(model, {"requests": 0.0, "errors": 0.0, "prompt_tokens": 0.0,
                                       "completion_tokens": 0.0, "in_flight": 0.0, "ttft": []})
            if s.name == "fleet_requests_total":
                m["requests"] += s.value
                if s.labels.get("code", "").isdigit() and int(s.labels["code"]) >= 500:
                    m["errors"] += s.value
            elif s.name == "fleet_tokens_total":
                m["prompt_tokens" if s.labels.get("kind") == "prompt" else "completion_tokens"] += s.value
            elif s.name == "fleet_requests_in_flight":
                m["in_flight"] += s.value
            elif s.name == "fleet_ttft_seconds_bucket":
                m["ttft"].append((float(s.labels["le"]), s.value))
    return {name: ModelSample(**{**m, "ttft": tuple(sorted(m["ttft"]))}) for name, m in acc.items()}


def read_endpoint(openai: Any, timeout_s: float = 2.0) -> Sample | None:
    """One read of the endpoint (``openai``: the fleet's openai settings); None when it does not answer."""
    key = next((os.environ[n] for n in openai.api_keys if os.environ.get(n)), None)
    host = "127.0.0.1" if openai.host in ("0.0.0.0", "::", "") else openai.host
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=f"http://{host}:{openai.port}", timeout=timeout_s, headers=headers) as client:
            metrics = client.get("/metrics")
            lifecycle = client.get("/fleet/lifecycle")
        if metrics.status_code != 200:
            return None
        models = parse_metrics(metrics.text)
        life = lifecycle.json().get("models", {}) if lifecycle.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return Sample(time.time(), models, life if isinstance(life, dict) else {})
