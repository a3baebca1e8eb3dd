"""The endpoint's own Prometheus metrics (``GET /metrics`` on the OpenAI port): what the routers relay,
and the engines' lifecycle (wake, sleep, load, swap durations).

The hot path touches plain ints and lists only (``Recorder``): an observe is a bisect and two adds,
well under a microsecond, with no allocation that stays. prometheus_client builds the text at scrape
time (its own multiprocess mode costs ~11 µs per histogram observe here: an mmap write under a lock).

Several router processes share the port (SO_REUSEPORT), so a scrape reaches one of them. Each writes
its totals to its own file in one folder of the node (``metrics_dir``) at most once a second; the
process that answers a scrape merges every process's file with its own totals, so one scrape is the
whole endpoint (the routers all run on the head). Counters and histograms sum over every router process
of this Ray session, so they never go backwards when one is replaced; in flight sums the live ones.
Lifecycle histograms come from the engines' own records (``serve_app.endpoints.lifecycle_records``:
each engine replica publishes its record on each transition), summed over replicas.

Tokens: from vLLM's ``usage`` where the answer carries it (every non-streamed answer; a stream whose
client asked ``stream_options.include_usage``): ``source="usage"``; else, for a stream, its data events
that carry output (vLLM sends one per token at its default ``--stream-interval 1``): ``source="chunks"``,
completion tokens only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Seconds; the router's own hops are tens of microseconds, a cold start minutes.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# accept → engine chosen → connected → first bytes from the engine → first bytes out
HOPS = ("route", "connect", "engine", "out")
NO_MODEL = "(none)"  # requests refused before they named a model of the fleet (never the name they sent)
FLUSH_S = 1.0
# Codes the router records besides the HTTP status it sent: the client left before the end, or the
# engine broke off mid-answer (the status line had gone out already).
CLIENT_GONE, ENGINE_BROKE = 499, 502
_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')
USAGE_TAIL = 2048  # vLLM puts usage near the end of an answer; search only its last bytes


class Hist:
    """A histogram's buckets (not cumulative: counts[i] holds values in (bounds[i-1], bounds[i]]) and sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, n: int = len(LATENCY_BOUNDS)) -> None:
        self.counts = [0] * (n + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.sum += seconds


class ModelStats:
    """One model's totals in this process."""

    __slots__ = ("codes", "in_flight", "ttft", "hops", "prompt", "completion", "chunks")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}  # HTTP status → requests (a handful of codes)
        self.in_flight = 0
        self.ttft = Hist()
        self.hops = tuple(Hist() for _ in HOPS)
        self.prompt = 0  # from usage
        self.completion = 0  # from usage
        self.chunks = 0  # completion tokens counted as a stream's output events (no usage in it)

    def as_dict(self) -> dict[str, Any]:
        return {"codes": {str(k): v for k, v in self.codes.items()}, "in_flight": self.in_flight,
                "ttft": [self.ttft.counts, self.ttft.sum], "hops": [[h.counts, h.sum] for h in self.hops],
                "tokens": [self.prompt, self.completion, self.chunks]}


class Recorder:
    """This router process's totals per model; touched only in the ingress loop."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}  # the fleet's models and NO_MODEL: bounded
        self.changes = 0  # bumped per finished request: a flush writes only after a change
        self._flushed = -1

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def refused(self, code: int) -> None:
        """A request answered before it named a model of the fleet (401, 400, 404)."""
        self.finish(self.model(NO_MODEL), code)

    def finish(self, stats: ModelStats, code: int) -> None:
        stats.codes[code] = stats.codes.get(code, 0) + 1
        self.changes += 1

    def snapshot(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "at": time.time(), "models": {m: s.as_dict() for m, s in self.models.items()}}

    def flush(self, folder: Path | None) -> None:
        """Write this process's totals to its file (atomically), when they changed since the last flush."""
        if folder is None or self.changes == self._flushed:
            return
        self._flushed = self.changes
        path = folder / f"router-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, path)
        except OSError:
            self._flushed = -1  # try again at the next flush


def usage_tokens(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) from the ``usage`` near the end of an answer (or a stream's last events)."""
    at = body.rfind(b'"usage":', max(0, len(body) - USAGE_TAIL))
    if at < 0:
        return None
    tail = body[at:at + 400]
    prompt, completion = _PROMPT.search(tail), _COMPLETION.search(tail)
    return (int(prompt[1]) if prompt else 0, int(completion[1]) if completion else 0)


def stream_output_events(events: int, path: str) -> int:
    """Output events of a stream of ``events`` SSE events: less ``[DONE]``, and chat's first (the role)."""
    return max(0, events - (2 if path.endswith("/chat/completions") else 1))


def metrics_dir(port: int) -> Path | None:
    """The folder where this node's router processes on ``port`` write their totals: FLEET_METRICS_DIR,
    else beside Ray's session logs (a new Ray session starts from zero, as its routers do)."""
    explicit = os.environ.get("FLEET_METRICS_DIR")
    try:
        if explicit:
            base = Path(explicit)
        else:
            from serve_app.vllm_child import log_dir  # Ray's log folder of this node

            base = log_dir().parent / "vllm-fleet-metrics"
        folder = base / f"router-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_peers(folder: Path | None, own_pid: int) -> list[dict[str, Any]]:
    """Every other router process's last totals in ``folder`` (live or not)."""
    if folder is None:
        return []
    out = []
    for path in folder.glob("router-*.json"):
        with contextlib.suppress(OSError, ValueError):
            snap = json.loads(path.read_text())
            if int(snap.get("pid", -1)) != own_pid:
                out.append(snap)
    return out


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: the sums over ``snapshots`` (in flight over live processes only)."""
    n = len(LATENCY_BOUNDS) + 1
    out: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        live = snap.get("pid") == os.getpid() or _alive(int(snap.get("pid", -1)))
        for model, s in (snap.get("models") or {}).items():
            m = out.setdefault(model, {"codes": {}, "in_flight": 0, "ttft": [[0] * n, 0.0],
                                       "hops": [[[0] * n, 0.0] for _ in HOPS], "tokens": [0, 0, 0]})
            for code, count in s["codes"].items():
                m["codes"][code] = m["codes"].get(code, 0) + count
            if live:
                m["in_flight"] += s["in_flight"]
            for into, src in [(m["ttft"], s["ttft"]), *zip(m["hops"], s["hops"], strict=True)]:
                into[0] = [a + b for a, b in zip(into[0], src[0], strict=True)]
                into[1] += src[1]
            m["tokens"] = [a + b for a, b in zip(m["tokens"], s["tokens"], strict=True)]
    return out


def _buckets(counts: list[int], bounds: Iterable[float]) -> list[tuple[str, float]]:
    total, out = 0, []
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
    return out


Totals = dict[tuple[str, str], tuple[list[float], list[int], float]]


def lifecycle_totals(records: Iterable[Mapping[str, Any]]) -> Totals:
    """(model, transition) → (bounds, bucket counts, sum), summed over the engine replicas' records."""
    out: Totals = {}
    for rec in records:
        bounds = list(rec.get("bounds") or [])
        for transition, (counts, total) in (rec.get("hist") or {}).items():
            key = (str(rec.get("model")), transition)
            if key in out and out[key][0] == bounds:
                _, have, s = out[key]
                out[key] = (bounds, [a + b for a, b in zip(have, counts, strict=True)], s + total)
            elif len(counts) == len(bounds) + 1:
                out[key] = (bounds, list(counts), float(total))
    return out


class _Collector:
    def __init__(self, models: Mapping[str, Mapping[str, Any]], records: list[Mapping[str, Any]]) -> None:
        self._models, self._records = models, records

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily("fleet_requests", "Requests the endpoint answered, by model and HTTP "
                                       "status (499: the client left first; 502: the engine broke off)",
                                       labels=["model", "code"])
        in_flight = GaugeMetricFamily("fleet_requests_in_flight", "Requests being relayed now", labels=["model"])
        ttft = HistogramMetricFamily("fleet_ttft_seconds", "Time to first byte out, from the request's arrival "
                                     "(a stream's first event: its first token)", labels=["model"])
        hops = HistogramMetricFamily("fleet_router_hop_seconds", "The router's hops per request: route (arrival "
                                     "to engine chosen, a wake or load included), connect (to a connection in "
                                     "hand), engine (to the engine's first bytes), out (to the first bytes sent)",
                                     labels=["model", "hop"])
        tokens = CounterMetricFamily("fleet_tokens", "Tokens relayed: source=usage from vLLM's usage, "
                                     "source=chunks a stream's output events (no usage in it)",
                                     labels=["model", "kind", "source"])
        for model, m in sorted(self._models.items()):
            for code, count in sorted(m["codes"].items()):
                requests.add_metric([model, code], count)
            if model == NO_MODEL:
                continue
            in_flight.add_metric([model], m["in_flight"])
            ttft.add_metric([model], _buckets(m["ttft"][0], LATENCY_BOUNDS), m["ttft"][1])
            for hop, (counts, total) in zip(HOPS, m["hops"], strict=True):
                hops.add_metric([model, hop], _buckets(counts, LATENCY_BOUNDS), total)
            prompt, completion, chunks = m["tokens"]
            tokens.add_metric([model, "prompt", "usage"], prompt)
            tokens.add_metric([model, "completion", "usage"], completion)
            tokens.add_metric([model, "completion", "chunks"], chunks)
        transitions = HistogramMetricFamily(
            "fleet_model_transition_seconds", "Engine lifecycle transitions, timed where they happen: load, "
            "load_failed, wake, sleep, unload, swap (a swap member brought up: room made, then woken or loaded), "
            "swap_wait (its wait for room)", labels=["model", "transition"])
        for (model, transition), (bounds, counts, total) in sorted(lifecycle_totals(self._records).items()):
            transitions.add_metric([model, transition], _buckets(counts, bounds), total)
        yield from (requests, in_flight, ttft, hops, tokens, transitions)


def render(recorder: Recorder, folder: Path | None, records: list[Mapping[str, Any]]) -> bytes:
    """The Prometheus text of a scrape: every router process of the node merged, and the engines' records."""
    models = merge([recorder.snapshot(), *read_peers(folder, os.getpid())])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(models, records))
    return generate_latest(registry)
