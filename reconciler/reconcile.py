"""One reconcile step: lock → desired → live → plan → download → apply → Outcome. Everyone calls this.

`fleetctl apply`, `fleetctl up`, the daemon and the benchmarks call `reconcile()`; it prints
nothing and reports progress through a callback, as controller-runtime's ``Reconcile`` returns a
``Result`` that the caller's loop switches on. Level-triggered: every call reads the files and
the live Serve afresh and trusts no remembered event.

Outcomes are of two kinds (kopf's rule): *terminal* ones — the files are invalid, the fleet cannot
fit the cluster, a model failed to start — are not retried until something changes; *transient*
ones — Serve unreachable, another apply holds the lock, a model's files that could not be
downloaded (reconciler.download runs before Serve is touched) — are retried with backoff by the caller
(``requeue_after``). A model that failed to start is remembered by its desired fingerprint
(`Failures`), so a loop never re-PUTs the same broken config: it waits for the files to change.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler import apply as apply_mod
from reconciler import capacity
from reconciler import download as download_mod
from reconciler import history as history_mod
from reconciler import live as live_mod
from reconciler import lock as lock_mod
from reconciler.errors import Problem, SpecError
from reconciler.pipeline import DesiredState, desired_state
from reconciler.plan import Action, Plan, app_fingerprint, make_plan

Report = Callable[[str], None]
# Asked with the plan before anything changes; False cancels (nothing is changed).
Approve = Callable[[Plan], bool]


class Result(str, enum.Enum):
    SYNCED = "synced"  # nothing to change
    APPLIED = "applied"  # changes made and settled
    CANCELLED = "cancelled"  # approve() said no
    SPEC_ERROR = "spec_error"  # terminal until the files change
    CAPACITY = "capacity"  # terminal until the files or the cluster change
    STALE_PLAN = "stale_plan"  # a saved plan no longer matches; make a new one
    FAILED = "failed"  # a model failed to deploy (remembered by fingerprint)
    HELD = "held"  # changes held back: they failed before with this exact config
    DOWNLOAD = "download_failed"  # a model's files could not be fetched (Hub, disk); Serve untouched
    UNREACHABLE = "unreachable"  # transient: Serve / Ray cannot be reached
    LOCKED = "locked"  # transient: another apply holds the lock

    @property
    def ok(self) -> bool:
        return self in (Result.SYNCED, Result.APPLIED)

    @property
    def transient(self) -> bool:
        return self in (Result.UNREACHABLE, Result.LOCKED, Result.DOWNLOAD)


@dataclass(frozen=True)
class Outcome:
    result: Result
    message: str = ""
    problems: tuple[Problem, ...] = ()
    plan: Plan | None = None
    applied: apply_mod.ApplyResult | None = None
    desired: DesiredState | None = None
    live: live_mod.LiveState | None = None
    failed_models: tuple[str, ...] = ()
    started_at: float = 0.0  # time.time()
    seconds: float = 0.0
    requeue_after: float | None = None

    @property
    def changed(self) -> tuple[str, ...]:
        return self.applied.changed if self.applied else ()

    def as_dict(self) -> dict[str, Any]:
        """The outcome for JSON (status API, `--json`): no configs, so no env values or secrets."""
        return {
            "result": self.result.value,
            "ok": self.result.ok,
            "message": self.message,
            "problems": [p.as_dict() for p in self.problems],
            "changes": [{"model": c.model, "action": c.action.value, "reasons": list(c.reasons)}
                        for c in (self.plan.changes if self.plan else ()) if c.action is not Action.NOOP],
            "changed": list(self.changed),
            "failed_models": list(self.failed_models),
            "started_at": self.started_at,
            "first_put_at": self.applied.first_put_at if self.applied else None,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Failures:
    """Models whose start failed, by the fingerprint of the config that failed.

    A failed config is not PUT again until it changes (an edit) or someone asks explicitly
    (`fleetctl apply` forgets the memory it is given: a person typing apply means "try again").
    """

    by_model: dict[str, tuple[str, str]] = field(default_factory=dict)  # model -> (fingerprint, message)

    def record(self, model: str, fingerprint: str, message: str) -> None:
        self.by_model[model] = (fingerprint, message)

    def held(self, model: str, fingerprint: str) -> str | None:
        got = self.by_model.get(model)
        return got[1] if got and got[0] == fingerprint else None

    def forget_changed(self, desired_fps: Mapping[str, str]) -> None:
        """Drop memories whose model's desired config changed (or left the fleet)."""
        for model in list(self.by_model):
            if desired_fps.get(model) != self.by_model[model][0]:
                del self.by_model[model]


def _noop_report(_: str) -> None:
    return None


def plan_for(desired: DesiredState, live: live_mod.LiveState) -> Plan:
    """The plan from the files to this live state, with the fleet's settings and measured starts."""
    placed = desired.placed
    return make_plan(desired.config, live, foreign_apps=placed.settings.foreign_apps,
                     start_times=history_mod.load(placed.ray.dashboard_url).latest(), disabled=placed.disabled)


def reconcile(
    path: str | os.PathLike[str] = ".",
    *,
    desired: DesiredState | None = None,
    saved_plan: Plan | None = None,
    approve: Approve | None = None,
    report: Report = _noop_report,
    failures: Failures | None = None,
    timeout_s: float | None = None,
    lock_wait_s: float = 10.0,
    lock_command: str = "apply",
) -> Outcome:
    """Bring the live Serve to what the files say. Never raises for expected failures: see Result."""
    t0, started_at = time.monotonic(), time.time()

    def done(result: Result, message: str = "", **kw: Any) -> Outcome:
        return Outcome(result, message, started_at=started_at, seconds=time.monotonic() - t0, **kw)

    if desired is None:
        try:
            desired = desired_state(path)
        except SpecError as e:
            return done(Result.SPEC_ERROR, str(e), problems=tuple(e.problems))
    dashboard = desired.placed.ray.dashboard_url
    try:
        with lock_mod.apply_lock(dashboard, wait_s=lock_wait_s, command=lock_command, on_wait=report):
            return _locked(desired, saved_plan, approve, report, failures, timeout_s, done)
    except lock_mod.LockHeldError as e:
        return done(Result.LOCKED, str(e), desired=desired, requeue_after=5.0)
    except live_mod.AuthError as e:
        return done(Result.UNREACHABLE, str(e), desired=desired, requeue_after=30.0)
    except live_mod.LiveStateError as e:
        return done(Result.UNREACHABLE, str(e), desired=desired, requeue_after=5.0)


def _locked(desired: DesiredState, saved_plan: Plan | None, approve: Approve | None, report: Report,
            failures: Failures | None, timeout_s: float | None, done: Callable[..., Outcome]) -> Outcome:
    dashboard = desired.placed.ray.dashboard_url
    live = live_mod.read_live_state(dashboard)
    plan = plan_for(desired, live)
    if saved_plan is not None:
        stale = _staleness(saved_plan, plan)
        if stale:
            return done(Result.STALE_PLAN, stale, plan=plan, desired=desired, live=live)
        plan = saved_plan
    if not plan.has_changes:
        return done(Result.SYNCED, plan=plan, desired=desired, live=live)
    if failures is not None:
        failures.forget_changed({c.model: app_fingerprint(c.after) for c in plan.changes if c.after})
        held = {c.model: msg for c in plan.changes if c.after and c.action in (Action.CREATE, Action.RESTART)
                for msg in [failures.held(c.model, app_fingerprint(c.after))] if msg}
        if held and len(held) == sum(1 for c in plan.changes if c.action is not Action.NOOP):
            names = ", ".join(sorted(held))
            return done(Result.HELD, f"not retrying {names}: the same config failed to start before; "
                        "edit the model in the fleet files or run `fleetctl apply` to try again",
                        plan=plan, desired=desired, live=live, failed_models=tuple(sorted(held)))
    problems = capacity.check(plan, desired, live_mod.read_cluster_resources(dashboard))
    if problems:
        return done(Result.CAPACITY, "\n".join(str(p) for p in problems), problems=tuple(problems),
                    plan=plan, desired=desired, live=live)
    if saved_plan is None:
        plan = download_mod.annotate(plan, desired.placed)  # what the approver sees says what is downloaded
    if approve is not None and not approve(plan):
        return done(Result.CANCELLED, "apply cancelled; nothing was changed", plan=plan, desired=desired, live=live)
    try:  # a new or changed model's files first, so no engine start is also a download
        download_mod.fetch_for_plan(plan, desired.placed, report)
    except download_mod.DownloadError as e:
        return done(Result.DOWNLOAD, f"{e}\nServe was not touched.", plan=plan, desired=desired, live=live,
                    requeue_after=30.0)
    try:
        result = apply_mod.apply_plan(plan, dashboard, live_before=live, timeout_s=timeout_s, report=report)
    except apply_mod.AppFailed as e:
        if failures is not None and (c := plan.change_for(e.app)) is not None and c.after:
            failures.record(e.app, app_fingerprint(c.after), str(e))
        return done(Result.FAILED, str(e), plan=plan, desired=desired, live=live, failed_models=(e.app,))
    except apply_mod.ApplyError as e:
        return done(Result.FAILED, str(e), plan=plan, desired=desired, live=live,
                    failed_models=getattr(e, "apps", ()))
    history_mod.record(dashboard, result.start_seconds)
    return done(Result.APPLIED, plan=plan, applied=result, desired=desired, live=result.live)


def _staleness(saved: Plan, fresh: Plan) -> str:
    if saved.desired_fingerprint != fresh.desired_fingerprint:
        return ("the saved plan is stale: the fleet files changed since it was made; "
                "run `fleetctl plan -out FILE` again")
    if saved.live_fingerprint != fresh.live_fingerprint:
        return ("the saved plan is stale: the live Serve changed since it was made; "
                "run `fleetctl plan -out FILE` again")
    return ""
