"""The contract between the reconciler (which writes the Serve config) and serve_app (which runs it).

Both sides import these names instead of spelling them: application and deployment names, import
paths, the shape of the engine's constructor ``args`` and of each deployment's ``user_config``, and
where an engine replica writes vLLM's log. docs/contracts.md shows a whole config.

Import-free on purpose (no Ray, no FastAPI; the standard library only): the reconciler imports it on every command.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, NotRequired, TypedDict

ROUTER_APP = "router"  # the router's application; no model may take this name
ROUTER_DEPLOYMENT = "router"
ROUTER_IMPORT = "serve_app.router:app"
SWAP_APP = "swap-groups"  # the swap groups' coordinator (present when the fleet has groups)
SWAP_DEPLOYMENT = "swap"
SWAP_IMPORT = "serve_app.swap:app"
ENGINE_DEPLOYMENT = "engine"
ENGINE_IMPORT = "serve_app.engine:app"
# An application belongs to the fleet when its import_path starts with this.
FLEET_IMPORT_PREFIX = "serve_app."

# Logical CPUs an engine replica asks of Ray. Zero: the replica itself is an idle asyncio process
# (vLLM runs in its child), so CPUs never limit how many models a box declares; GPU shares do, as
# fleet_gpu_<i> resources. A model that is unloaded keeps its replica, and so must not hold a CPU.
ENGINE_NUM_CPUS = 0


# Serve's default is 20 tries; an engine that failed 3 times will fail again. Then the app is
# DEPLOY_FAILED with vLLM's error, and nothing retries until its config changes. Set in code: the
# REST config (Ray 2.60's DeploymentSchema) has no such field and drops it silently.
ENGINE_START_ATTEMPTS = 3


def gpu_resource(index: int) -> str:
    """The Ray custom resource for GPU ``index`` of a node (declared with capacity 1 at `ray start`)."""
    return f"fleet_gpu_{index}"


# Ray gives each node a resource ``node:<its IP>`` (capacity 1) and the head ``node:__internal_head__``;
# asking for a sliver of one pins a replica to that node without limiting how many fit there.
NODE_PIN = 0.001
HEAD_NODE_RESOURCE = "node:__internal_head__"


def node_resource(ip: str) -> str:
    """The Ray resource that only the node with this IP has."""
    return f"node:{ip}"


# What Serve (2.60, deployment_state.py) writes into a deployment's message when a replica waits
# for Ray to place it: '... Resources required for each replica: {...}, total resources available:
# {...}. ...'. A replica pinned to a node that is gone asks for a node:<ip> that nothing offers.
_PENDING = re.compile(r"Resources required for each replica: (?P<required>\{.*?\}), "
                      r"total resources available: (?P<available>\{.*?\})\.")


def node_gone_message(ip: str) -> str:
    """The one wording of an unavailable model, for `fleetctl status`, /v1/models and the 503."""
    return (f"its node {ip} is not in the Ray cluster (lost, or not joined yet); Serve starts it again "
            "when the node is back")


def missing_node(message: str) -> str | None:
    """The IP of the node a waiting replica is pinned to when the cluster lacks that node, else None."""
    m = _PENDING.search(message or "")
    if not m:
        return None
    try:
        required, available = json.loads(m["required"]), json.loads(m["available"])
    except ValueError:
        return None
    for name in required:
        if name.startswith("node:") and name != HEAD_NODE_RESOURCE and name not in available:
            return str(name).removeprefix("node:")
    return None


# Engines off the head listen on their node's address; vLLM's --api-key guards /v1 only, so the
# fleet adds this ASGI middleware (vLLM --middleware) to require the fleet's internal token on
# every path. The token reaches vLLM in ENGINE_TOKEN_ENV and the routers send it in this header.
ENGINE_TOKEN_HEADER = "x-fleet-engine-token"
ENGINE_TOKEN_ENV = "FLEET_ENGINE_TOKEN"
ENGINE_MIDDLEWARE = "serve_app.engine_auth.RequireFleetToken"


def engine_log_name(model: str, replica_pid: int) -> str:
    """vLLM's log file of one engine replica: known from the live state (model, replica pid) alone,
    so `fleetctl apply` and the daemon can show what a starting engine is doing."""
    return f"vllm-{model}-{replica_pid}.log"


class EngineArgs(TypedDict):
    """An engine application's ``args`` (its constructor arguments: any change restarts it)."""

    model: str  # --served-model-name, and the OpenAI model id
    source: str  # hf://org/name@rev | /abs/path | pkg://package/path
    task: str  # generate | embed
    engine_argv: list[str]  # vLLM flags, argv elements (never a shell string)
    env: dict[str, str]
    gpus: list[int]  # physical GPU indices on its node; [] = CPU
    start_timeout_s: float | None  # None = no bound
    # Only for a swap group's member (absent otherwise, so other engines' args never change):
    # it starts unloaded and loads only when the group's coordinator (SWAP_APP) has made room.
    swap_group: NotRequired[str]
    # Only when its replicas split ``gpus``: each replica claims its own this many of them on start
    # (serve_app.gpu_turns.claim_gpus), in order; absent = every replica on all of ``gpus``.
    replica_gpus: NotRequired[int]


class EngineUserConfig(TypedDict, total=False):
    """An engine deployment's ``user_config``: changed in place, no restart."""

    idle_timeout_s: float | None  # None = never idle out
    unload_after_s: float | None  # asleep (GPU) → unloaded after this much more idle time; None = stays asleep
    always_on: bool


class SwapGroupConfig(TypedDict):
    """One swap group as the coordinator sees it."""

    awake: int  # at most this many members loaded (not asleep/unloaded) at once
    members: list[str]  # model names (each its own engine application)
    queue_timeout_s: float | None  # bound on waiting for busy members; None = no bound


class SwapUserConfig(TypedDict):
    """The swap coordinator's ``user_config``: every group, changed in place."""

    groups: dict[str, SwapGroupConfig]


class RouterArgs(TypedDict):
    """The router application's ``args``: where its replicas serve HTTP (a change restarts them)."""

    host: str  # openai.host
    port: int  # openai.port; every replica on a node binds it with SO_REUSEPORT


class RouterModel(TypedDict, total=False):
    task: str
    always_on: bool
    tool_parser: str  # present only when the engine takes tools (vLLM --tool-call-parser)
    swap_group: str  # present only for members of a swap group
    node: str  # present only when pinned: the node's IP; its model is unavailable while the node is gone


class KeyScope(TypedDict, total=False):
    """What one API key may do (serve_app.keys); a key without an entry may use every model, unlimited."""

    models: list[str]  # fnmatch patterns on model names; absent = every model
    rpm: int  # requests per minute per router replica; absent = no limit


class RouterUserConfig(TypedDict, total=False):
    """The router deployment's ``user_config``: the model list and keys, changed in place."""

    models: dict[str, RouterModel]
    api_key_envs: list[str]  # environment-variable NAMES, never keys
    key_scopes: dict[str, KeyScope]  # by env NAME; present only when a key is scoped
    load_timeout_s: float | None


def is_fleet_app(app_config: dict[str, Any] | None) -> bool:
    return bool(app_config) and str(app_config.get("import_path", "")).startswith(FLEET_IMPORT_PREFIX)


class ModelState(str, enum.Enum):
    """One word for what a model is doing, the same in `fleetctl status`, the daemon's API and the
    router's /v1/models. Serve's application status gives the first group; a running engine's
    lifecycle refines "ready" into the second."""

    STARTING = "starting"  # Serve is deploying it (replica and engine coming up)
    READY = "ready"  # Serve: running and healthy
    LOADING = "loading"  # lifecycle: the engine is (re)loading the model
    AWAKE = "awake"  # lifecycle: loaded, serving
    SLEEPING = "sleeping"  # lifecycle: going to sleep (vLLM /sleep in progress)
    ASLEEP = "asleep"  # lifecycle: GPU memory freed, process kept (vLLM sleep mode)
    WAKING = "waking"  # lifecycle: vLLM /wake_up in progress
    UNLOADING = "unloading"  # lifecycle: the engine's vLLM process is stopping
    UNLOADED = "unloaded"  # lifecycle: engine stopped, replica kept; the next request loads it
    UNSCHEDULABLE = "unschedulable"  # Ray cannot place a replica: resources missing
    UNAVAILABLE = "unavailable"  # its node is not in the cluster (lost, or not joined yet); back with it
    FAILED = "failed"  # its engine could not start
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    ABSENT = "absent"  # not on Serve


# Serve's application status -> the model's state.
SERVE_APP_STATE = {
    "RUNNING": ModelState.READY,
    "DEPLOYING": ModelState.STARTING,
    "NOT_STARTED": ModelState.STARTING,
    "UNHEALTHY": ModelState.UNHEALTHY,
    "DEPLOY_FAILED": ModelState.FAILED,
    "DELETING": ModelState.STOPPING,
}
