"""A model's runtime lifecycle inside its engine replica: states, activity, the idle rule. Pure: no I/O.

States: ``loading`` → ``awake`` → (``sleeping`` →) ``asleep`` → (``unloading`` →) ``unloaded``, plus
``waking`` and ``failed`` (a load that failed; the next request tries again). The Serve config never
changes with them, so plan and the daemon never see a sleeping model as drift.

Activity is read from the engine's own vLLM child, not reported by the router: in flight is the
larger of ``GET /load`` (vLLM's ``--enable-server-load-tracking``: streams until their last byte)
and the engine's running and queued requests (``/metrics`` gauges: non-streaming ones too, which
/load under-counts), and the ``/metrics`` counters of finished requests catch requests that came and
went between two looks. So it holds however many router processes relay, and costs the hot path nothing.
"""

from __future__ import annotations

import enum
import math
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serve_app.contract import EngineUserConfig, LifecycleEvent, ModelState

# /metrics counters whose change means "a request passed": vLLM's finished requests (generate and
# pooling) and the HTTP instrumentator's handled requests (it leaves out /metrics, /health, /load).
ACTIVITY_COUNTERS = ("vllm:request_success_total", "http_requests_total")
# /metrics gauges of the requests inside the engine, running or queued: in-flight is the larger of
# these and /load. vLLM 0.32's /load under-counts non-streaming requests: with three generating it
# read 0 (the gauges said 3), and a swap group cut them.
BUSY_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# How often the replica looks at its child: often enough for short test timeouts, rarely for long ones.
MIN_POLL_S, MAX_POLL_S, ASLEEP_POLL_S = 0.5, 5.0, 0.25
# An asleep model keeps its weights in host RAM (vLLM's level-1 sleep). When the host has less than
# this share of its RAM available, an asleep model is unloaded at once rather than after unload_after:
# the kernel's OOM killer would otherwise pick a process, perhaps an awake engine, and an unloaded
# model only costs a slower next start. 10 %: what is left for the OS, page cache and a waking model.
HOST_RAM_LOW_FRACTION = 0.10


def host_ram_short(available: int, total: int, fraction: float = HOST_RAM_LOW_FRACTION) -> bool:
    """True when the host's available RAM is below ``fraction`` of its total."""
    return total > 0 and available < fraction * total


class Step(str, enum.Enum):
    """What the idle rule asks the replica to do next."""

    NONE = "none"
    SLEEP = "sleep"
    WAKE = "wake"
    UNLOAD = "unload"
    LOAD = "load"


@dataclass(frozen=True)
class Rules:
    """The in-place lifecycle settings (the engine's user_config)."""

    idle_timeout_s: float | None = None  # None: never goes down
    unload_after_s: float | None = None  # asleep → unloaded after this much more idle time; None: stays asleep
    always_on: bool = False

    @classmethod
    def from_user_config(cls, config: EngineUserConfig) -> Rules:
        return cls(config.idle_timeout_s, config.unload_after_s, config.always_on)


def next_step(state: ModelState, rules: Rules, idle_s: float, in_flight: int, can_sleep: bool,
              ram_short: bool = False) -> Step:
    """The idle rule: what a replica in ``state``, idle for ``idle_s`` with ``in_flight`` requests, does now.

    ``ram_short``: the host is short of RAM (``host_ram_short``), so an asleep model unloads now."""
    if rules.always_on:  # never leaves awake; brought back if it was down when always_on was turned on
        return {ModelState.ASLEEP: Step.WAKE, ModelState.UNLOADED: Step.LOAD}.get(state, Step.NONE)
    if state is ModelState.ASLEEP:
        if in_flight:  # a request reached the sleeping vLLM, which holds it until woken
            return Step.WAKE
        if ram_short:  # its weights sit in host RAM: free them before the OOM killer picks someone
            return Step.UNLOAD
        if rules.unload_after_s is not None and rules.idle_timeout_s is not None and \
                idle_s >= rules.idle_timeout_s + rules.unload_after_s:
            return Step.UNLOAD
        return Step.NONE
    idle_out = rules.idle_timeout_s is not None and idle_s >= rules.idle_timeout_s
    if state is ModelState.AWAKE and not in_flight and idle_out:
        return Step.SLEEP if can_sleep else Step.UNLOAD
    return Step.NONE


def poll_interval(state: ModelState, rules: Rules) -> float:
    """Seconds between two looks at the child: a fifth of the idle timeout, within bounds."""
    if state is ModelState.ASLEEP:
        return ASLEEP_POLL_S
    if rules.idle_timeout_s is None:
        return MAX_POLL_S
    return min(MAX_POLL_S, max(MIN_POLL_S, rules.idle_timeout_s / 5))


def counter_total(metrics_text: str, names: tuple[str, ...] = ACTIVITY_COUNTERS) -> float:
    """Sum of every sample of the named Prometheus metrics (counters, or gauges) in a /metrics text."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(names):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in names:
                value = line.rsplit(" ", 1)[-1]
                try:
                    total += float(value)
                except ValueError:
                    continue
    return total


@dataclass
class Activity:
    """In-flight count and the last moment a request was seen (monotonic seconds)."""

    last_at: float
    in_flight: int = 0
    finished: float = math.nan  # the activity counters' total at the last look

    def observe(self, in_flight: int, finished: float, now: float) -> None:
        """One look at the child: busy now, or counters moved since the last look, means active."""
        if in_flight > 0 or (not math.isnan(self.finished) and finished != self.finished):
            self.last_at = now
        self.in_flight = in_flight
        self.finished = finished

    def touch(self, now: float) -> None:
        """A request asked for this engine (through endpoint()): active now."""
        self.last_at = max(self.last_at, now)

    def restart(self, now: float) -> None:
        """A new child: its counters start again from zero."""
        self.last_at, self.in_flight, self.finished = now, 0, math.nan


# Buckets (seconds) of the transition histograms on the endpoint's /metrics (serve_app.metrics):
# a wake is ~0.3 s on a GPU, a swap ~1-2 s, a CPU load about a minute, a large model's several.
TRANSITION_BOUNDS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
EVENTS_KEPT = 50  # the status page shows the fleet's last 50


@dataclass
class Counters:
    """How often each transition happened, how long the last and all of them took, a histogram of
    their durations, and the last EVENTS_KEPT of them with their times (for the status page)."""

    counts: dict[str, int] = field(default_factory=dict)
    last_s: dict[str, float] = field(default_factory=dict)
    total_s: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, list[int]] = field(default_factory=dict)  # per transition, not cumulative; +Inf last
    events: deque[LifecycleEvent] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))

    def add(self, what: str, seconds: float, at: float | None = None, detail: str = "") -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        self.last_s[what] = round(seconds, 3)
        self.total_s[what] = round(self.total_s.get(what, 0.0) + seconds, 3)
        counts = self.buckets.setdefault(what, [0] * (len(TRANSITION_BOUNDS) + 1))
        counts[bisect_left(TRANSITION_BOUNDS, seconds)] += 1
        self.events.append(LifecycleEvent(at=time.time() if at is None else at, event=what,
                                          seconds=round(seconds, 3), detail=detail or None))

    def record(self) -> dict[str, Any]:
        """What the engine publishes (serve_app.endpoints.publish_lifecycle): histograms and events."""
        return {"bounds": list(TRANSITION_BOUNDS),
                "hist": {w: [list(c), self.total_s.get(w, 0.0)] for w, c in self.buckets.items()},
                "events": [e.wire() for e in self.events]}

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"counts": dict(self.counts), "last_seconds": dict(self.last_s), "total_seconds": dict(self.total_s)}
