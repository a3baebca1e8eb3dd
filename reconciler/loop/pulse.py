"""The fleet's motion for the status page: per model requests/s, tokens/s, TTFT p50, in flight, state
and since when, and the last lifecycle events. Pure: built from the endpoint's samples
(reconciler.live.endpoint_stats), which the daemon takes every PULSE_S in a thread of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reconciler.live.endpoint_stats import ModelSample, Sample

PULSE_S = 2.0  # how often the daemon reads the endpoint; the page polls as often
WINDOW_S = 10.0  # rates and TTFT p50 over about this much of the latest samples
KEPT = 8  # samples kept: a little more than the window
EVENTS_SHOWN = 50


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (le, count) buckets; None when they are empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le  # in the open bucket: its lower bound is all that is known
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _delta(new: ModelSample, old: ModelSample | None) -> tuple[float, float, list[tuple[float, float]]]:
    """(requests, tokens, TTFT buckets) between two samples; a counter that went back (the routers
    restarted) counts from zero, as Prometheus's rate() does."""
    if old is None:
        return new.requests, new.prompt_tokens + new.completion_tokens, list(new.ttft)
    def d(a: float, b: float) -> float:
        return a - b if a >= b else a
    old_ttft = dict(old.ttft)
    return (d(new.requests, old.requests),
            d(new.prompt_tokens + new.completion_tokens, old.prompt_tokens + old.completion_tokens),
            [(le, d(c, old_ttft.get(le, 0.0))) for le, c in new.ttft])


def window(samples: Sequence[Sample], span_s: float = WINDOW_S) -> tuple[Sample, Sample] | None:
    """The newest sample and the oldest one within ``span_s`` of it (at least one step back)."""
    if len(samples) < 2:
        return None
    newest = samples[-1]
    older = [s for s in samples[:-1] if newest.at - s.at <= span_s + PULSE_S / 2] or [samples[-2]]
    return older[0], newest


def models_motion(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Per model: requests_per_s, tokens_per_s, ttft_p50_s (over the window; else since the routers
    started, with ttft_p50_window false), in_flight now, errors."""
    if not samples:
        return {}
    pair = window(samples)
    newest = samples[-1]
    out: dict[str, dict[str, Any]] = {}
    for name, now in newest.models.items():
        row: dict[str, Any] = {"in_flight": int(now.in_flight), "requests": int(now.requests),
                               "errors": int(now.errors), "requests_per_s": None, "tokens_per_s": None}
        p50 = None
        if pair is not None:
            old, _ = pair
            dt = newest.at - old.at
            requests, tokens, ttft = _delta(now, old.models.get(name))
            if dt > 0:
                row["requests_per_s"], row["tokens_per_s"] = requests / dt, tokens / dt
            p50 = quantile(0.5, ttft)
        row["ttft_p50_window"] = p50 is not None
        row["ttft_p50_s"] = p50 if p50 is not None else quantile(0.5, now.ttft)
        out[name] = row
    return out


def states(sample: Sample | None) -> dict[str, dict[str, Any]]:
    """Per model: the newest engine replica's state and since when (from the engines' own records)."""
    out: dict[str, dict[str, Any]] = {}
    for name, life in (sample.lifecycle if sample else {}).items():
        replicas = life.get("replicas") or []
        if replicas:
            out[name] = {"state": replicas[0].get("state"), "since": replicas[0].get("since")}
    return out


def events(sample: Sample | None, limit: int = EVENTS_SHOWN) -> list[dict[str, Any]]:
    """The fleet's last ``limit`` lifecycle events, newest first, each with its model."""
    merged = [{**e, "model": name} for name, life in (sample.lifecycle if sample else {}).items()
              for e in life.get("events") or []]
    merged.sort(key=lambda e: -float(e.get("at") or 0))
    return merged[:limit]


def motion(samples: Sequence[Sample]) -> dict[str, Any]:
    """The page's live part (GET /pulse): when read, per model motion and state, the last events."""
    newest = samples[-1] if samples else None
    models = models_motion(samples)
    for name, st in states(newest).items():
        models.setdefault(name, {}).update(st)
    return {"at": newest.at if newest else None, "every_s": PULSE_S, "endpoint_answered": newest is not None,
            "models": models, "events": events(newest)}
