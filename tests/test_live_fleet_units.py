"""The pure parts of the live fleet, table-driven: health from Serve's words, the capacity check,
engine phases from vLLM's log lines, failure memory, and which files the watcher follows."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.change import capacity, render
from reconciler.change.plan import Action, make_plan
from reconciler.desired.pipeline import desired_state
from reconciler.live import engine_log
from reconciler.live.health import Health, app_health
from reconciler.live.serve_state import AppLive, Cluster, DeploymentLive, LiveState, Node, Replica
from reconciler.loop.reconcile import Failures
from reconciler.loop.watch import is_fleet_file
from serve_app.contract import ModelState

UNSCHEDULABLE = ("Deployment 'engine' in application 'a' has 1 replicas that have taken more than 5s to be "
                 "scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment "
                 "to be installed. Resources required for each replica: {\"CPU\": 1.0, \"fleet_gpu_0\": 0.5}, "
                 "total resources available: {}. Use `ray status` for more details.")


SLOW_ONLY = UNSCHEDULABLE.replace("total resources available: {}",
                                  'total resources available: {"CPU": 3.0, "fleet_gpu_0": 1.0}')


def app(status: str, dep_status: str = "HEALTHY", message: str = "", running: int = 1, target: int = 1) -> AppLive:
    replicas = tuple(Replica(f"r{i}", "RUNNING") for i in range(running))
    return AppLive("a", status, "", {}, (DeploymentLive("engine", dep_status, message, replicas, target),))


@pytest.mark.parametrize(("live", "state", "health"), [
    (None, ModelState.ABSENT, Health.MISSING),
    (app("RUNNING"), ModelState.READY, Health.HEALTHY),
    (app("DEPLOYING", "UPDATING", running=0), ModelState.STARTING, Health.PROGRESSING),
    (app("DEPLOYING", "UPDATING", UNSCHEDULABLE, running=0), ModelState.UNSCHEDULABLE, Health.DEGRADED),
    # slow to place on a busy box, but the resources are there: still starting
    (app("DEPLOYING", "UPDATING", SLOW_ONLY, running=0), ModelState.STARTING, Health.PROGRESSING),
    (app("DEPLOY_FAILED", "DEPLOY_FAILED", running=0), ModelState.FAILED, Health.DEGRADED),
    (app("UNHEALTHY", "UNHEALTHY"), ModelState.UNHEALTHY, Health.DEGRADED),
    (app("DELETING"), ModelState.STOPPING, Health.PROGRESSING),
])
def test_state_and_health_from_serve(live: AppLive | None, state: ModelState, health: Health) -> None:
    h = app_health(live)
    assert (h.state, h.health) == (state, health)
    if state is ModelState.UNSCHEDULABLE:
        assert "fleet_gpu_0" in h.message


def test_health_is_ordered_worst_last() -> None:
    assert Health.DEGRADED.is_worse(Health.PROGRESSING)
    assert Health.SUSPENDED.is_worse(Health.HEALTHY) and not Health.HEALTHY.is_worse(Health.SUSPENDED)


@pytest.mark.parametrize(("lines", "phase"), [
    ("", ""),
    ("INFO some import noise", "starting Python (imports)"),
    ("(APIServer pid=1) WARNING 11-28 [vllm.py:1703] Enforce eager set, disabling torch.compile, CUDAGraphs, "
     "and JIT kernel warmup.", "starting Python (imports)"),
    ("(EngineCore pid=2) INFO 11-28 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: ...",
     "initialising the engine"),
    ("converting /x/m.gguf into /c/m (once)", "preparing the weights"),
    ("INFO Automatically detected platform cpu.\nINFO Starting to load model /m...", "loading weights"),
    ("INFO Loading weights took 0.21 seconds", "weights loaded"),
    ("INFO torch.compile takes 19.2 s in total", "compiling (torch.compile)"),
    ("INFO # CPU blocks: 4096", "allocating the KV cache"),
    ("Capturing CUDA graphs (mixed prefill-decode): 100%", "capturing CUDA graphs"),
    ("INFO Starting vLLM API server 0 on http://127.0.0.1:1234", "starting the HTTP server"),
    ("INFO:     Application startup complete.", "ready"),
])
def test_engine_phase_from_vllm_log(lines: str, phase: str) -> None:
    assert engine_log.phase(lines) == phase


def write_fleet(tmp_path: Path, models: str, inventory: str = "") -> Path:
    (tmp_path / "fleet.yaml").write_text(inventory + "models:\n" + models)
    for d in ("m",):
        (tmp_path / d).mkdir(exist_ok=True)
        (tmp_path / d / "config.json").write_text('{"num_attention_heads": 4}')
    return tmp_path


def node(ip: str = "127.0.0.1", head: bool = True, **resources: float) -> Node:
    """A node as Ray's state API lists it: its ``node:<ip>`` resource, the head's marker, the rest."""
    marker = {"node:__internal_head__": 1.0} if head else {}
    return Node(f"n-{ip}", ip, {f"node:{ip}": 1.0, **marker, **resources})


def test_capacity_refuses_a_gpu_no_node_has(tmp_path: Path) -> None:
    inv = "inventory:\n  gpus: [{index: 0, memory: 24GiB}, {index: 1, memory: 24GiB}]\n"
    d = desired_state(write_fleet(tmp_path, "  a:\n    source: ./m\n    gpus: [1]\n    gpu_memory: 0.5\n"
                                            "    size: 1GiB\n", inv))
    plan = make_plan(d.config, LiveState())
    problems = capacity.check(plan, d, Cluster((node(CPU=4.0, fleet_gpu_0=1.0),)))
    assert len(problems) == 1
    text = str(problems[0])
    assert text.startswith("fleet.yaml:6:5: models.a:") and "fleet_gpu_1" in text and "ray start" in text
    assert capacity.check(plan, d, Cluster((node(CPU=4.0, fleet_gpu_0=1.0, fleet_gpu_1=1.0),))) == []
    assert capacity.check(plan, d, None) == []  # cluster unknown: never a reason to refuse


def test_capacity_sums_replicas_against_the_cluster(tmp_path: Path) -> None:
    inv = "inventory:\n  gpus: [{index: 0, memory: 24GiB}]\n"
    d = desired_state(write_fleet(tmp_path, "  a:\n    source: ./m\n    gpus: [0]\n    gpu_memory: 0.4\n"
                                            "    size: 1GiB\n    replicas: 2\n", inv))
    plan = make_plan(d.config, LiveState())
    assert capacity.check(plan, d, Cluster((node(CPU=4.0, fleet_gpu_0=1.0),))) == []
    problems = capacity.check(plan, d, Cluster((node(CPU=4.0, fleet_gpu_0=0.5),)))
    assert ["needs 0.8 of GPU 0" in str(p) and "has 0.5" in str(p) for p in problems] == [True]


def test_capacity_refuses_a_node_the_cluster_lacks(tmp_path: Path) -> None:
    d = desired_state(write_fleet(tmp_path, "  a:\n    source: ./m\n    node: 127.0.0.2\n"))
    plan = make_plan(d.config, LiveState())
    problems = capacity.check(plan, d, Cluster((node(CPU=4.0),)))
    assert len(problems) == 1
    text = str(problems[0])
    assert text.startswith("fleet.yaml:4:5: models.a.node:"), text
    assert "node 127.0.0.2" in text and "127.0.0.1" in text and "ray start --address" in text
    two = Cluster((node(CPU=4.0), node("127.0.0.2", head=False, CPU=2.0)))
    assert capacity.check(plan, d, two) == []
    # the router stays on the head: a cluster whose head is not listed cannot hold it
    assert any("models.router" in str(p) for p in capacity.check(plan, d, Cluster((node("127.0.0.2", head=False,
                                                                                          CPU=2.0),))))


def test_restart_cost_comes_from_measured_starts(tmp_path: Path) -> None:
    d = desired_state(write_fleet(tmp_path, "  a:\n    source: ./m\n    engine: {max_model_len: 256}\n"))
    live_cfg = dict(d.config["applications"][1])
    live_cfg["args"] = {**live_cfg["args"], "engine_argv": ["--max-model-len", "128"]}
    live = LiveState({"a": AppLive("a", "RUNNING", "", live_cfg)}, serve_running=True)
    plan = make_plan(d.config, live, start_times={"a": 61.7})
    assert plan.change_for("a").action is Action.RESTART and plan.change_for("a").downtime_s == 61.7
    assert "expected downtime ~62 s" in render.format_text(plan)
    assert "expected downtime unknown" in render.format_text(make_plan(d.config, live))


def test_failures_are_held_until_the_config_changes() -> None:
    f = Failures()
    f.record("a", "sha256:1", "boom")
    assert f.held("a", "sha256:1") == "boom" and f.held("a", "sha256:2") is None
    f.forget_changed({"a": "sha256:2"})
    assert f.held("a", "sha256:1") is None


@pytest.mark.parametrize(("path", "followed"), [
    ("fleet.yaml", True), ("fleet.d/b.yaml", True), ("fleet.d/c.yml", True), ("fleet.d/x.yaml.example", False),
    (".fleet.yaml.tmp", False), ("other.yaml", False), ("fleet.d/sub/d.yaml", False),
])
def test_watcher_follows_only_fleet_files(tmp_path: Path, path: str, followed: bool) -> None:
    assert is_fleet_file(tmp_path, str(tmp_path / path)) is followed
