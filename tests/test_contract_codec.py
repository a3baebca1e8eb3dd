"""The reconciler↔serve_app contract is one codec: what compile writes, the engine, router and swap side parse.

Round trips (wire → parse → wire is the identity) for each shape, and the configs compiled from the
shipped fleet files parse on the serve_app side with the values the fleet files say.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from reconciler.desired.pipeline import desired_state
from reconciler.fleetfiles.inventory import GpuInfo, Inventory
from serve_app.contract import (
    ENGINE_IMPORT,
    ROUTER_IMPORT,
    SWAP_IMPORT,
    EngineArgs,
    EngineState,
    EngineUserConfig,
    ModelEntry,
    RouterArgs,
    RouterUserConfig,
    SwapUserConfig,
    deadline,
    missing_node,
    pending_resources,
)
from serve_app.lifecycle import Rules
from serve_app.relay import settings_from

ROOT = Path(__file__).resolve().parent.parent

SAMPLES = [
    (EngineArgs, {"model": "m", "source": "hf://org/m@main", "task": "embed",
                  "engine_argv": ["--runner", "pooling", "--enable-sleep-mode"], "env": {"A": "1"},
                  "gpus": [0, 1], "start_timeout_s": None, "swap_group": "g", "replica_gpus": 1}),
    (EngineArgs, {"model": "m", "source": "/models/m", "task": "generate", "engine_argv": [], "env": {},
                  "gpus": [], "start_timeout_s": 600.0}),
    (EngineUserConfig, {"idle_timeout_s": None, "unload_after_s": 3600.0, "always_on": True}),
    (RouterArgs, {"host": "0.0.0.0", "port": 8000}),
    (RouterUserConfig, {"models": {"a": {"task": "generate", "always_on": False, "tool_parser": "hermes",
                                         "swap_group": "g", "node": "10.0.0.2"},
                                   "b": {"task": "embed", "always_on": True}},
                        "api_key_envs": ["KEY"], "load_timeout_s": None}),
    (SwapUserConfig, {"groups": {"g": {"awake": 1, "members": ["a", "b"], "queue_timeout_s": 30.0,
                                       "max_wait_s": None, "default": "a"},
                                 "h": {"awake": 1, "members": ["c", "d"], "queue_timeout_s": 30.0,
                                       "max_wait_s": 5.0}}}),
    (EngineState, {"state": "awake", "since": 1.0, "reason": "", "in_flight": 2, "last_request_at": 3.0,
                   "idle_timeout_s": None, "unload_after_s": None, "always_on": False, "can_sleep": True,
                   "gpus": [0], "swap_group": None, "load_seconds": 12.5, "counts": {"load": 1},
                   "last_seconds": {"load": 12.5}, "total_seconds": {"load": 12.5}}),
    (ModelEntry, {"id": "a", "object": "model", "created": 0, "owned_by": "vllm-fleet", "task": "embed",
                  "always_on": True, "state": "asleep", "since": 5.0, "info": {"meta": {"hidden": True}}}),
]


@pytest.mark.parametrize(("shape", "wire"), SAMPLES, ids=lambda v: getattr(v, "__name__", ""))
def test_round_trip(shape: type, wire: dict) -> None:
    parsed = shape.parse(wire)
    assert parsed.wire() == wire
    assert json.dumps(parsed.wire()) == json.dumps(wire)  # key order too: compiled configs stay byte-stable
    assert shape.parse(parsed.wire()) == parsed


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError, match="start_timeout"):
        EngineArgs.parse({"model": "m", "source": "/m", "start_timeout": 5})


def test_runner_and_sleep_mode_are_read_once_from_the_args() -> None:
    args = EngineArgs.parse({"model": "m", "source": "/m", "task": "embed", "gpus": [0],
                             "engine_argv": ["--runner", "pooling", "--enable-sleep-mode", "--runner", "generate"]})
    assert args.runner == "generate"  # vLLM's parser takes the last one
    assert args.sleep_mode
    assert EngineArgs.parse({"model": "m", "source": "/m", "task": "embed"}).runner == "pooling"
    cpu = EngineArgs.parse({"model": "m", "source": "/m", "engine_argv": ["--enable-sleep-mode"]})
    assert not cpu.sleep_mode  # sleep mode is GPU only


def test_never_is_none_and_never_comes() -> None:
    assert deadline(10.0, None) == float("inf")
    assert deadline(10.0, 5.0) == 15.0
    assert EngineArgs.parse({"model": "m", "source": "/m", "start_timeout_s": None}).start_timeout_s is None


def test_pending_message_parsed_once_for_both_sides() -> None:
    message = ("Deployment 'engine' has 1 replicas that have taken more than 5s to be scheduled. "
               'Resources required for each replica: [{"CPU": 1.0}, {"node:10.0.0.9": 0.001}], '
               'total resources available: {"CPU": 4.0}. Use `ray status` for more details.')
    assert pending_resources(message) == ({"CPU": 1.0, "node:10.0.0.9": 0.001}, {"CPU": 4.0})
    assert missing_node(message) == "10.0.0.9"
    assert pending_resources("all is well") is None


def _fleets() -> list[tuple[str, Inventory | None]]:
    three = Inventory(tuple(GpuInfo(i, 24 * 2**30) for i in range(3)), "nvml")  # type: ignore[arg-type]
    examples = sorted(glob.glob(str(ROOT / "examples/*/fleet.yaml")))
    return [(str(ROOT / "fleet.yaml"), None)] + [(p, three) for p in examples]


@pytest.mark.parametrize(("path", "inventory"), _fleets(),
                         ids=lambda v: Path(v).parent.name if isinstance(v, str) else "")
def test_compiled_configs_parse_on_the_serve_side(path: str, inventory: Inventory | None) -> None:
    desired = desired_state(path, inventory)
    apps = {app["import_path"]: [] for app in desired.config["applications"]}
    for app in desired.config["applications"]:
        apps[app["import_path"]].append(app)
        user_config = app["deployments"][0]["user_config"]
        if app["import_path"] == ENGINE_IMPORT:
            args = EngineArgs.parse(app["args"])
            assert args.wire() == app["args"]
            model = next(m for m in desired.placed.models if m.name == args.model)
            assert args.sleep_mode == bool(model.sleep and model.gpus)
            rules = Rules.from_user_config(EngineUserConfig.parse(user_config))
            assert (rules.idle_timeout_s, rules.always_on) == (model.idle_timeout_s, model.always_on)
        elif app["import_path"] == ROUTER_IMPORT:
            assert RouterArgs.parse(app["args"]).wire() == app["args"]
            settings = settings_from(user_config)
            assert set(settings.models) == {m.name for m in desired.placed.models}
            assert RouterUserConfig.parse(user_config).wire() == user_config
        elif app["import_path"] == SWAP_IMPORT:
            assert SwapUserConfig.parse(user_config).wire() == user_config
    assert ROUTER_IMPORT in apps
