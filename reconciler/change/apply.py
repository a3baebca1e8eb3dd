"""Send a Plan to the live Serve: PUT the desired config and return. Nothing here waits.

The only module that changes Serve. Serve's PUT replaces the whole set of declarative apps
(DESIGN choice 6), so every PUT carries every app we keep; it is declarative, so a newer config
replaces one still deploying (Kubernetes-style: a second edit to a model that is mid-start just
sends its new config). Engines that share a GPU start in turns (serve_app.gpu_turns); a start
that shares a GPU with an always-on model that is itself starting is held back (its app stays as
it is live) until that model is up, so the always-on model is never queued behind the others.
Elsewhere (the CPU, GPUs of their own) nothing waits, and one PUT starts everything at once.

What became of a PUT is reconciler.change.rollout's business; waiting for it is the CLI's
(reconciler.loop.reconcile.reconcile with wait=True), never a daemon pass's.

Errors:
    ApplyError            Serve refused the PUT, or the fleet did not settle in time
    ├── AppFailed         an app went DEPLOY_FAILED; carries Serve's message (the engine's error)
    └── Unschedulable     Ray cannot place a replica; carries Serve's reason and what to change
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from reconciler.change.plan import Action, Change, Plan
from reconciler.errors import FleetError
from reconciler.live import serve_state as live_mod
from reconciler.live.serve_state import AppLive, LiveState


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


def held_back(plan: Plan, live: LiveState) -> tuple[Change, ...]:
    """Starts that wait this time: those sharing a GPU with an always-on model that is starting
    (in this plan, or still coming up from an earlier PUT), so it is never queued behind them.
    Elsewhere (the CPU, GPUs of their own) nothing waits: every engine starts at once."""
    starting = [c for c in plan.changes if c.action in (Action.CREATE, Action.RESTART)]
    busy: set[int] = set()
    for c in plan.changes:
        starts_now = c.action in (Action.CREATE, Action.RESTART)
        if c.always_on and (starts_now or (c.action is not Action.DELETE and _coming_up(live.apps.get(c.model)))):
            busy |= _gpus(c)
    return tuple(c for c in starting if not c.always_on and _gpus(c) & busy)


def _coming_up(app: AppLive | None) -> bool:
    return app is not None and app.status in ("DEPLOYING", "NOT_STARTED")


def body_without(plan: Plan, held: Sequence[Change]) -> dict[str, Any]:
    """The plan's PUT body with the held changes not made: their apps as they are live (or absent)."""
    if not held:
        return dict(plan.put_config)
    keep_live = {c.model: c.before for c in held}
    apps: list[Mapping[str, Any]] = []
    for app in plan.put_config["applications"]:
        name = app["name"]
        if name not in keep_live:
            apps.append(app)
        elif keep_live[name] is not None:
            apps.append(keep_live[name])  # type: ignore[arg-type]
    body = copy.deepcopy(dict(plan.put_config))
    body["applications"] = copy.deepcopy(apps)
    return body


@dataclass(frozen=True)
class Sent:
    """One PUT: the changes it makes, and those held back for a later one."""

    changes: tuple[Change, ...]
    held: tuple[Change, ...]
    at: float  # time.time()


def send(plan: Plan, dashboard_url: str, live: LiveState, *, client: httpx.Client | None = None,
         also_hold: Sequence[Change] = ()) -> Sent:
    """PUT the plan's config (less the starts held back, and ``also_hold``) and return at once."""
    changed = tuple(c for c in plan.changes if c.action is not Action.NOOP)
    held = (*held_back(plan, live), *(c for c in also_hold if c.action is not Action.NOOP))
    held_names = {c.model for c in held}
    at = time.time()
    if not [c for c in changed if c.model not in held_names]:
        return Sent((), held, at)
    own = client is None
    c = client or live_mod.make_client(dashboard_url, timeout=60.0)
    try:
        put_config(c, dashboard_url, body_without(plan, held))
    finally:
        if own:
            c.close()
    return Sent(tuple(ch for ch in changed if ch.model not in held_names), held, at)


def _gpus(change: Change) -> set[int]:
    return set((change.after or change.before or {}).get("args", {}).get("gpus") or [])


def put_config(client: httpx.Client, dashboard_url: str, body: Mapping[str, Any]) -> None:
    try:
        resp = client.put(live_mod.APPLICATIONS_PATH, json=body)
    except httpx.HTTPError as e:
        raise live_mod.LiveStateError(f"cannot reach the Ray dashboard at {dashboard_url}: {e}") from e
    if resp.status_code == 400:
        raise ApplyError(f"Serve refused the config: {resp.text.strip()[:4000]}")
    live_mod.check_response(resp, dashboard_url, "accept the config")


def _tail(message: str, lines: int = 40) -> str:
    """Serve's messages carry whole tracebacks; the engine's own error is at the end."""
    kept = message.strip().splitlines()
    if len(kept) > lines:
        kept = ["  ..."] + kept[-lines:]
    return "\n".join(f"  {line}" for line in kept)
