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
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from probe import BOUND_S, first_token_s, model_states
from relay import CPU_ENGINE_ENV, free_port

A, B = "swap-a", "swap-b"
CPU_ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}


def _fleet(model_dir: Path, port: int, args: argparse.Namespace) -> dict[str, Any]:
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    engine_args = json.loads(args.engine) if args.engine else CPU_ENGINE_ARGS
    placed = {"gpus": gpus, "gpu_memory": args.gpu_memory} if gpus else {"env": CPU_ENGINE_ENV}
    member = {"source": str(model_dir), "swap_group": "bench", "idle_timeout": "never", "engine": engine_args,
              **placed}
    return {"openai": {"host": "127.0.0.1", "port": port, "load_timeout": f"{BOUND_S:.0f}s"},
            "models": {A: member, B: member}}


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
