"""The contract between the reconciler (which writes the Serve config) and serve_app (which runs it).

Both sides import these names instead of spelling them: application and deployment names, import
paths, the shape of the engine's constructor ``args`` and of each deployment's ``user_config``, and
where an engine replica writes vLLM's log. docs/contracts.md shows a whole config.

It is a two-sided codec: each shape is a pydantic model with ``parse`` (what serve_app reads, checked)
and ``wire`` (what the reconciler writes, in a fixed key order, so the compiled config is stable byte for
byte). "Never" (no bound) is ``None`` on the wire and in every model here; ``deadline`` turns it into a time.

Light on purpose (pydantic and the standard library; no Ray, no FastAPI): the reconciler imports it on every command.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

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
ENGINE_START_ATTEMPTS_ENV = "FLEET_ENGINE_START_ATTEMPTS"


def engine_start_attempts() -> int:
    """How many times Serve starts an engine before it gives up: 3, or FLEET_ENGINE_START_ATTEMPTS in the
    environment of the Ray node that builds the app (e.g. 1 where a start is minutes of a large model's
    load, or in a test of a model that cannot start)."""
    raw = os.environ.get(ENGINE_START_ATTEMPTS_ENV, "3")
    try:
        return max(1, int(raw))
    except ValueError:
        return 3


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
# for Ray to place it: '... has 1 replicas that have taken more than 5s to be scheduled. ...
# Resources required for each replica: {"CPU": 1.0}, total resources available: {}. ...'; for a
# placement group the required part is a list of bundles. A replica pinned to a node that is gone
# asks for a node:<ip> that nothing offers.
_PENDING = re.compile(r"Resources required for each replica: (?P<required>\{.*?\}|\[.*?\]), "
                      r"total resources available: (?P<available>\{.*?\})\.")


def pending_resources(message: str) -> tuple[dict[str, float], dict[str, float]] | None:
    """(required, available) from a waiting replica's message (bundles summed), or None."""
    m = _PENDING.search(message or "")
    if not m:
        return None
    try:
        required, available = json.loads(m["required"]), json.loads(m["available"])
    except ValueError:
        return None
    if isinstance(required, list):  # placement-group bundles: their sum
        total: dict[str, float] = {}
        for bundle in required:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + float(v)
        required = total
    return {k: float(v) for k, v in required.items()}, {k: float(v) for k, v in available.items()}


def node_gone_message(ip: str) -> str:
    """The one wording of an unavailable model, for `fleetctl status`, /v1/models and the 503."""
    return (f"its node {ip} is not in the Ray cluster (lost, or not joined yet); Serve starts it again "
            "when the node is back")


def missing_node(message: str) -> str | None:
    """The IP of the node a waiting replica is pinned to when the cluster lacks that node, else None."""
    pending = pending_resources(message)
    if pending is None:
        return None
    required, available = pending
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


def deadline(start: float, seconds: float | None) -> float:
    """When a bound of ``seconds`` from ``start`` runs out; None ("never") never does."""
    return math.inf if seconds is None else start + seconds


# vLLM's --runner for each fleet task (vLLM 0.32 has no --task), and its sleep-mode flag: compile writes
# them into ``engine_argv`` and ``EngineArgs.runner`` / ``.sleep_mode`` read them back, here only.
TASK_RUNNER = {"generate": "generate", "embed": "pooling"}
RUNNER_FLAG = "--runner"
SLEEP_FLAG = "--enable-sleep-mode"
LORA_FLAG = "--enable-lora"  # compile adds it for a model with adapters; the plan explains the restart it brings


class _Wire(BaseModel):
    """One shape of the contract: ``parse`` a mapping (checked, unknown keys refused), ``wire`` it back."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Optional keys left out of the wire form when None, so configs without them stay as they were.
    omit_none: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def parse(cls, data: Any) -> Any:
        return cls.model_validate(dict(data or {}))

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None and name in self.omit_none:
                continue
            out[name] = value.wire() if isinstance(value, _Wire) else _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, _Wire):
        return value.wire()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class EngineArgs(_Wire):
    """An engine application's ``args`` (its constructor arguments: any change restarts it)."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"swap_group", "replica_gpus"})

    model: str  # --served-model-name, and the OpenAI model id
    source: str  # hf://org/name@rev | /abs/path | pkg://package/path (serve_app.source parses it)
    task: str = "generate"  # generate | embed
    engine_argv: list[str] = []  # vLLM flags, argv elements (never a shell string)
    env: dict[str, str] = {}
    gpus: list[int] = []  # physical GPU indices on its node; [] = CPU
    start_timeout_s: float | None = 600.0  # None = never (no bound)
    # Only for a swap group's member (absent otherwise, so other engines' args never change):
    # it starts unloaded and loads only when the group's coordinator (SWAP_APP) has made room.
    swap_group: str | None = None
    # Only when its replicas split ``gpus``: each replica claims its own this many of them on start
    # (serve_app.gpu_turns.claim_gpus), in order; absent = every replica on all of ``gpus``.
    replica_gpus: int | None = None

    @property
    def runner(self) -> str:
        """vLLM's runner: the last --runner in engine_argv (as vLLM's parser takes it), else the task's."""
        argv = self.engine_argv
        named = [argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag == RUNNER_FLAG]
        return named[-1] if named else TASK_RUNNER.get(self.task, "generate")

    @property
    def sleep_mode(self) -> bool:
        """vLLM's sleep mode is on (GPU only, and only when asked for at start: compile adds it for GPU models)."""
        return bool(self.gpus) and SLEEP_FLAG in self.engine_argv


class EngineUserConfig(_Wire):
    """An engine deployment's ``user_config``: changed in place, no restart."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"adapters"})

    idle_timeout_s: float | None = None  # None = never idle out
    unload_after_s: float | None = None  # asleep (GPU) → unloaded after this much more idle time; None = stays asleep
    always_on: bool = False
    # LoRA adapters by the model name each is served as: {name: source} (a path made absolute, pkg://, hf://);
    # the engine loads them into its running vLLM (serve_app.adapters). Absent when the model has none.
    adapters: dict[str, str] | None = None


DEFAULT_MAX_WAIT_S = 5.0  # the spec's default swap_groups.<name>.max_wait (reasons in reconciler.fleetfiles.spec)


class SwapGroupConfig(_Wire):
    """One swap group as the coordinator sees it."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"default"})

    awake: int = 1  # at most this many members loaded (not asleep/unloaded) at once
    members: list[str] = []  # model names (each its own engine application)
    queue_timeout_s: float | None = None  # bound on waiting for busy members; None = never (no bound)
    # the swap scheduler (serve_app.scheduler): how long a request waits for a busy member of its group
    # before the group swaps; None = never (only when the member is idle); 0 = at once (first come first served)
    max_wait_s: float | None = DEFAULT_MAX_WAIT_S
    default: str | None = None  # the member woken (or loaded) when the group has idled down


class SwapUserConfig(_Wire):
    """The swap coordinator's ``user_config``: every group, changed in place."""

    groups: dict[str, SwapGroupConfig] = {}


class RouterArgs(_Wire):
    """The router application's ``args``: where its replicas serve HTTP (a change restarts them)."""

    host: str = "127.0.0.1"  # openai.host
    port: int = 8000  # openai.port; every replica on a node binds it with SO_REUSEPORT


class RouterModel(_Wire):
    """One model name on the endpoint: a model (its own engine application), or a LoRA adapter."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"tool_parser", "swap_group", "node", "parent"})

    task: str = "generate"
    always_on: bool = False
    tool_parser: str | None = None  # present only when the engine takes tools (vLLM --tool-call-parser)
    swap_group: str | None = None  # present only for members of a swap group
    node: str | None = None  # present only when pinned: the node's IP; its model is unavailable while the node is gone
    # present only for a LoRA adapter: the model it sits on, whose engine serves it (under the adapter's name);
    # the other fields are its parent's
    parent: str | None = None

    def engine(self, name: str) -> str:
        """The engine application that serves the model name ``name`` (this entry's)."""
        return self.parent or name


class KeyScope(_Wire):
    """What one API key may do (serve_app.keys); a key without an entry may use every model, unlimited."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"models", "rpm"})

    models: list[str] | None = None  # fnmatch patterns on model names; absent = every model
    rpm: int | None = None  # requests per minute per router replica; absent = no limit


class RouterUserConfig(_Wire):
    """The router deployment's ``user_config``: the model list and keys, changed in place."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"key_scopes"})

    models: dict[str, RouterModel] = {}
    api_key_envs: list[str] = []  # environment-variable NAMES, never keys
    key_scopes: dict[str, KeyScope] | None = None  # by env NAME; present only when a key is scoped
    load_timeout_s: float | None = 600.0  # None = never (no bound)


class EngineState(_Wire):
    """What an engine's ``state()`` answers (status, /v1/models, `fleetctl load/unload`, the swap coordinator)."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"adapters"})

    state: str  # a ModelState value of the lifecycle group
    since: float
    reason: str = ""
    in_flight: int = 0
    last_request_at: float | None = None
    idle_timeout_s: float | None = None
    unload_after_s: float | None = None
    always_on: bool = False
    can_sleep: bool = False
    gpus: list[int] = []  # this replica's own (a set of the model's when its replicas split them)
    swap_group: str | None = None
    load_seconds: float | None = None  # its last load's duration; the router holds requests longer when larger
    counts: dict[str, int] = {}
    last_seconds: dict[str, float] = {}
    total_seconds: dict[str, float] = {}
    adapters: dict[str, str] | None = None  # only for a model with adapters: each one's "loaded", or why it is not


class LifecycleEvent(_Wire):
    """One lifecycle transition of an engine replica: when it ended, what it was, how long it took."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"detail"})

    at: float  # wall-clock time
    event: str  # load, load_failed, sleep, wake, unload, swap, swap_wait, swapped_out
    seconds: float
    detail: str | None = None


class LifecycleRecord(_Wire):
    """What an engine replica publishes on each change (serve_app.endpoints.publish_lifecycle): the
    endpoint's /metrics sums its histograms over replicas; /fleet/lifecycle and the status page show
    its state and events."""

    model: str
    replica: str
    at: float  # when it was published
    state: str  # a ModelState value of the lifecycle group
    since: float
    bounds: list[float] = []  # the histograms' upper bounds (seconds); +Inf is implied
    hist: dict[str, tuple[list[int], float]] = {}  # transition -> (counts per bucket, not cumulative; sum)
    events: list[LifecycleEvent] = []  # its last lifecycle.EVENTS_KEPT, oldest first


class ModelEntry(_Wire):
    """One model of the router's ``/v1/models``: OpenAI's fields, then the fleet's extras."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"parent", "swap_group", "reason", "info"})

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "vllm-fleet"
    parent: str | None = None  # a LoRA adapter's base model (as vLLM's own /v1/models says it)
    task: str = "generate"
    always_on: bool = False
    swap_group: str | None = None
    state: str = "absent"  # a ModelState value
    since: float | None = None
    reason: str | None = None
    info: dict[str, Any] | None = None  # OpenWebUI's hints (hidden, capabilities)


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
