"""How fast is `fleetctl plan` on a big fleet, and a no-op apply? Goals: plan <= 1 s, no-op apply <= 0.5 s.

Starting 200 engines is out of the question on a small box, so the live side is recorded, not
run: a dashboard answer for 200 apps is built from the compiled config the way Serve 2.60
echoes it (ints turned floats, statuses, replicas), then serialized, so parsing it costs what
parsing the real one would. The network part is measured separately against a real dashboard
holding a few apps (`--dashboard URL`), and a no-op apply end to end when `--fleet PATH` is a
fleet that already matches that Serve.

    python bench/plan_speed.py                       # offline parts, 200 models
    python bench/plan_speed.py --dashboard http://127.0.0.1:8265 --fleet path/to/fleet
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.change import render
from reconciler.change.plan import make_plan
from reconciler.desired.pipeline import desired_state
from reconciler.live import serve_state as live


def write_fleet(root: Path, n: int) -> None:
    models = "\n".join(
        f"  model-{i:03d}:\n    source: /models/m{i:03d}\n    task: {'embed' if i % 10 == 0 else 'generate'}\n"
        f"    idle_timeout: {5 + i % 30}m\n    engine: {{max_model_len: {1024 * (1 + i % 4)}}}"
        for i in range(n)
    )
    (root / "fleet.yaml").write_text(
        "defaults:\n  engine: {dtype: float32, enforce_eager: true}\n  env: {VLLM_CPU_KVCACHE_SPACE: \"1\"}\n"
        f"models:\n{models}\n"
    )


def _as_serve_echoes(value: Any, key: str = "") -> Any:
    """Serve's pydantic turns the numbers of float fields into floats (num_gpus 0 -> 0.0)."""
    if isinstance(value, dict):
        return {k: _as_serve_echoes(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_serve_echoes(v) for v in value]
    if key in ("num_cpus", "num_gpus") and isinstance(value, int):
        return float(value)
    return value


def recorded_answer(config: dict[str, Any]) -> str:
    """A GET /api/serve/applications/ answer for a Serve running exactly `config`."""
    apps = {}
    for i, app in enumerate(config["applications"]):
        deployments = {}
        for d in app["deployments"]:
            deployments[d["name"]] = {
                "name": d["name"], "status": "HEALTHY", "status_trigger": "CONFIG_UPDATE_COMPLETED",
                "message": "", "deployment_config": _as_serve_echoes(d), "target_num_replicas": 1,
                "replicas": [{"replica_id": f"r{i:04d}x", "state": "RUNNING", "pid": 10000 + i,
                              "node_id": "n" * 56, "actor_id": "a" * 32, "start_time_s": 1.0e9}],
            }
        apps[app["name"]] = {"name": app["name"], "route_prefix": app.get("route_prefix"), "status": "RUNNING",
                             "message": "", "last_deployed_time_s": 1.0e9, "source": "declarative",
                             "deployed_app_config": _as_serve_echoes(app), "deployments": deployments}
    return json.dumps({"controller_info": {"node_id": "n"}, "proxy_location": "EveryNode",
                       "http_options": config["http_options"], "applications": apps})


def timed(fn: Callable[[], Any], repeat: int = 5) -> tuple[float, Any]:
    """Median seconds over `repeat` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def offline(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        write_fleet(Path(tmp), n)
        t_desired, state = timed(lambda: desired_state(tmp))
    config = state.config
    answer = recorded_answer(config)
    t_parse, live_state = timed(lambda: live.parse_live_state(json.loads(answer)))
    t_plan, plan = timed(lambda: make_plan(config, live_state))
    assert not plan.has_changes, render.format_text(plan)
    changed = copy.deepcopy(config)
    for app in changed["applications"][1:11]:
        app["args"]["engine_argv"] = [*app["args"]["engine_argv"], "--seed", "1"]
    for app in changed["applications"][11:21]:
        app["deployments"][0]["user_config"]["idle_timeout_s"] = 1.0
    t_plan20, plan20 = timed(lambda: make_plan(changed, live_state))
    t_text, _ = timed(lambda: render.format_text(plan20))
    t_json, _ = timed(lambda: render.format_json(plan20))
    return {"apps": len(config["applications"]), "answer_kib": len(answer) / 1024,
            "load_place_compile_s": t_desired, "parse_live_s": t_parse, "make_plan_noop_s": t_plan,
            "make_plan_20_changes_s": t_plan20, "render_text_s": t_text, "render_json_s": t_json,
            "plan_total_without_network_s": t_desired + t_parse + t_plan20 + t_text}


def online(dashboard: str, fleet: str | None) -> dict[str, float]:
    client = live.make_client(dashboard)
    t_get, state = timed(lambda: live.read_live_state(dashboard, client=client), repeat=20)
    out = {"live_apps": len(state.apps), "get_round_trip_s": t_get}
    if fleet:
        cli = [sys.executable, "-c", "from reconciler.cli.fleetctl import main; main()"]
        for name, args in (("cli_plan_s", ["plan", fleet]),
                           ("cli_noop_apply_s", ["apply", fleet, "--auto-approve"])):
            t, r = timed(lambda a=args: subprocess.run(cli + a, capture_output=True, text=True), repeat=3)
            assert r.returncode == 0 and "No changes" in r.stdout, r.stdout + r.stderr
            out[name] = t
        from reconciler.loop.reconcile import reconcile

        out["inproc_noop_apply_s"], _ = timed(lambda: reconcile(Path(fleet), approve=lambda _plan: True))
        out["python_startup_and_imports_s"], _ = timed(lambda: subprocess.run(
            [*cli, "--version"], capture_output=True), repeat=3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--dashboard", help="a live dashboard to time the GET round trip against")
    ap.add_argument("--fleet", help="a fleet that matches that Serve, to time a no-op apply")
    args = ap.parse_args()
    results = offline(args.models)
    if args.dashboard:
        results |= online(args.dashboard, args.fleet)
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v * 1000:9.1f} ms" if k.endswith("_s") else f"{k:<{width}}  {v:9.1f}")


if __name__ == "__main__":
    main()
