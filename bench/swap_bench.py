"""One swap in a swap group, end to end through the fleet's endpoint (``bench/lifecycle.py --swap``).

Two copies of one model, ``swap-a`` and ``swap-b``, in swap group ``bench`` (awake: 1), compiled by
the real pipeline from a fleet file and PUT to a Ray head of our own. After both were loaded once,
each round times, through the endpoint, a streamed chat's first token for the awake member (no
swap), then for the other one: the fleet puts the awake member to sleep (GPU) or unloads it (CPU)
and wakes or loads the one asked for. Swap overhead = swap first token - awake first token (the
issue's goal on a GPU: <= 1.5 s). Everything started is stopped with the head.

    python bench/lifecycle.py --swap --rounds 3                          # CPU: swaps are reloads
    python bench/lifecycle.py --swap --model DIR --gpus 0 --gpu-memory 0.6 \\
        --engine '{"dtype": "bfloat16", "max_model_len": 1024}'          # a GPU: swaps are sleep/wake

``--alternate N`` measures the swap scheduler instead: two clients, one per member, each sending N
streamed chats one after another, started together (A, B, A, B… arrive interleaved), once per
``--max-wait`` value (changed in place between runs; 0 is first come first served, the scheduler
off). Per run: requests, swaps, waits (send → first token) p50/p99/max, and each swap's breakdown
as the coordinator timed it (waiting for quiet, sleep, wake, routing to the first admitted request)
plus the first token after it, seen by the client.

    python bench/lifecycle.py --swap --alternate 4 --max-wait 0,10      # CPU (each swap a ~1 min reload)
    python bench/lifecycle.py --swap --alternate 40 --max-wait 0,5 --model DIR --gpus 0 --gpu-memory 0.6 \\
        --engine '{"dtype": "bfloat16", "max_model_len": 1024}'          # a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from probe import BOUND_S, first_token_s, model_states
from relay import CPU_ENGINE_ENV, free_port

A, B = "swap-a", "swap-b"
CPU_ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}


def _fleet(model_dir: Path, port: int, args: argparse.Namespace, max_wait: str | None = None) -> dict[str, Any]:
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    engine_args = json.loads(args.engine) if args.engine else CPU_ENGINE_ARGS
    placed = {"gpus": gpus, "gpu_memory": args.gpu_memory} if gpus else {"env": CPU_ENGINE_ENV}
    member = {"source": str(model_dir), "swap_group": "bench", "idle_timeout": "never", "engine": engine_args,
              **placed}
    groups = {"swap_groups": {"bench": {"max_wait": max_wait, "queue_timeout": "1h"}}} if max_wait else {}
    return {"openai": {"host": "127.0.0.1", "port": port, "load_timeout": f"{BOUND_S:.0f}s"},
            "models": {A: member, B: member}, **groups}


def _wait_running(dashboard: str, names: set[str]) -> None:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        apps = httpx.get(dashboard + "/api/serve/applications/", timeout=30).json().get("applications") or {}
        status = {n: a.get("status") for n, a in apps.items()}
        if any(s == "DEPLOY_FAILED" for s in status.values()):
            raise RuntimeError(f"deploy failed: {json.dumps(apps)[-2000:]}")
        if all(status.get(n) == "RUNNING" for n in names):
            return
        time.sleep(1.0)
    raise TimeoutError("the swap fleet did not come up")


def run_swap_bench(model_dir: Path, work: Path, args: argparse.Namespace) -> int:
    from reconciler.desired.pipeline import desired_state
    from reconciler.fleetfiles import inventory
    from reconciler.live import cluster

    if getattr(args, "alternate", 0):
        return run_alternate_bench(model_dir, work, args)
    gpus = len(inventory.nvml_gpus()) if args.gpus else 0
    head = cluster.start_head(num_cpus=4, resources=cluster.gpu_resources(gpus),
                              env={"FLEET_LOG_DIR": str(work / "fleet-logs")})
    rounds: list[dict[str, Any]] = []
    try:
        port = free_port()
        root = work / "fleet"
        root.mkdir(parents=True, exist_ok=True)
        (root / "fleet.yaml").write_text(json.dumps(_fleet(model_dir, port, args), indent=2))  # JSON is YAML
        config = desired_state(root).config
        r = httpx.put(head.dashboard_url + "/api/serve/applications/", json=config, timeout=120)
        r.raise_for_status()
        _wait_running(head.dashboard_url, {"router", "swap-groups", A, B})
        base = f"http://127.0.0.1:{port}"
        for model in (A, B):  # each loaded once: later swaps wake (GPU) or reload (CPU), never a first load
            first_token_s(base, time.monotonic(), model)
        awake, other = B, A
        for i in range(args.rounds * 2):
            warm = first_token_s(base, time.monotonic(), awake)
            swap = first_token_s(base, time.monotonic(), other)
            states = model_states(base)
            rounds.append({"round": i, "from": awake, "to": other, "awake_first_token_s": warm,
                           "swap_first_token_s": swap, "swapped_out_state": states.get(awake)})
            print(json.dumps(rounds[-1]), file=sys.stderr)
            awake, other = other, awake
    finally:
        cluster.stop_head(head)
    warm = statistics.median(r["awake_first_token_s"] for r in rounds)
    swap = statistics.median(r["swap_first_token_s"] for r in rounds)
    summary = {"awake_first_token_s": warm, "swap_first_token_s": swap, "swap_overhead_s": swap - warm}
    if args.json:
        print(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    else:
        print("\n".join(f"{k:36} {v:8.2f}" for k, v in summary.items()))
        print(f"{'swapped-out member was':36} {', '.join(sorted({str(r['swapped_out_state']) for r in rounds}))}")
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _put(dashboard: str, root: Path, fleet: dict[str, Any]) -> None:
    from reconciler.desired.pipeline import desired_state

    (root / "fleet.yaml").write_text(json.dumps(fleet, indent=2))  # JSON is YAML
    r = httpx.put(dashboard + "/api/serve/applications/", json=desired_state(root).config, timeout=120)
    r.raise_for_status()


def _group_status() -> dict[str, Any]:
    from ray import serve

    return dict(serve.get_app_handle("swap-groups").status.remote().result(timeout_s=60)["bench"])


def alternate_run(base: str, requests: int) -> dict[str, Any]:
    """Two clients, one per member, ``requests`` streamed chats each, back to back; both start together."""
    waits: dict[str, list[float]] = {A: [], B: []}
    first_tokens: list[tuple[str, float]] = []  # (model, wall time of a first token)
    errors: list[BaseException] = []

    def client(model: str) -> None:
        for _ in range(requests):
            try:
                sent = time.monotonic()
                waits[model].append(first_token_s(base, sent, model, drain=True))
                first_tokens.append((model, time.time() - (time.monotonic() - sent - waits[model][-1])))
            except BaseException as e:  # noqa: BLE001 - the run reports it
                errors.append(e)
                return

    before = _group_status()
    threads = [threading.Thread(target=client, args=(m,)) for m in (A, B)]
    for t in threads:
        t.start()
        time.sleep(0.01)  # A first, then B: interleaved from here on
    for t in threads:
        t.join(BOUND_S * requests)
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]!r}")
    after = _group_status()
    swaps = after["swap_log"][len(before["swap_log"]):] if len(after["swap_log"]) < 50 else after["swap_log"]
    for record in swaps:  # the first token after the swap, as the client saw it
        later = [at for m, at in first_tokens if m == record.get("to") and at >= record.get("admitted_at", math.inf)]
        if later:
            record["first_token_s"] = round(min(later) - record["admitted_at"], 4)
    every = waits[A] + waits[B]
    return {"requests": len(every), "swaps": after["swaps"] - before["swaps"],
            "wait_p50_s": statistics.median(every), "wait_p99_s": _percentile(every, 0.99),
            "wait_max_s": max(every), "swap_log": swaps}


def run_alternate_bench(model_dir: Path, work: Path, args: argparse.Namespace) -> int:
    import ray

    from reconciler.fleetfiles import inventory
    from reconciler.live import cluster

    gpus = len(inventory.nvml_gpus()) if args.gpus else 0
    head = cluster.start_head(num_cpus=4, resources=cluster.gpu_resources(gpus),
                              env={"FLEET_LOG_DIR": str(work / "fleet-logs")})
    runs: list[dict[str, Any]] = []
    try:
        ray.init(address=head.gcs_address, log_to_driver=False)
        port = free_port()
        root = work / "fleet"
        root.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{port}"
        for value in [v.strip() for v in args.max_wait.split(",") if v.strip()]:
            max_wait = value if not value.replace(".", "").isdigit() else f"{value}s"
            _put(head.dashboard_url, root, _fleet(model_dir, port, args, max_wait))  # in place after the first
            _wait_running(head.dashboard_url, {"router", "swap-groups", A, B})
            deadline = time.monotonic() + BOUND_S
            while _group_status().get("max_wait_s") != _seconds(max_wait):
                if time.monotonic() > deadline:
                    raise TimeoutError("the coordinator never took max_wait " + max_wait)
                time.sleep(0.5)
            first_token_s(base, time.monotonic(), A, drain=True)  # A awake: each run starts from the same place
            run = {"max_wait": max_wait, **alternate_run(base, args.alternate)}
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)
    finally:
        ray.shutdown()
        cluster.stop_head(head)
    if args.json:
        print(json.dumps({"runs": runs}, indent=2))
        return 0
    for run in runs:
        print(f"max_wait {run['max_wait']:>6}: {run['requests']} requests, {run['swaps']} swaps, wait (send -> first "
              f"token) p50 {run['wait_p50_s']:.2f} s, p99 {run['wait_p99_s']:.2f} s, max {run['wait_max_s']:.2f} s")
        print(f"  {'from -> to':18} {'reason':9} {'quiet':>7} {'sleep':>7} {'wake':>7} {'routing':>8} {'1st token':>9}")
        for r in run["swap_log"]:
            cells = [r.get(k) for k in ("quiet_s", "sleep_s", "wake_s", "route_s", "first_token_s")]
            text = " ".join(f"{c:7.3f}" if isinstance(c, (int, float)) else f"{'-':>7}" for c in cells)
            print(f"  {str(r.get('from')) + ' -> ' + str(r.get('to')):18} {r.get('reason', ''):9} {text}")
    return 0


def _seconds(duration: str) -> float | None:
    from reconciler.fleetfiles.units import parse_duration

    return parse_duration(duration)
