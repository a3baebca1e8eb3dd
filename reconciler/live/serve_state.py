"""Read the live Ray Serve state from the dashboard REST API and return it as plain data.

`GET {dashboard}/api/serve/applications/` answers with every app's `deployed_app_config`
(the config as applied), its status and message, and per deployment the status and the
replicas (id, state, pid). `parse_live_state` turns that answer into frozen dataclasses and
does no I/O; `read_live_state` is the one function here that talks to the network.

Errors:
    LiveStateError        the dashboard cannot be read (permanent for this command; the CLI
    │                     prints it as one line and exits 1)
    └── AuthError         Ray asks for a token (Ray >= 2.59 token auth) or refused ours
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reconciler.errors import FleetError

APPLICATIONS_PATH = "/api/serve/applications/"


class LiveStateError(FleetError):
    """The live Serve state could not be read."""


class AuthError(LiveStateError):
    """The dashboard wants an auth token we do not have, or refused the one we sent."""


@dataclass(frozen=True)
class Replica:
    replica_id: str
    state: str
    pid: int | None = None
    node_id: str | None = None


@dataclass(frozen=True)
class DeploymentLive:
    name: str
    status: str
    message: str = ""
    replicas: tuple[Replica, ...] = ()
    target_num_replicas: int | None = None

    @property
    def running_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.state == "RUNNING")


@dataclass(frozen=True)
class AppLive:
    name: str
    status: str
    message: str = ""
    config: Mapping[str, Any] | None = None  # deployed_app_config; None for serve.run apps
    deployments: tuple[DeploymentLive, ...] = ()

    def replica_ids(self) -> dict[str, tuple[str, ...]]:
        """Per deployment the ids of replicas that are up: what tells a restart apart."""
        return {d.name: tuple(sorted(r.replica_id for r in d.replicas if r.state == "RUNNING"))
                for d in self.deployments}


@dataclass(frozen=True)
class LiveState:
    apps: Mapping[str, AppLive] = field(default_factory=dict)
    globals: Mapping[str, Any] = field(default_factory=dict)  # proxy_location, http_options
    serve_running: bool = False

    def configs(self) -> dict[str, Mapping[str, Any] | None]:
        return {name: app.config for name, app in self.apps.items()}


EMPTY = LiveState()


def parse_live_state(payload: Mapping[str, Any]) -> LiveState:
    """The dashboard's answer -> LiveState. An empty answer means Serve is not running."""
    apps = {name: _parse_app(name, a) for name, a in (payload.get("applications") or {}).items()}
    running = bool(payload.get("controller_info")) or bool(apps)
    globals_ = {k: payload[k] for k in ("proxy_location", "http_options") if payload.get(k) is not None}
    return LiveState(apps=apps, globals=globals_ if running else {}, serve_running=running)


def _parse_app(name: str, a: Mapping[str, Any]) -> AppLive:
    deployments = tuple(_parse_deployment(dn, d) for dn, d in sorted((a.get("deployments") or {}).items()))
    return AppLive(name=name, status=str(a.get("status", "UNKNOWN")), message=a.get("message") or "",
                   config=a.get("deployed_app_config"), deployments=deployments)


def _parse_deployment(name: str, d: Mapping[str, Any]) -> DeploymentLive:
    replicas = tuple(
        Replica(replica_id=str(r.get("replica_id", "")), state=str(r.get("state", "")),
                pid=r.get("pid"), node_id=r.get("node_id"))
        for r in d.get("replicas") or []
    )
    return DeploymentLive(name=name, status=str(d.get("status", "UNKNOWN")), message=d.get("message") or "",
                          replicas=replicas, target_num_replicas=d.get("target_num_replicas"))


def auth_token() -> str | None:
    """Ray's token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's order)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


# The first request to a fresh dashboard connects it to Ray, which takes seconds on a busy box.
DEFAULT_TIMEOUT_S = 30.0


def make_client(dashboard_url: str, timeout: float = DEFAULT_TIMEOUT_S) -> httpx.Client:
    """An HTTP client for the dashboard with the auth header set when a token exists."""
    return httpx.Client(base_url=dashboard_url.rstrip("/"), headers=auth_headers(), timeout=timeout)


def read_live_state(dashboard_url: str, *, client: httpx.Client | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> LiveState:
    """GET the live Serve state. Raises LiveStateError with one clear sentence."""
    own = client is None
    c = client or make_client(dashboard_url, timeout)
    try:
        resp = _get(c)
    except httpx.HTTPError as e:
        raise LiveStateError(
            f"cannot reach the Ray dashboard at {dashboard_url}: {_short(e)} — is Ray running? "
            "`fleetctl up` starts one; ray.dashboard_url in fleet.yaml says where to look") from e
    finally:
        if own:
            c.close()
    check_response(resp, dashboard_url, "read the Serve state")
    try:
        return parse_live_state(resp.json())
    except ValueError as e:
        raise LiveStateError(f"the Ray dashboard at {dashboard_url} answered with something that is "
                             f"not Serve's JSON: {_short(e)}") from e


def _get(c: httpx.Client, tries: int = 3) -> httpx.Response:
    # A fresh or busy dashboard times out or drops a connection once or twice, then answers in ms.
    for attempt in range(1, tries + 1):
        try:
            return c.get(APPLICATIONS_PATH)
        except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError):
            if attempt == tries:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def check_response(resp: httpx.Response, dashboard_url: str, doing: str) -> None:
    """Turn a non-2xx answer into LiveStateError / AuthError."""
    if resp.status_code in (401, 403):
        hint = ("set RAY_AUTH_TOKEN or put the token in ~/.ray/auth_token" if resp.status_code == 401
                else "the token in RAY_AUTH_TOKEN / ~/.ray/auth_token is not this cluster's")
        raise AuthError(f"the Ray dashboard at {dashboard_url} refused to {doing} "
                        f"({resp.status_code} {resp.text.strip()[:200]}): {hint}")
    if resp.status_code >= 400:
        raise LiveStateError(f"the Ray dashboard at {dashboard_url} could not {doing}: "
                             f"{resp.status_code} {resp.text.strip()[:2000]}")


def _short(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    resources: Mapping[str, float]  # logical totals: CPU, fleet_gpu_<i>, node:<ip>, ...


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]

    def total(self, resource: str) -> float:
        return sum(n.resources.get(resource, 0.0) for n in self.nodes)


def read_cluster_resources(dashboard_url: str, *, client: httpx.Client | None = None) -> Cluster | None:
    """The alive nodes and their logical resources (Ray's state API), or None when Ray won't say:
    a capacity check that cannot read the cluster is skipped, never a reason to refuse an apply."""
    own = client is None
    c = client or make_client(dashboard_url, timeout=10.0)
    try:
        resp = c.get("/api/v0/nodes", params={"detail": "true", "limit": 10000})
        rows = resp.json()["data"]["result"]["result"] if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        rows = None
    finally:
        if own:
            c.close()
    if not rows:
        return None
    return Cluster(tuple(Node(str(n.get("node_id")), str(n.get("node_ip")), dict(n.get("resources_total") or {}))
                         for n in rows if n.get("state") == "ALIVE"))


def read_model_states(openai: Any) -> dict[str, dict[str, Any]]:
    """Each model's lifecycle state (awake, unloaded, ...) as the fleet's endpoint (``openai``: the
    fleet's openai settings) lists it in /v1/models; {} when it does not answer (status then shows
    Serve's view alone). The key, if the fleet wants one, comes from the first env var it names."""
    # a key scoped to some models would see only those: an unscoped one first
    envs = [k.env for k in sorted(openai.api_key_entries(), key=lambda k: k.models is not None)]
    key = next((os.environ[n] for n in envs if os.environ.get(n)), None)
    host = "127.0.0.1" if openai.host in ("0.0.0.0", "::", "") else openai.host
    port = openai.port
    try:
        resp = httpx.get(f"http://{host}:{port}/v1/models", timeout=3.0,
                         headers={"Authorization": f"Bearer {key}"} if key else {})
        data = resp.json()["data"] if resp.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return {}
    return {str(m["id"]): {"state": m.get("state"), "since": m.get("since"), "reason": m.get("reason")}
            for m in data if isinstance(m, dict) and "id" in m}
