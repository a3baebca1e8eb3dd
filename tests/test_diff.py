"""Diff classification: per changed field, what Ray Serve 2.60 does (table-driven, no Ray)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from reconciler.change import diff
from reconciler.change.diff import Action, Effect


def engine_app(name: str = "a", **over: Any) -> dict[str, Any]:
    """A model app shaped like compile_serve_config's output (docs/contracts.md)."""
    app = {
        "name": name,
        "route_prefix": None,
        "import_path": "serve_app.engine:app",
        "args": {"model": name, "source": "/models/tiny", "task": "generate",
                 "engine_argv": ["--max-model-len", "2048"], "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                 "gpus": [], "start_timeout_s": 600.0},
        "deployments": [{
            "name": "engine", "num_replicas": 1, "max_ongoing_requests": 1000,
            "health_check_period_s": 10.0, "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 20.0,
            "ray_actor_options": {"num_cpus": 1, "num_gpus": 0, "resources": {"fleet_gpu_0": 0.45}},
            "user_config": {"idle_timeout_s": 900.0, "always_on": False},
        }],
    }
    app.update(over)
    return app


def with_change(path: str, value: Any) -> dict[str, Any]:
    """engine_app() with the value at a dotted path replaced (deployments.engine.* addresses
    the one deployment)."""
    app = copy.deepcopy(engine_app())
    parts = path.split(".")
    node: Any = app
    if parts[0] == "deployments":
        node = app["deployments"][0]
        parts = parts[2:]
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return app


CASES = [
    # path, new value, expected app action, expected effect
    ("args.engine_argv", ["--max-model-len", "4096"], Action.RESTART, Effect.REBUILD_APP),
    ("args.env.VLLM_CPU_KVCACHE_SPACE", "2", Action.RESTART, Effect.REBUILD_APP),
    ("args.gpus", [1], Action.RESTART, Effect.REBUILD_APP),
    ("args.source", "/models/other", Action.RESTART, Effect.REBUILD_APP),
    ("import_path", "serve_app.engine:other", Action.RESTART, Effect.REBUILD_APP),
    ("runtime_env.env_vars.X", "1", Action.RESTART, Effect.REBUILD_APP),
    ("deployments.engine.ray_actor_options.num_cpus", 2, Action.RESTART, Effect.RESTART_DEPLOYMENT),
    ("deployments.engine.ray_actor_options.resources.fleet_gpu_0", 0.5, Action.RESTART,
     Effect.RESTART_DEPLOYMENT),
    ("deployments.engine.placement_group_bundles", [{"CPU": 1}], Action.RESTART, Effect.RESTART_DEPLOYMENT),
    ("deployments.engine.max_replicas_per_node", 1, Action.RESTART, Effect.RESTART_DEPLOYMENT),
    ("deployments.engine.request_router_config.request_routing_stats_period_s", 5,
     Action.RESTART, Effect.REBUILD_APP),
    ("deployments.engine.autoscaling_config.policy.policy_function", "m:f", Action.RESTART,
     Effect.REBUILD_APP),
    ("deployments.engine.user_config.idle_timeout_s", 1800.0, Action.UPDATE, Effect.RECONFIGURE),
    ("deployments.engine.user_config.always_on", True, Action.UPDATE, Effect.RECONFIGURE),
    ("deployments.engine.num_replicas", 2, Action.UPDATE, Effect.SCALE),
    ("deployments.engine.max_queued_requests", 10, Action.UPDATE, Effect.SCALE),
    ("deployments.engine.max_ongoing_requests", 10, Action.UPDATE, Effect.RECONFIGURE),
    ("deployments.engine.health_check_period_s", 5.0, Action.UPDATE, Effect.RECONFIGURE),
    ("deployments.engine.graceful_shutdown_timeout_s", 5.0, Action.UPDATE, Effect.RECONFIGURE),
    ("deployments.engine.autoscaling_config.max_replicas", 3, Action.UPDATE, Effect.RECONFIGURE),
    ("route_prefix", "/a", Action.UPDATE, Effect.RECONFIGURE),
]


@pytest.mark.parametrize(("path", "value", "action", "effect"), CASES, ids=[c[0] for c in CASES])
def test_one_field_change_is_classified_as_serve_does(path: str, value: Any, action: Action,
                                                      effect: Effect) -> None:
    d = diff.diff_app(with_change(path, value), engine_app())
    assert d.action is action
    assert [(f.path, f.effect) for f in d.fields] == [(path, effect)]
    assert d.restart_fields == ((path,) if effect.restarts else ())


def test_restart_lists_every_changed_field_but_only_restarting_ones_as_forcing() -> None:
    desired = with_change("args.engine_argv", ["--x"])
    desired["deployments"][0]["user_config"]["idle_timeout_s"] = 60.0
    d = diff.diff_app(desired, engine_app())
    assert d.action is Action.RESTART
    assert {f.path for f in d.fields} == {"args.engine_argv", "deployments.engine.user_config.idle_timeout_s"}
    assert d.restart_fields == ("args.engine_argv",)


NO_PHANTOM = [
    ("int vs float", {"deployments.engine.ray_actor_options.num_cpus": 1.0}),
    ("route_prefix default", {"route_prefix": "/"}),
    ("args/runtime_env null", {"runtime_env": None}),
]


@pytest.mark.parametrize(("label", "edits"), NO_PHANTOM, ids=[n for n, _ in NO_PHANTOM])
def test_equivalent_forms_are_no_change(label: str, edits: dict[str, Any]) -> None:
    app = engine_app(route_prefix="/") if label == "route_prefix default" else engine_app()
    live = copy.deepcopy(app)
    for path, value in edits.items():
        if path == "route_prefix":
            live.pop("route_prefix")
        elif path == "runtime_env":
            live["runtime_env"] = value
        else:
            live = _set(live, path, value)
    assert diff.diff_app(app, live).action is Action.NOOP


def _set(app: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    parts = path.split(".")
    node: Any = app["deployments"][0]
    for p in parts[2:-1]:
        node = node[p]
    node[parts[-1]] = value
    return app


def test_bool_is_not_a_number() -> None:
    d = diff.diff_app(with_change("deployments.engine.user_config.always_on", 1), engine_app())
    assert d.action is Action.UPDATE


def test_ignored_fields_and_empty_actor_options() -> None:
    live = engine_app(host="0.0.0.0", port=8000)
    assert diff.diff_app(engine_app(), live).action is Action.NOOP
    a, b = engine_app(), engine_app()
    a["deployments"][0]["ray_actor_options"] = {}
    del b["deployments"][0]["ray_actor_options"]
    assert diff.diff_app(a, b).action is Action.NOOP


def test_added_deployment_counts_as_a_code_change() -> None:
    desired = engine_app()
    desired["deployments"].append({"name": "extra"})
    d = diff.diff_app(desired, engine_app())
    assert d.action is Action.RESTART and d.restart_fields == ("deployments.extra",)


def test_pairing() -> None:
    desired = [engine_app("a"), engine_app("b")]
    foreign = {"name": "x", "import_path": "myapp:app", "deployments": []}
    live = {"b": engine_app("b"), "c": engine_app("c"), "x": foreign, "y": None}
    verdicts = {d.name: (d.action, d.foreign) for d in diff.diff_pairs(diff.pair(desired, live))}
    assert verdicts == {
        "a": (Action.CREATE, False),
        "b": (Action.NOOP, False),
        "c": (Action.DELETE, False),
        "x": (Action.DELETE, True),
        "y": (Action.DELETE, True),  # a serve.run app: no config, not ours
    }


def test_desired_name_held_by_a_serve_run_app_is_taken_over() -> None:
    [d] = diff.diff_pairs(diff.pair([engine_app("a")], {"a": None}))
    assert d.action is Action.RESTART


def test_global_changes_are_reported() -> None:
    desired = {"proxy_location": "Disabled"}  # what reconciler.desired.compile always says
    assert diff.global_changes(desired, {"proxy_location": "EveryNode"}) == ["proxy_location"]
    assert diff.global_changes(desired, {"proxy_location": "Disabled"}) == []
    assert diff.global_changes(desired, {}) == []  # no Serve yet
