"""One reconcile step: lock → desired → live → judge starts → plan → download → send → Outcome. Everyone calls this.

`fleetctl apply`, `fleetctl up`, the daemon and the benchmarks call `reconcile()`; it prints
nothing and reports progress through a callback, as controller-runtime's ``Reconcile`` returns a
``Result`` that the caller's loop switches on. Level-triggered: every call reads the files and
the live Serve afresh and trusts no remembered event.

The step never waits on an engine: it sends what differs (reconciler.change.apply) and returns; the
starts it sent are followed by reconciler.change.rollout, across the daemon's passes (``wait=False``,
``requeue_after`` says when to look again). ``wait=True`` — the CLI's contract, as Terraform's
apply — is the same step followed by a loop over the same observation until every change is up,
one failed, or someone else moved Serve under it.

Outcomes are of two kinds (kopf's rule): *terminal* ones — the files are invalid, the fleet cannot
fit the cluster, a model failed to start — are not retried until something changes; *transient*
ones — Serve unreachable, another apply holds the lock, a model's files that could not be
downloaded (reconciler.hub.download runs before Serve is touched) — are retried with backoff by the caller
(``requeue_after``). A model that failed to start is remembered by its desired fingerprint
(`Failures`), so a loop never re-PUTs the same broken config: it waits for the files to change.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from reconciler.change import apply as apply_mod
from reconciler.change import capacity
from reconciler.change import history as history_mod
from reconciler.change import lock as lock_mod
from reconciler.change import rollout as rollout_mod
from reconciler.change.plan import Action, Plan, PlanFormatError, app_fingerprint, make_plan, with_values_of
from reconciler.desired.pipeline import DesiredState, desired_state
from reconciler.errors import Problem, SpecError
from reconciler.hub import download as download_mod
from reconciler.live import engine_log
from reconciler.live import serve_state as live_mod
from serve_app.contract import ENGINE_IMPORT

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
    WAITING = "waiting"  # changes wait for an always-on model on their GPU to come up; sent after
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
    rollouts: tuple[rollout_mod.Verdict, ...] = ()  # starts still in progress after this pass

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
            "starting": [v.as_dict() for v in self.rollouts],
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


POLL_S = 1.0  # the CLI's wait reads live this often
PROGRESS_S = 2.0  # a daemon with starts in progress looks again this soon
HEARTBEAT_S = 5.0  # a progress line at least this often while waiting: time visibly moves


@dataclass
class _Ctx:
    """One call's inputs, passed down the step and the wait."""

    desired: DesiredState
    saved_plan: Plan | None
    approve: Approve | None
    report: Report
    failures: Failures | None
    rollouts: rollout_mod.Rollouts
    done: Callable[..., Outcome]
    client: httpx.Client
    logs: engine_log.Reader


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
    wait: bool = True,
    rollouts: rollout_mod.Rollouts | None = None,
) -> Outcome:
    """Bring the live Serve to what the files say. Never raises for expected failures: see Result.

    ``wait=False`` is the daemon's step: read live, judge the starts in progress (``rollouts``,
    kept by the caller across steps), plan, PUT what differs, return. ``wait=True`` is the CLI's
    contract (Terraform's): the same step, then a wait loop until every change is up or failed.
    """
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
        with lock_mod.apply_lock(dashboard, wait_s=lock_wait_s, command=lock_command, on_wait=report), \
                live_mod.make_client(dashboard, timeout=60.0) as client:
            ctx = _Ctx(desired, saved_plan, approve, report, failures,
                       rollouts if rollouts is not None else rollout_mod.Rollouts(), done, client,
                       engine_log.Reader(client))
            outcome = _step(ctx)
            if wait and outcome.result in (Result.APPLIED, Result.WAITING):
                outcome = _wait(ctx, outcome, t0 + timeout_s if timeout_s is not None else None)
            return outcome
    except lock_mod.LockHeldError as e:
        return done(Result.LOCKED, str(e), desired=desired, requeue_after=5.0)
    except live_mod.AuthError as e:
        return done(Result.UNREACHABLE, str(e), desired=desired, requeue_after=30.0)
    except live_mod.LiveStateError as e:
        return done(Result.UNREACHABLE, str(e), desired=desired, requeue_after=5.0)


def _step(ctx: _Ctx) -> Outcome:
    """Read live, judge the starts in progress, plan, send what differs; return at once."""
    desired, done = ctx.desired, ctx.done
    dashboard = desired.placed.ray.dashboard_url
    live = live_mod.read_live_state(dashboard, client=ctx.client)
    seen = _observe(ctx, live)
    plan = plan_for(desired, live)
    if ctx.saved_plan is not None:
        stale = _staleness(ctx.saved_plan, plan)
        if stale:
            return done(Result.STALE_PLAN, stale, plan=plan, desired=desired, live=live)
        try:  # a saved plan holds env values as fingerprints: given back from the files, if they match
            plan = with_values_of(ctx.saved_plan, plan)
        except PlanFormatError as e:
            return done(Result.STALE_PLAN, str(e), plan=plan, desired=desired, live=live)
    bad = [v for v in seen.over if v.phase in _BAD]
    for v in seen.over:
        if v.phase in _MOVED:
            ctx.report(f"{v.model}: {v.detail}")
    if not plan.has_changes:
        if bad:
            return _failed(ctx, bad, plan, live, seen)
        return done(Result.SYNCED, plan=plan, desired=desired, live=live, rollouts=seen.pending,
                    requeue_after=PROGRESS_S if seen.pending else None)
    held = _held_by_memory(ctx, plan, seen)
    if held and len(held) == sum(1 for c in plan.changes if c.action is not Action.NOOP):
        names = ", ".join(sorted(held))
        return done(Result.HELD, f"not sending {names} again: " + "; ".join(sorted(set(held.values()))),
                    plan=plan, desired=desired, live=live, failed_models=tuple(sorted(held)),
                    rollouts=seen.pending, requeue_after=PROGRESS_S if seen.pending else None)
    problems = capacity.check(plan, desired, live_mod.read_cluster_resources(dashboard, client=ctx.client))
    if problems:
        return done(Result.CAPACITY, "\n".join(str(p) for p in problems), problems=tuple(problems),
                    plan=plan, desired=desired, live=live, rollouts=seen.pending)
    if ctx.saved_plan is None:
        plan = download_mod.annotate(plan, desired.placed)  # what the approver sees says what is downloaded
    if ctx.approve is not None and not ctx.approve(plan):
        return done(Result.CANCELLED, "apply cancelled; nothing was changed", plan=plan, desired=desired, live=live)
    try:  # a new or changed model's files first, so no engine start is also a download
        download_mod.fetch_for_plan(plan, desired.placed, ctx.report)
    except download_mod.DownloadError as e:
        return done(Result.DOWNLOAD, f"{e}\nServe was not touched.", plan=plan, desired=desired, live=live,
                    requeue_after=30.0)
    try:
        sent = _send(ctx, plan, live, hold=set(held))
    except apply_mod.ApplyError as e:  # Serve refused the config (400): nothing was changed
        return done(Result.FAILED, str(e), plan=plan, desired=desired, live=live, rollouts=seen.pending)
    if bad:
        return _failed(ctx, bad, plan, live, seen, sent=sent)
    applied = apply_mod.ApplyResult(tuple(c.model for c in sent.changes), 0.0, 1 if sent.changes else 0, live,
                                    {}, sent.at)
    if not sent.changes:
        return done(Result.WAITING, "; ".join(f"{c.model} waits for the always-on model on its GPU to come up"
                                              for c in sent.held), plan=plan, applied=applied, desired=desired,
                    live=live, rollouts=seen.pending, requeue_after=PROGRESS_S)
    return done(Result.APPLIED, plan=plan, applied=applied, desired=desired, live=live,
                rollouts=seen.pending, requeue_after=PROGRESS_S)


# Verdicts that end a start badly: reported once, for that model only.
_BAD = (rollout_mod.Phase.FAILED, rollout_mod.Phase.UNSCHEDULABLE, rollout_mod.Phase.TIMED_OUT)
# Someone else moved Serve under a start: the CLI's wait stops and says so; a daemon pass just
# says so and sends the files' config again (it is drift like any other).
_MOVED = (rollout_mod.Phase.GONE, rollout_mod.Phase.REPLACED)


@dataclass(frozen=True)
class _Seen:
    over: tuple[rollout_mod.Verdict, ...]  # ended in this look (settled or bad)
    pending: tuple[rollout_mod.Verdict, ...]  # still starting


def _observe(ctx: _Ctx, live: live_mod.LiveState) -> _Seen:
    """Judge the starts in progress; remember what settled (start times) and what failed (by config)."""
    verdicts = ctx.rollouts.observe(live)
    over = tuple(v for v in verdicts if v.phase.over)
    pending = tuple(_with_engine_phase(ctx, v, live) for v in verdicts if not v.phase.over)
    dashboard = ctx.desired.placed.ray.dashboard_url
    history_mod.record(dashboard, {v.model: v.elapsed_s for v in over if v.phase is rollout_mod.Phase.SETTLED
                                   and v.rollout.action in (Action.CREATE, Action.RESTART)
                                   and (v.rollout.after or {}).get("import_path") == ENGINE_IMPORT})
    for v in over:
        if ctx.failures is not None and v.rollout.after and v.phase in (rollout_mod.Phase.FAILED,
                                                                        rollout_mod.Phase.TIMED_OUT):
            ctx.failures.record(v.model, v.rollout.fingerprint, _bad_message(v))
    return _Seen(over, pending)


def _with_engine_phase(ctx: _Ctx, v: rollout_mod.Verdict, live: live_mod.LiveState) -> rollout_mod.Verdict:
    app = live.apps.get(v.model)
    doing = ctx.logs.phase(v.model, app) if app is not None and v.rollout.after else ""
    return replace(v, detail=f"{v.detail} — {doing}") if doing else v


def _held_by_memory(ctx: _Ctx, plan: Plan, seen: _Seen) -> dict[str, str]:
    """Changes not sent again: the same config failed to start before, or Serve did not keep it when
    it was just applied (a field its version drops: sending it again would only loop)."""
    if ctx.failures is None:
        return {}
    ctx.failures.forget_changed({c.model: app_fingerprint(c.after) for c in plan.changes if c.after})
    just_settled = {v.model: v.rollout for v in seen.over if v.phase is rollout_mod.Phase.SETTLED}
    for c in plan.changes:
        r = just_settled.get(c.model)
        if c.action is Action.UPDATE and r is not None and c.after and r.fingerprint == app_fingerprint(c.after) \
                and r.desired_fingerprint == plan.desired_fingerprint:
            ctx.failures.record(c.model, r.fingerprint, (
                "Serve does not keep part of its config (right after it was applied, live still differed "
                f"in {', '.join(f.path for f in c.fields) or 'its config'}); the files must change first"))
    return {c.model: msg for c in plan.changes if c.after and c.action is not Action.NOOP
            for msg in [ctx.failures.held(c.model, app_fingerprint(c.after))] if msg}


def _send(ctx: _Ctx, plan: Plan, live: live_mod.LiveState, hold: set[str]) -> apply_mod.Sent:
    names = ", ".join(c.model for c in plan.changes if c.action is not Action.NOOP and c.model not in hold)
    ctx.report(f"sending the config to Serve ({len(plan.put_config['applications'])} apps; changes: {names})")
    extra = tuple(c for c in plan.changes if c.model in hold)
    sent = apply_mod.send(plan, ctx.desired.placed.ray.dashboard_url, live, client=ctx.client, also_hold=extra)
    ctx.rollouts.add([rollout_mod.rollout_for(c, live.apps.get(c.model), plan.desired_fingerprint)
                      for c in sent.changes])
    for c in sent.held:
        if c.model not in hold:
            ctx.report(f"{c.model}: waits for the always-on model on its GPU to come up first")
    return sent


def _bad_message(v: rollout_mod.Verdict) -> str:
    if v.phase is rollout_mod.Phase.FAILED:
        return str(apply_mod.AppFailed(v.model, v.detail))
    if v.phase is rollout_mod.Phase.UNSCHEDULABLE:
        return str(apply_mod.Unschedulable(v.model, v.detail))
    return f"{v.model}: {v.detail}"


def _failed(ctx: _Ctx, bad: list[rollout_mod.Verdict], plan: Plan, live: live_mod.LiveState, seen: _Seen,
            sent: apply_mod.Sent | None = None) -> Outcome:
    applied = (apply_mod.ApplyResult(tuple(c.model for c in sent.changes), 0.0, 1, live, {}, sent.at)
               if sent is not None and sent.changes else None)
    return ctx.done(Result.FAILED, "\n".join(_bad_message(v) for v in bad), plan=plan, desired=ctx.desired,
                    live=live, failed_models=tuple(v.model for v in bad), rollouts=seen.pending,
                    applied=applied, requeue_after=PROGRESS_S if seen.pending or applied else None)


def _wait(ctx: _Ctx, first: Outcome, deadline: float | None) -> Outcome:
    """The CLI's wait: look until every change sent is up (sending held-back starts when their turn
    comes), or one failed, or someone else moved Serve under us — then say so at once."""
    t0 = time.monotonic()
    assert first.applied is not None and first.plan is not None
    changed = list(first.applied.changed)
    starts: dict[str, float] = {}
    puts, last_line, last_at = first.applied.puts, "", 0.0
    dashboard = ctx.desired.placed.ray.dashboard_url
    while True:
        time.sleep(POLL_S)
        live = live_mod.read_live_state(dashboard, client=ctx.client)
        seen = _observe(ctx, live)
        starts |= {v.model: v.elapsed_s for v in seen.over if v.phase is rollout_mod.Phase.SETTLED}
        bad = [v for v in seen.over if v.phase in _BAD + _MOVED]
        if bad:
            return _failed(ctx, bad, first.plan, live, seen)
        line = "; ".join(v.line() for v in seen.pending)
        if line and (line != last_line or time.monotonic() - last_at >= HEARTBEAT_S):
            ctx.report(f"  [{time.monotonic() - t0:5.0f}s] {line}")
            last_line, last_at = line, time.monotonic()
        if deadline is not None and time.monotonic() >= deadline:
            return ctx.done(Result.FAILED, f"Serve did not settle in time; still waiting for {line or 'held starts'}",
                            plan=first.plan, desired=ctx.desired, live=live,
                            failed_models=tuple(v.model for v in seen.pending))
        if seen.pending:
            continue
        plan = plan_for(ctx.desired, live)
        if not plan.has_changes or ctx.saved_plan is not None and not _held_in(first.plan, plan):
            break
        try:  # the held-back starts' turn
            sent = _send(ctx, plan, live, hold=set(_held_by_memory(ctx, plan, seen)))
        except apply_mod.ApplyError as e:
            return ctx.done(Result.FAILED, str(e), plan=first.plan, desired=ctx.desired, live=live)
        if not sent.changes and not ctx.rollouts.pending():
            if {c.model for c in sent.held} <= set(_held_by_memory(ctx, plan, seen)):
                break  # only what failed before is left: the CLI reports success for the rest
            continue  # an always-on model someone else started is still coming up
        changed += [c.model for c in sent.changes if c.model not in changed]
        puts += 1
    starts = {m: s for m, s in starts.items() if (c := first.plan.change_for(m)) is not None
              and c.action in (Action.CREATE, Action.RESTART) and (c.after or {}).get("import_path") == ENGINE_IMPORT}
    applied = apply_mod.ApplyResult(tuple(changed), time.monotonic() - t0 + first.seconds, puts, live, starts,
                                    first.applied.first_put_at)
    return ctx.done(Result.APPLIED, plan=first.plan, applied=applied, desired=ctx.desired, live=live)


def _held_in(saved: Plan, now: Plan) -> bool:
    """Are the changes left exactly starts the saved plan holds (so applying them is still its plan)?"""
    return all((c := saved.change_for(n.model)) is not None and c.after == n.after
               for n in now.changes if n.action is not Action.NOOP)


def _staleness(saved: Plan, fresh: Plan) -> str:
    if saved.desired_fingerprint != fresh.desired_fingerprint:
        return ("the saved plan is stale: the fleet files changed since it was made; "
                "run `fleetctl plan -out FILE` again")
    if saved.live_fingerprint != fresh.live_fingerprint:
        return ("the saved plan is stale: the live Serve changed since it was made; "
                "run `fleetctl plan -out FILE` again")
    return ""
