"""Apply a Plan to the live Serve: PUT the full desired config, then wait until it has settled.

The only module that changes Serve. Serve's PUT replaces the whole set of declarative apps
(DESIGN choice 6), so every PUT carries every app we keep. Engines that share a GPU start in
turns (serve_app.gpu_turns); when an always-on model is being created or restarted on a GPU
that another changed engine also uses, a first PUT holds the always-on apps at their desired
config and every other app at its live config; once those are up, the full config follows, so
the always-on model is never queued behind the others. Elsewhere (the CPU, GPUs of its own)
nothing queues, and one PUT starts everything at once: on a fresh box the chat model is not
held back behind the embedder.

Waiting reads the live state each second (level-triggered) and judges each changed app:
RUNNING with every deployment HEALTHY, and for a restart every running replica id new.

While it waits it reports, every few seconds, each pending model's elapsed time and what its
engine is doing (read from vLLM's own log: downloading, loading weights, compiling, ...).

Errors:
    ApplyError            Serve refused the PUT, or did not settle in time
    ├── AppFailed         an app went DEPLOY_FAILED; carries Serve's message (the engine's error)
    └── Unschedulable     Ray cannot place a replica; carries Serve's reason and what to change
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from reconciler import engine_log
from reconciler import live as live_mod
from reconciler.errors import FleetError
from reconciler.health import unschedulable_reason
from reconciler.live import AppLive, LiveState
from reconciler.plan import Action, Change, Plan
from serve_app.contract import ENGINE_IMPORT

Report = Callable[[str], None]
_FAILED = "DEPLOY_FAILED"
# An app that was DEPLOY_FAILED before our PUT may still show that for a moment afterwards.
_FAILURE_GRACE_S = 3.0
DEFAULT_MARGIN_S = 120.0
NO_BOUND_S = 3600.0
# A progress line at least this often while waiting, even when nothing changed: time visibly moves.
HEARTBEAT_S = 5.0


class ApplyError(FleetError):
    """Serve refused the config, or the fleet did not settle in time."""


class Unschedulable(ApplyError):
    def __init__(self, app: str, reason: str) -> None:
        self.app = app
        self.apps = (app,)
        super().__init__(
            f"{app} cannot be scheduled: Ray has no room for its replica. Serve says:\n{_tail(reason)}\n"
            "Free the resources it names (stop or shrink another model, lower replicas or gpu_memory), "
            "or give the Ray cluster more of them; `fleetctl status` shows the same reason.")


class AppFailed(ApplyError):
    def __init__(self, app: str, message: str) -> None:
        self.app = app
        self.serve_message = message
        super().__init__(f"{app} failed to deploy:\n{_tail(message)}")


@dataclass(frozen=True)
class ApplyResult:
    changed: tuple[str, ...]
    seconds: float
    puts: int
    live: LiveState
    start_seconds: dict[str, float] = field(default_factory=dict)  # created/restarted model -> PUT to healthy
    first_put_at: float | None = None  # time.time() when the first PUT was sent


def _noop_report(_: str) -> None:
    return None


def apply_plan(plan: Plan, dashboard_url: str, *, live_before: LiveState,
               timeout_s: float | None = None, report: Report = _noop_report,
               client: httpx.Client | None = None, poll_s: float = 1.0) -> ApplyResult:
    """PUT what the plan says and wait for every changed app. A plan with no changes PUTs nothing."""
    t0 = time.monotonic()
    changed = tuple(c for c in plan.changes if c.action is not Action.NOOP)
    if not changed:
        return ApplyResult((), time.monotonic() - t0, 0, live_before)
    deadline = t0 + (timeout_s if timeout_s is not None else default_timeout(changed))
    own = client is None
    c = client or live_mod.make_client(dashboard_url, timeout=60.0)
    try:
        puts = 0
        state = live_before
        starts: dict[str, float] = {}
        first_put_at = None
        for body, targets in phases(plan):
            names = ", ".join(t.model for t in targets)
            report(f"sending the config to Serve ({len(body['applications'])} apps; waiting for {names})")
            first_put_at = first_put_at or time.time()
            put_config(c, dashboard_url, body)
            puts += 1
            state = wait_settled(c, dashboard_url, targets, live_before, deadline=deadline,
                                 report=report, poll_s=poll_s, settled_after=starts)
        starts = {m: s for m, s in starts.items()
                  if (ch := plan.change_for(m)) is not None and ch.action in (Action.CREATE, Action.RESTART)
                  and (ch.after or {}).get("import_path") == ENGINE_IMPORT}
        return ApplyResult(tuple(t.model for t in changed), time.monotonic() - t0, puts, state, starts,
                           first_put_at)
    finally:
        if own:
            c.close()


def default_timeout(changes: Sequence[Change]) -> float:
    """The longest engine start bound among the changed apps, plus a margin for Serve."""
    bounds = [(c.after or {}).get("args", {}).get("start_timeout_s", 0.0) for c in changes]
    if any(b is None for b in bounds):  # "never": the engine has no bound, so neither do we, nearly
        return NO_BOUND_S
    return max((float(b or 0.0) for b in bounds), default=0.0) + DEFAULT_MARGIN_S


def phases(plan: Plan) -> list[tuple[dict[str, Any], tuple[Change, ...]]]:
    """The PUT bodies in order, each with the changes it must bring about."""
    changed = [c for c in plan.changes if c.action is not Action.NOOP]
    starting = [c for c in changed if c.action in (Action.CREATE, Action.RESTART)]
    first = [c for c in starting if c.always_on and _gpus(c) & set().union(*(_gpus(o) for o in starting if o is not c))]
    full = (dict(plan.put_config), tuple(changed))
    if not first or len(first) == len(changed):
        return [full]
    return [(_always_on_first_body(plan, {c.model for c in first}), tuple(first)), full]


def _gpus(change: Change) -> set[int]:
    return set((change.after or {}).get("args", {}).get("gpus") or [])


def _always_on_first_body(plan: Plan, first: set[str]) -> dict[str, Any]:
    """Always-on apps as desired; every other app exactly as it is live (so unchanged)."""
    by_name = {c.model: c for c in plan.changes}
    apps: list[Mapping[str, Any]] = []
    for app in plan.put_config["applications"]:
        c = by_name.get(app["name"])
        if c is None or c.model in first or c.action is Action.NOOP:
            apps.append(app)  # foreign apps kept, unchanged apps, the always-on ones
        elif c.before is not None:
            apps.append(c.before)
    # Apps the full config deletes stay until the second PUT.
    apps += [c.before for c in plan.changes if c.action is Action.DELETE and c.before is not None]
    body = copy.deepcopy(dict(plan.put_config))
    body["applications"] = copy.deepcopy(apps)
    return body


def put_config(client: httpx.Client, dashboard_url: str, body: Mapping[str, Any]) -> None:
    try:
        resp = client.put(live_mod.APPLICATIONS_PATH, json=body)
    except httpx.HTTPError as e:
        raise live_mod.LiveStateError(f"cannot reach the Ray dashboard at {dashboard_url}: {e}") from e
    if resp.status_code == 400:
        raise ApplyError(f"Serve refused the config: {resp.text.strip()[:4000]}")
    live_mod.check_response(resp, dashboard_url, "accept the config")


def wait_settled(client: httpx.Client, dashboard_url: str, targets: Sequence[Change],
                 before: LiveState, *, deadline: float, report: Report, poll_s: float = 1.0,
                 settled_after: dict[str, float] | None = None) -> LiveState:
    """Poll until every target has settled; raise AppFailed / Unschedulable / ApplyError otherwise.

    ``settled_after`` receives, per target, the seconds from the start of the wait to settled.
    """
    started = time.monotonic()
    last_line, last_at = "", 0.0
    logs = engine_log.Reader(client)
    while True:
        state = live_mod.read_live_state(dashboard_url, client=client)
        pending: list[str] = []
        for change in targets:
            now = state.apps.get(change.model)
            verdict = judge(change, now, before.apps.get(change.model))
            if verdict == "ok":
                if settled_after is not None:
                    settled_after.setdefault(change.model, time.monotonic() - started)
                continue
            if verdict.startswith(_FAILED) and time.monotonic() - started >= _FAILURE_GRACE_S:
                raise AppFailed(change.model, _failure_message(state.apps[change.model]))
            if now is not None and (reason := unschedulable_reason(now)):
                raise Unschedulable(change.model, reason)
            doing = logs.phase(change.model, now) if now is not None else ""
            pending.append(f"{change.model}: {verdict}" + (f" — {doing}" if doing else ""))
        if not pending:
            return state
        line = "; ".join(pending)
        if line != last_line or time.monotonic() - last_at >= HEARTBEAT_S:
            report(f"  [{time.monotonic() - started:5.0f}s] {line}")
            last_line, last_at = line, time.monotonic()
        if time.monotonic() >= deadline:
            raise ApplyError(f"Serve did not settle in time; still waiting for {line}")
        time.sleep(poll_s)


def judge(change: Change, now: AppLive | None, before: AppLive | None) -> str:
    """'ok', or what is still awaited ('DEPLOY_FAILED…' when the app has failed)."""
    if change.action is Action.DELETE:
        return "ok" if now is None else f"being deleted ({now.status})"
    if now is None:
        return "not yet known to Serve"
    if now.status == _FAILED or any(d.status == _FAILED for d in now.deployments):
        return f"{_FAILED}"
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


def _failure_message(app: AppLive) -> str:
    parts = [app.message] + [f"{d.name}: {d.message}" for d in app.deployments
                             if d.message and d.message not in app.message]
    return "\n".join(p for p in parts if p) or "(Serve gave no message)"


def _tail(message: str, lines: int = 40) -> str:
    """Serve's messages carry whole tracebacks; the engine's own error is at the end."""
    kept = message.strip().splitlines()
    if len(kept) > lines:
        kept = ["  ..."] + kept[-lines:]
    return "\n".join(f"  {line}" for line in kept)
