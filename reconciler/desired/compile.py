"""Placed fleet → the desired Ray Serve config (a plain dict, the body of Serve's PUT). Pure: no I/O.

One application per model (so one model restarts alone) plus the OpenAI router, which serves the
OpenAI port itself (Serve's HTTP proxy is off). Fields are laid out so that what needs no engine
restart travels as in-place options: the lifecycle settings (idle timeout, unload_after,
always-on) in `user_config`, replica counts in `num_replicas`, the router's model list in its
`user_config`. What changes the engine (source, engine args, GPUs) lives in the app's `args`.
See docs/contracts.md for the shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from reconciler.desired.placement import PlacedFleet, PlacedModel
from reconciler.fleetfiles.adapters import VLLM_MAX_LORA_RANK
from reconciler.fleetfiles.spec import ApiKey
from serve_app.contract import (
    ENGINE_DEPLOYMENT,
    ENGINE_IMPORT,
    ENGINE_NUM_CPUS,
    HEAD_NODE_RESOURCE,
    LORA_FLAG,
    NODE_PIN,
    ROUTER_APP,
    ROUTER_DEPLOYMENT,
    ROUTER_IMPORT,
    RUNNER_FLAG,
    SLEEP_FLAG,
    SWAP_APP,
    SWAP_DEPLOYMENT,
    SWAP_IMPORT,
    TASK_RUNNER,
    EngineArgs,
    EngineUserConfig,
    KeyScope,
    RouterArgs,
    RouterModel,
    RouterUserConfig,
    SwapGroupConfig,
    SwapUserConfig,
    gpu_resource,
    node_resource,
)

SLEEP_ENV = "VLLM_SERVER_DEV_MODE"  # vLLM serves /sleep and /wake_up only in its dev mode
# vLLM serves /v1/load_lora_adapter and /v1/unload_lora_adapter only with this set (serve_app.adapters calls them)
LORA_RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def engine_argv(engine: Mapping[str, Any]) -> list[str]:
    """vLLM engine args as argv elements, keys sorted so reordering the YAML restarts nothing.

    true → --flag, false → --no-flag, a list → --flag a b, a mapping → --flag '<json>'. Values are
    separate argv elements, never joined into a shell string.
    """
    argv: list[str] = []
    for key in sorted(engine):
        flag = "--" + key.replace("_", "-")
        value = engine[key]
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *(_scalar(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value, sort_keys=True)]
        else:
            argv += [flag, _scalar(value)]
    return argv


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def model_argv(model: PlacedModel) -> list[str]:
    """The fleet-decided flags first (runner, parallelism, GPU share), then the user's.

    The source (and an hf:// revision) is turned into --model/--revision by the engine replica,
    which alone can resolve pkg:// paths and convert GGUF files on its node.
    """
    argv = [RUNNER_FLAG, TASK_RUNNER[model.task]]
    if model.tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(model.tensor_parallel)]
    if model.gpu_memory is not None:
        argv += ["--gpu-memory-utilization", f"{model.gpu_memory:g}"]
    if model.sleep:
        argv.append(SLEEP_FLAG)
    if model.tool_parser and "tool_call_parser" not in model.engine:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", model.tool_parser]
    return argv + lora_argv(model) + engine_argv(model.engine)


def lora_argv(model: PlacedModel) -> list[str]:
    """LoRA on, for a model with adapters: vLLM takes these only at start, so the first adapter restarts
    the engine and the next ones load at run time (serve_app.adapters). The rank bound is the model's
    engine max_lora_rank when set (engine_argv carries it), else vLLM's default written out: the bound
    validation checks each adapter against, and not the adapters' largest rank, so that a later adapter of
    a larger rank within it still loads in place."""
    if not model.adapters:
        return []
    argv = [] if "enable_lora" in model.engine else [LORA_FLAG]
    if "max_lora_rank" not in model.engine:
        argv += ["--max-lora-rank", str(VLLM_MAX_LORA_RANK)]
    return argv


def model_env(model: PlacedModel) -> dict[str, str]:
    """The user's env; sleep mode's /sleep and /wake_up exist only in vLLM's dev mode.

    They are reachable on the engine's loopback port only: the router relays a fixed list of
    OpenAI paths, never these.
    """
    env = dict(model.env)
    if model.sleep:
        env[SLEEP_ENV] = "1"
    if model.adapters:
        env[LORA_RUNTIME_ENV] = "True"
    return dict(sorted(env.items()))


def actor_options(model: PlacedModel, multi_node: bool = False) -> dict[str, Any]:
    """Ray schedules the replica on its GPUs' custom resources, so shares can never exceed a card,
    and on its node when it has one. In a fleet whose inventory spans nodes, a GPU model without
    a node is on the head's cards: pinned there, since every node has a ``fleet_gpu_0``."""
    opts: dict[str, Any] = {"num_cpus": ENGINE_NUM_CPUS, "num_gpus": 0}
    resources: dict[str, float] = {}
    if model.gpus:
        # a swap-group member reserves its part of what the group needs at once (reconciler.fleetfiles.swap_groups)
        shares = model.reserved or tuple(model.gpu_memory or 0.0 for _ in model.gpus)
        # Replicas that split the GPUs (one set each) ask alike, as one deployment's replicas must:
        # each a 1/replicas part of every GPU, so together they ask the model's share of each.
        split = model.replicas if split_gpus(model) else 1
        resources = {gpu_resource(i): share / split for i, share in zip(model.gpus, shares, strict=True)}
    if model.node is not None:
        resources[node_resource(model.node)] = NODE_PIN
    elif model.gpus and multi_node:
        resources[HEAD_NODE_RESOURCE] = NODE_PIN
    if resources:
        opts["resources"] = resources
    return opts


def split_gpus(model: PlacedModel) -> bool:
    """Its replicas each run on their own tensor_parallel of its GPUs (not all of them on all)."""
    return 0 < model.tensor_parallel < len(model.gpus)


def model_app(model: PlacedModel, multi_node: bool = False) -> dict[str, Any]:
    args = EngineArgs(
        model=model.name, source=model.source, task=model.task, engine_argv=model_argv(model),
        env=model_env(model), gpus=list(model.gpus), start_timeout_s=_finite(model.start_timeout_s),
        # only when set, so no other engine's args (and so no other engine) change
        swap_group=model.swap_group or None, replica_gpus=model.tensor_parallel if split_gpus(model) else None,
    )
    user_config = EngineUserConfig(idle_timeout_s=model.idle_timeout_s, unload_after_s=model.unload_after_s,
                                   always_on=model.always_on,
                                   # absent without adapters: other engines' user_config stays as it was
                                   adapters=dict(model.adapters) or None)
    return {
        "name": model.name,
        "route_prefix": None,
        "import_path": ENGINE_IMPORT,
        "args": args.wire(),
        "deployments": [{
            "name": ENGINE_DEPLOYMENT,
            "num_replicas": model.replicas,
            "max_ongoing_requests": 1000,
            "health_check_period_s": 10.0,
            "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 20.0,
            "ray_actor_options": actor_options(model, multi_node),
            "user_config": user_config.wire(),
        }],
    }


def _router_model(model: PlacedModel, parent: str | None = None) -> RouterModel:
    # tool_parser only when set, so fleets without one keep the router config they had
    return RouterModel(task=model.task, always_on=model.always_on, tool_parser=model.tool_parser or None,
                       swap_group=model.swap_group or None, node=model.node or None, parent=parent)


def _router_models(fleet: PlacedFleet) -> dict[str, RouterModel]:
    """Every model name on the endpoint: each model, then its adapters (served by its engine, under their names)."""
    out: dict[str, RouterModel] = {}
    for m in fleet.models:
        out[m.name] = _router_model(m)
        out.update({adapter: _router_model(m, parent=m.name) for adapter in m.adapters})
    return out


def _key_scopes(keys: list[ApiKey]) -> dict[str, KeyScope]:
    return {key.env: KeyScope(models=list(key.models) if key.models is not None else None, rpm=key.rpm)
            for key in keys if key.scoped}


def router_app(fleet: PlacedFleet) -> dict[str, Any]:
    """The fleet ingress: each replica serves the OpenAI port itself (SO_REUSEPORT), so host and
    port are constructor args (a change restarts it on the new port)."""
    keys = fleet.openai.api_key_entries()
    user_config = RouterUserConfig(models=_router_models(fleet),
                                   api_key_envs=[key.env for key in keys],
                                   # absent without scoped keys: such fleets' router config stays as it was
                                   key_scopes=_key_scopes(keys) or None,
                                   load_timeout_s=_finite(fleet.openai.load_timeout))
    args = RouterArgs(host=fleet.openai.host, port=fleet.openai.port)
    return {
        "name": ROUTER_APP,
        "route_prefix": None,  # Serve's HTTP proxy is off: the router's own servers take the port
        "import_path": ROUTER_IMPORT,
        "args": args.wire(),
        "deployments": [{
            "name": ROUTER_DEPLOYMENT,
            "num_replicas": fleet.openai.workers,
            "max_ongoing_requests": 1000,
            # The OpenAI port is the head's: its replicas stay there when other nodes join.
            "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: NODE_PIN}},
            "user_config": user_config.wire(),
        }],
    }


def swap_app(fleet: PlacedFleet) -> dict[str, Any] | None:
    """The swap groups' coordinator (serve_app/swap.py), when the fleet has a served group: one
    replica, groups as user_config (changed in place)."""
    if not fleet.swap_groups:
        return None
    groups = {
        name: SwapGroupConfig(awake=group.awake, members=[m.name for m in fleet.models if m.swap_group == name],
                              queue_timeout_s=_finite(group.queue_timeout), max_wait_s=_finite(group.max_wait),
                              default=group.default)
        for name, group in sorted(fleet.swap_groups.items())
    }
    user_config = SwapUserConfig(groups=groups)
    return {
        "name": SWAP_APP,
        "route_prefix": None,
        "import_path": SWAP_IMPORT,
        "args": {},
        "deployments": [{
            "name": SWAP_DEPLOYMENT,
            "num_replicas": 1,  # one coordinator: it alone decides who is awake in a group
            "max_ongoing_requests": 1000,  # every waiting request is one call
            # on the head with the routers: a node that leaves must not take the coordinator along
            "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: NODE_PIN}},
            "user_config": user_config.wire(),
        }],
    }


def _finite(seconds: float) -> float | None:
    """JSON has no infinity; None means "no bound" ("never")."""
    return None if math.isinf(seconds) else seconds


def multi_node(fleet: PlacedFleet) -> bool:
    """Does the fleet name nodes (in its inventory or on a model)? Then head GPUs get pinned too."""
    return any(g.node for g in fleet.inventory.gpus) or any(m.node for m in fleet.models)


def compile_serve_config(fleet: PlacedFleet) -> dict[str, Any]:
    """The whole desired Serve config: always-on models first, so apply can bring them up first."""
    models = sorted(fleet.models, key=lambda m: not m.always_on)
    return {
        # No Serve HTTP proxy: the router's replicas serve the OpenAI port (serve_app/router.py).
        "proxy_location": "Disabled",
        "applications": [router_app(fleet), *filter(None, [swap_app(fleet)]),
                         *(model_app(m, multi_node(fleet)) for m in models)],
    }
