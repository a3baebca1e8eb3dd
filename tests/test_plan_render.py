"""Plans from config dicts, and how they render (text and JSON); plus the apply lock and the
always-on-first PUT sequence. No Ray."""

from __future__ import annotations

import copy
import json
import multiprocessing
import time
from dataclasses import replace
from typing import Any

import pytest

from reconciler.change import apply as apply_mod
from reconciler.change import lock, render, rollout
from reconciler.change.plan import Action, Download, make_plan, plan_from_dict, plan_to_dict
from reconciler.live.serve_state import AppLive, DeploymentLive, LiveState, Replica, parse_live_state
from tests.test_diff import engine_app


def router_app(models: dict[str, Any]) -> dict[str, Any]:
    return {"name": "router", "route_prefix": "/", "import_path": "serve_app.router:app", "args": {},
            "deployments": [{"name": "router", "num_replicas": 1, "max_ongoing_requests": 1000,
                             "ray_actor_options": {"num_cpus": 0},
                             "user_config": {"models": models, "api_key_envs": [], "load_timeout_s": 600.0}}]}


def config(*apps: dict[str, Any]) -> dict[str, Any]:
    """A config as reconciler.desired.compile makes it: Serve's proxy off, no http_options."""
    return {"proxy_location": "Disabled", "applications": list(apps)}


def live_of(cfg: dict[str, Any], *extra: dict[str, Any]) -> LiveState:
    """A live state in which every app of cfg (and extra) runs as configured."""
    apps = {}
    for i, a in enumerate(cfg["applications"] + list(extra)):
        deps = tuple(DeploymentLive(d["name"], "HEALTHY", replicas=(Replica(f"r{i}", "RUNNING", 100 + i),),
                                    target_num_replicas=1) for d in a["deployments"])
        apps[a["name"]] = AppLive(a["name"], "RUNNING", config=copy.deepcopy(a), deployments=deps)
    return LiveState(apps=apps, globals={"proxy_location": cfg["proxy_location"]}, serve_running=True)


def always_on(app: dict[str, Any]) -> dict[str, Any]:
    app["deployments"][0]["user_config"]["always_on"] = True
    return app


MODELS = {"a": {"task": "generate", "always_on": False}, "b": {"task": "generate", "always_on": False}}


def test_same_config_is_no_change() -> None:
    cfg = config(router_app(MODELS), engine_app("a"), engine_app("b"))
    plan = make_plan(cfg, live_of(cfg))
    assert not plan.has_changes
    assert render.format_text(plan).strip() == render.NO_CHANGES


def test_mixed_plan_actions_reasons_and_summary() -> None:
    live_cfg = config(router_app(MODELS), engine_app("a"), engine_app("b"), engine_app("d"))
    desired = copy.deepcopy(live_cfg)
    apps = desired["applications"]
    apps[1]["deployments"][0]["user_config"]["idle_timeout_s"] = 60.0  # a: in place
    apps[2]["args"]["engine_argv"] = ["--max-model-len", "4096"]  # b: restart
    del apps[3]  # d: delete
    apps.append(engine_app("c"))  # c: create
    plan = make_plan(desired, live_of(live_cfg))
    actions = {c.model: c.action for c in plan.changes}
    assert actions == {"router": Action.NOOP, "a": Action.UPDATE, "b": Action.RESTART,
                       "c": Action.CREATE, "d": Action.DELETE}
    b = plan.change_for("b")
    assert b is not None and b.restart_fields == ("args.engine_argv",)
    assert "rebuilds the app" in b.reasons[0]
    text = render.format_text(plan)
    assert "1 to create, 1 to update in place, 1 to restart, 1 to delete" in text
    assert render.summary_line(plan) == "1 to create, 1 to update in place, 1 to restart, 1 to delete"
    assert '-/+ b' in text and '  ~ a' in text and '  + c' in text and '  - d' in text
    assert 'deployments.engine.user_config.idle_timeout_s: 900.0 → 60.0  # in place' in text
    assert 'args.engine_argv: ["--max-model-len", "2048"] → ["--max-model-len", "4096"]  # forces restart' in text
    assert "\x1b[" not in text  # no colour unless asked
    assert "\x1b[" in render.format_text(plan, color=True)


def test_json_is_versioned_and_round_trips() -> None:
    live_cfg = config(engine_app("a"))
    desired = config(engine_app("a"), engine_app("c"))
    desired["applications"][0]["args"]["gpus"] = [1]
    plan = make_plan(desired, live_of(live_cfg))
    data = json.loads(render.format_json(plan))
    assert data["format_version"] == "1"
    assert data["summary"] == {"create": 1, "update": 0, "restart": 1, "delete": 0}
    assert [c["action"] for c in data["changes"]] == ["restart", "create"]
    assert data["changes"][0]["restart_fields"] == ["args.gpus"]
    again = plan_from_dict(json.loads(json.dumps(plan_to_dict(plan))))
    assert again == plan


FOREIGN = {"name": "x", "import_path": "myapp:app", "route_prefix": "/x", "deployments": [{"name": "X"}]}


@pytest.mark.parametrize(("setting", "kept", "deleted"), [("keep", True, False), ("delete", False, True)])
def test_foreign_apps(setting: str, kept: bool, deleted: bool) -> None:
    cfg = config(engine_app("a"))
    plan = make_plan(cfg, live_of(cfg, FOREIGN), foreign_apps=setting)
    put_names = [a["name"] for a in plan.put_config["applications"]]
    assert ("x" in put_names) is kept
    assert (plan.count(Action.DELETE) == 1) is deleted
    assert [(f.name, f.disposition) for f in plan.foreign] == [("x", setting)]
    text = render.format_text(plan)
    assert f"foreign_apps: {setting}" in text
    assert ("No changes" in text) is kept


def test_fingerprints_ignore_equivalent_forms_and_status() -> None:
    cfg = config(engine_app("a"))
    live = live_of(cfg)
    p1 = make_plan(cfg, live)
    relaxed = copy.deepcopy(cfg)
    relaxed["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpus"] = 1.0
    p2 = make_plan(cfg, live_of(relaxed))
    assert p1.live_fingerprint == p2.live_fingerprint
    changed = copy.deepcopy(cfg)
    changed["applications"][0]["args"]["gpus"] = [3]
    assert make_plan(changed, live).desired_fingerprint != p1.desired_fingerprint


def test_a_serve_started_with_its_proxy_on_is_a_warning() -> None:
    cfg = config(engine_app("a"))
    started_elsewhere = copy.deepcopy(cfg)
    started_elsewhere["proxy_location"] = "EveryNode"  # e.g. a plain `serve deploy` started this Serve
    plan = make_plan(cfg, live_of(started_elsewhere))
    assert not plan.has_changes
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("proxy_location differs")
    assert "Warning: proxy_location differs" in render.format_text(plan)
    assert make_plan(cfg, live_of(cfg)).warnings == ()


def _on_gpu(app: dict[str, Any], *gpus: int) -> dict[str, Any]:
    app["args"]["gpus"] = list(gpus)
    return app


def test_always_on_models_come_up_first_where_starts_share_a_gpu() -> None:
    live_cfg = config(router_app(MODELS), _on_gpu(engine_app("a"), 0))
    desired = config(router_app({**MODELS, "e": {"task": "embed", "always_on": True}}),
                     _on_gpu(always_on(engine_app("e")), 0), _on_gpu(engine_app("a"), 0), engine_app("b"))
    desired["applications"][2]["args"]["engine_argv"] = ["--x"]
    live = live_of(live_cfg)
    plan = make_plan(desired, live)
    held = apply_mod.held_back(plan, live)
    assert [c.model for c in held] == ["a"]  # a shares GPU 0 with the starting always-on e; b starts at once
    by_name = {a["name"]: a for a in apply_mod.body_without(plan, held)["applications"]}
    assert set(by_name) == {"router", "e", "a", "b"}
    assert by_name["a"] == live_cfg["applications"][1]  # still the live config: untouched
    assert by_name["e"] == desired["applications"][1] and by_name["b"] == desired["applications"][3]
    # Next pass: e's config is on Serve but e is still coming up (level-triggered: read from live) -> a waits
    e_up = copy.deepcopy(live_cfg)
    e_up["applications"].append(desired["applications"][1])
    coming = LiveState({n: replace(app, status="DEPLOYING") if n == "e" else app
                        for n, app in live_of(e_up).apps.items()}, serve_running=True)
    assert [c.model for c in apply_mod.held_back(make_plan(desired, coming), coming)] == ["a"]
    running = live_of(e_up)
    assert apply_mod.held_back(make_plan(desired, running), running) == ()


def test_nothing_waits_when_no_start_shares_a_gpu_with_an_always_on_one() -> None:
    # the CPU, or an always-on model on a GPU of its own: every engine starts at once
    live_cfg = config(router_app(MODELS))
    for e_gpus, a_gpus in (((), ()), ((0,), (1,)), ((), (0,))):
        desired = config(router_app({**MODELS, "e": {"task": "embed", "always_on": True}}),
                         _on_gpu(always_on(engine_app("e")), *e_gpus), _on_gpu(engine_app("a"), *a_gpus))
        live = live_of(live_cfg)
        assert apply_mod.held_back(make_plan(desired, live), live) == ()


def test_nothing_waits_without_an_always_on_change() -> None:
    cfg = config(engine_app("a"))
    live = live_of(cfg)
    assert apply_mod.held_back(make_plan(config(engine_app("a"), engine_app("b")), live), live) == ()


def _judge(action: Action, now: AppLive | None, before: AppLive | None = None) -> str:
    cfg = engine_app("a")
    plan = make_plan(config(cfg), LiveState())
    change = plan.changes[0].__class__(action, "a", None, cfg)
    return rollout.judge(change, now, before)


def _app(status: str, dep_status: str = "HEALTHY", ids: tuple[str, ...] = ("r1",)) -> AppLive:
    reps = tuple(Replica(i, "RUNNING") for i in ids)
    return AppLive("a", status, deployments=(DeploymentLive("engine", dep_status, replicas=reps,
                                                            target_num_replicas=len(ids)),))


def test_judging_progress() -> None:
    assert _judge(Action.CREATE, None) == "not yet known to Serve"
    assert _judge(Action.CREATE, _app("DEPLOYING", "UPDATING")) == "deploying"
    assert _judge(Action.CREATE, _app("RUNNING")) == "ok"
    assert _judge(Action.RESTART, _app("RUNNING"), before=_app("RUNNING")) == "old replicas still running"
    assert _judge(Action.RESTART, _app("RUNNING", ids=("r2",)), before=_app("RUNNING")) == "ok"
    assert _judge(Action.UPDATE, _app("DEPLOY_FAILED", "DEPLOY_FAILED")) == "DEPLOY_FAILED"
    assert _judge(Action.DELETE, _app("DELETING")) == "being deleted (DELETING)"
    assert _judge(Action.DELETE, None) == "ok"


def test_parse_live_state_from_dashboard_answer() -> None:
    payload = {
        "controller_info": {"node_id": "n"}, "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": {"a": {
            "status": "RUNNING", "message": "", "deployed_app_config": engine_app("a"),
            "deployments": {"engine": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [
                {"replica_id": "abc", "state": "RUNNING", "pid": 42, "node_id": "n"}]}}}},
    }
    state = parse_live_state(payload)
    assert state.serve_running
    assert state.apps["a"].replica_ids() == {"engine": ("abc",)}
    assert state.apps["a"].deployments[0].replicas[0].pid == 42
    empty = parse_live_state({"controller_info": {}, "proxies": {}, "applications": {}, "target_capacity": None})
    assert not empty.serve_running and empty.apps == {}


def _hold(url: str, ready: Any, seconds: float) -> None:
    with lock.apply_lock(url):
        ready.set()
        time.sleep(seconds)


def test_second_apply_waits_then_refuses_naming_the_holder(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("FLEET_LOCK_DIR", str(tmp_path))
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=("http://x:8265", ready, 3.0))
    holder.start()
    try:
        assert ready.wait(10)
        waits: list[str] = []
        with pytest.raises(lock.LockHeldError, match=rf"pid {holder.pid} \("), \
                lock.apply_lock("http://x:8265", wait_s=0.5, on_wait=waits.append):
            pass
        assert waits and "waiting up to" in waits[0]
        with lock.apply_lock("http://other:8265", wait_s=0):  # another Serve: no conflict
            pass
        with lock.apply_lock("http://x:8265", wait_s=10) as me:  # waits, then gets it
            assert me.pid != holder.pid
    finally:
        holder.join(10)


@pytest.mark.parametrize(("download", "line"), [
    (Download("hf://o/m", 3 * 2**30, 3 * 2**30, ""), "download: 3.0 GiB from the Hub before it starts"),
    (Download("hf://o/m", 3 * 2**30, 2**30, ""),
     "download: 1.0 GiB from the Hub before it starts (2.0 GiB of 3.0 GiB already in the cache)"),
    (Download("hf://o/m", 3 * 2**30, 0, ""), "download: already downloaded (3.0 GiB in the cache)"),
    (Download("hf://o/m", None, 0, "the Hub could not be asked"),
     "download: already downloaded; the Hub could not be asked"),
    (Download("hf://o/m", None, None, "no such repository"), "download: size unknown (no such repository)"),
])
def test_a_created_models_download_shows_in_the_plan(download: Download, line: str) -> None:
    plan = make_plan(config(engine_app("a")), LiveState(apps={}, globals={}, serve_running=True))
    plan = replace(plan, changes=tuple(replace(c, download=download) if c.model == "a" else c
                                       for c in plan.changes))
    assert f"      {line}" in render.format_text(plan).splitlines()
    again = plan_from_dict(json.loads(render.format_json(plan)))
    assert again.change_for("a").download == download  # type: ignore[union-attr]
