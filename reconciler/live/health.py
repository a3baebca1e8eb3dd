"""One vocabulary of health, sync and model state, shared by `fleetctl status`, the daemon's status
API and (through the same words) the router's /v1/models.

Health is ordered, worst last, as gitops-engine's ``pkg/health`` orders it; sync (does the live
config match the files?) is kept apart from health (does it work?), as Argo CD keeps them. A model
that sleeps or is unloaded by the lifecycle is *Suspended*: healthy by intent, not degraded.

Pure: reads live-state data, does no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from reconciler.live.serve_state import AppLive
from serve_app.contract import SERVE_APP_STATE, ModelState, missing_node, node_gone_message, pending_resources


class Health(str, enum.Enum):
    HEALTHY = "Healthy"
    SUSPENDED = "Suspended"  # asleep or unloaded on purpose; the next request brings it back
    PROGRESSING = "Progressing"  # deploying, starting, being deleted
    MISSING = "Missing"  # desired but not on Serve
    DEGRADED = "Degraded"  # failed, unhealthy, unschedulable
    UNKNOWN = "Unknown"  # Serve could not be read

    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    def is_worse(self, other: Health) -> bool:
        return self.rank > other.rank


_ORDER = list(Health)


class Sync(str, enum.Enum):
    SYNCED = "Synced"
    OUT_OF_SYNC = "OutOfSync"
    FOREIGN = "Foreign"  # on Serve, not the fleet's


STATE_HEALTH = {
    ModelState.READY: Health.HEALTHY,
    ModelState.AWAKE: Health.HEALTHY,
    ModelState.LOADING: Health.PROGRESSING,
    ModelState.WAKING: Health.PROGRESSING,
    ModelState.SLEEPING: Health.SUSPENDED,
    ModelState.UNLOADING: Health.SUSPENDED,
    ModelState.ASLEEP: Health.SUSPENDED,
    ModelState.UNLOADED: Health.SUSPENDED,
    ModelState.STARTING: Health.PROGRESSING,
    ModelState.STOPPING: Health.PROGRESSING,
    ModelState.UNSCHEDULABLE: Health.DEGRADED,
    ModelState.UNAVAILABLE: Health.DEGRADED,
    ModelState.FAILED: Health.DEGRADED,
    ModelState.UNHEALTHY: Health.DEGRADED,
    ModelState.ABSENT: Health.MISSING,
}

def _short_of(message: str) -> bool:
    """A replica waits for resources Ray does not have (Serve's message, parsed by the contract). A busy
    box can be merely slow to start a worker; only a resource below what is required means "cannot"."""
    pending = pending_resources(message)
    if pending is None:
        return False
    required, available = pending
    return any(available.get(k, 0.0) + 1e-9 < v for k, v in required.items())


@dataclass(frozen=True)
class AppHealth:
    state: ModelState
    health: Health
    message: str = ""


def unschedulable_reason(app: AppLive) -> str | None:
    """Serve's own words when a replica of this app waits for resources Ray does not have, else None."""
    for d in app.deployments:
        if d.message and _short_of(d.message) and d.running_replicas < (d.target_num_replicas or 1):
            return d.message.strip()
    return None


def lost_node(app: AppLive) -> str | None:
    """The node an app's waiting replica is pinned to, when that node is not in the cluster."""
    for d in app.deployments:
        node = missing_node(d.message or "")
        if node and d.running_replicas < (d.target_num_replicas or 1):
            return node
    return None


def app_health(app: AppLive | None) -> AppHealth:
    """State and health of one application from its live data."""
    if app is None:
        return AppHealth(ModelState.ABSENT, Health.MISSING)
    lost = lost_node(app)
    if lost and app.status != "RUNNING":
        return AppHealth(ModelState.UNAVAILABLE, Health.DEGRADED, node_gone_message(lost))
    reason = unschedulable_reason(app)
    if reason and app.status != "RUNNING":
        return AppHealth(ModelState.UNSCHEDULABLE, Health.DEGRADED, reason)
    state = SERVE_APP_STATE.get(app.status, ModelState.UNHEALTHY)
    message = "" if state is ModelState.READY else _messages(app)
    return AppHealth(state, STATE_HEALTH[state], message)


def _messages(app: AppLive) -> str:
    """Serve's app message ("Failed to update the deployments ['engine'].") and then each
    deployment's, which carries the engine's own error."""
    parts = [app.message.strip()] + [d.message.strip() for d in app.deployments
                                     if d.message and d.message.strip() not in app.message]
    return "\n".join(p for p in parts if p)


def worst(healths: list[Health]) -> Health:
    return max(healths, key=lambda h: h.rank, default=Health.HEALTHY)
