"""What became of the configs sent to Serve: each start in progress, judged against the live state.

Argo CD keeps *sync* (what was sent) apart from *health* (what became of it); this module is the
second half. `apply.send` PUTs and returns; a `Rollout` remembers, per changed app, what was sent
and when, and `Rollouts.observe(live)` judges each against a freshly read live state: settled,
still starting (and what the engine is doing), failed with Serve's message, unschedulable, gone
(someone removed it) or replaced (someone sent another config). Nothing here waits or talks to
Serve: the daemon observes once per pass, `fleetctl apply` observes in its wait loop.

The memory is only for what live cannot say: when a start began (elapsed, measured start times),
the replicas that ran before a restart (so "settled" means new ones), and the config each start was
for (so a failure is pinned to that config). Correctness never depends on it: the next plan is
made from the files and live alone.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.change import diff
from reconciler.change.plan import Action, Change, app_fingerprint
from reconciler.live.health import unschedulable_reason
from reconciler.live.serve_state import AppLive, LiveState

FAILED = "DEPLOY_FAILED"
# An app that was DEPLOY_FAILED before our PUT may still show that for a moment afterwards; an app
# just PUT may not be listed yet for a moment.
GRACE_S = 3.0
MARGIN_S = 120.0  # Serve's own work around an engine's start bound


class Phase(str, enum.Enum):
    SETTLED = "settled"
    STARTING = "starting"
    FAILED = "failed"
    UNSCHEDULABLE = "unschedulable"
    GONE = "gone"  # the app left Serve while it started: removed by someone else
    REPLACED = "replaced"  # Serve now has another config for it: sent by someone else
    TIMED_OUT = "timed_out"

    @property
    def over(self) -> bool:
        """No longer followed: reported once; the next plan (made from live) decides what, if anything,
        to send. An unschedulable replica stays pending in Serve and is placed if room appears;
        `status` keeps showing Serve's reason meanwhile."""
        return self is not Phase.STARTING


@dataclass(frozen=True)
class Rollout:
    """One change sent to Serve."""

    model: str
    action: Action
    after: Mapping[str, Any] | None  # the app config sent (None for a delete)
    old_replicas: frozenset[str]  # running replica ids before a restart
    sent_at: float  # time.time()
    sent_mono: float
    bound_s: float | None  # start bound of the engine + Serve's margin; None: no bound
    desired_fingerprint: str  # of the whole desired config it was sent with

    @property
    def fingerprint(self) -> str:
        return app_fingerprint(self.after) if self.after else ""

    def elapsed(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.sent_mono


@dataclass(frozen=True)
class Verdict:
    rollout: Rollout
    phase: Phase
    detail: str = ""  # what is awaited, or Serve's message
    elapsed_s: float = 0.0

    @property
    def model(self) -> str:
        return self.rollout.model

    def as_dict(self) -> dict[str, Any]:
        """For /status and `--json`: no configs (so no env values)."""
        return {"model": self.model, "action": self.rollout.action.value, "phase": self.phase.value,
                "detail": self.detail, "elapsed_s": round(self.elapsed_s, 1), "sent_at": self.rollout.sent_at}

    def line(self) -> str:
        return f"{self.model}: {self.detail or self.phase.value}"


def start_bound(change: Change) -> float | None:
    """The engine's own start bound plus Serve's margin; None when the model says `never`."""
    if change.action is Action.DELETE or not change.after:
        return MARGIN_S
    args = change.after.get("args") or {}
    if "start_timeout_s" in args and args["start_timeout_s"] is None:
        return None
    return float(args.get("start_timeout_s") or 0.0) + MARGIN_S


def rollout_for(change: Change, before: AppLive | None, desired_fingerprint: str) -> Rollout:
    old = frozenset(r for ids in before.replica_ids().values() for r in ids) if before else frozenset()
    return Rollout(change.model, change.action, change.after, old, time.time(), time.monotonic(),
                   start_bound(change), desired_fingerprint)


def judge(change: Change, now: AppLive | None, before: AppLive | None) -> str:
    """'ok', or what is still awaited ('DEPLOY_FAILED…' when the app has failed)."""
    if change.action is Action.DELETE:
        return "ok" if now is None else f"being deleted ({now.status})"
    if now is None:
        return "not yet known to Serve"
    if now.status == FAILED or any(d.status == FAILED for d in now.deployments):
        return FAILED
    if now.status != "RUNNING":
        return now.status.lower()
    for d in now.deployments:
        if d.status != "HEALTHY":
            return f"{d.name} {d.status.lower()}"
        if d.target_num_replicas is not None and d.running_replicas != d.target_num_replicas:
            return f"{d.name} {d.running_replicas}/{d.target_num_replicas} replicas running"
    if change.action is Action.RESTART and before is not None:
        old = {r for ids in before.replica_ids().values() for r in ids}
        if old & {r for ids in now.replica_ids().values() for r in ids}:
            return "old replicas still running"
    return "ok"


def judge_rollout(r: Rollout, now: AppLive | None, *, first_seen: str = "", mono: float | None = None) -> Verdict:
    """One rollout against the app as Serve has it now. ``first_seen``: the fingerprint of the config
    Serve showed for it when first seen after the send ("" before that)."""
    mono = mono if mono is not None else time.monotonic()
    elapsed = r.elapsed(mono)
    early = elapsed < GRACE_S
    if r.action is Action.DELETE:
        if now is None:
            return Verdict(r, Phase.SETTLED, "deleted", elapsed)
        return _bounded(r, Verdict(r, Phase.STARTING, f"being deleted ({now.status.lower()})", elapsed))
    if now is None:
        if early:
            return Verdict(r, Phase.STARTING, "not yet known to Serve", elapsed)
        return Verdict(r, Phase.GONE, "removed from Serve while it started (by someone else: another "
                       "apply, a dashboard, a daemon with other files?)", elapsed)
    if r.after is not None and now.config is not None and _replaced(r.after, now.config, first_seen):
        return Verdict(r, Phase.REPLACED, "Serve now has another config for it (sent by someone else: another "
                       "apply, a dashboard, a daemon with other files?)", elapsed)
    # A judge over a Change built from the rollout keeps one rule for what "settled" means.
    change = Change(r.action, r.model, None, r.after)
    before = _as_app(r.old_replicas)
    verdict = judge(change, now, before)
    if verdict == "ok":
        return Verdict(r, Phase.SETTLED, "healthy", elapsed)
    if verdict == FAILED and not early:
        return Verdict(r, Phase.FAILED, failure_message(now), elapsed)
    if reason := unschedulable_reason(now):
        return Verdict(r, Phase.UNSCHEDULABLE, reason, elapsed)
    return _bounded(r, Verdict(r, Phase.STARTING, verdict, elapsed))


def _bounded(r: Rollout, v: Verdict) -> Verdict:
    if r.bound_s is not None and v.elapsed_s > r.bound_s:
        return replace(v, phase=Phase.TIMED_OUT,
                       detail=f"not healthy after {v.elapsed_s:.0f} s (its start bound and Serve's margin); "
                              f"last seen: {v.detail}")
    return v


def _replaced(sent: Mapping[str, Any], live: Mapping[str, Any], first_seen: str) -> bool:
    """Does Serve now hold another config than ours? Compared by the diff's own rules (fields Serve
    fills in); and where Serve never kept part of ours (a field its version drops), against what it
    showed when first seen, so that a dropped field is not taken for another writer."""
    if diff.diff_app(sent, live).action is diff.Action.NOOP:
        return False
    return bool(first_seen) and app_fingerprint(live) != first_seen


def _as_app(replica_ids: frozenset[str]) -> AppLive | None:
    from reconciler.live.serve_state import DeploymentLive, Replica

    if not replica_ids:
        return None
    reps = tuple(Replica(i, "RUNNING") for i in sorted(replica_ids))
    return AppLive("", "RUNNING", deployments=(DeploymentLive("", "HEALTHY", replicas=reps),))


def failure_message(app: AppLive) -> str:
    parts = [app.message] + [f"{d.name}: {d.message}" for d in app.deployments
                             if d.message and d.message not in app.message]
    return "\n".join(p for p in parts if p) or "(Serve gave no message)"


@dataclass
class Rollouts:
    """The starts in progress, by model; one writer (the loop or the CLI's wait)."""

    by_model: dict[str, Rollout] = field(default_factory=dict)
    first_seen: dict[str, str] = field(default_factory=dict)  # model -> live config fingerprint

    def add(self, rollouts: list[Rollout]) -> None:
        for r in rollouts:  # a newer config for a model replaces the one still starting
            self.by_model[r.model] = r
            self.first_seen.pop(r.model, None)

    def observe(self, live: LiveState) -> list[Verdict]:
        """Judge every followed start; those that are over are forgotten (their verdict returned once)."""
        mono = time.monotonic()
        verdicts = []
        for m, r in self.by_model.items():
            now = live.apps.get(m)
            if now is not None and now.config is not None and m not in self.first_seen:
                self.first_seen[m] = app_fingerprint(now.config)
            verdicts.append(judge_rollout(r, now, first_seen=self.first_seen.get(m, ""), mono=mono))
        for v in verdicts:
            if v.phase.over:
                del self.by_model[v.model]
                self.first_seen.pop(v.model, None)
        return verdicts

    def pending(self) -> list[str]:
        return list(self.by_model)

    def clear(self) -> None:
        self.by_model.clear()
        self.first_seen.clear()
