"""Lifecycle benchmark (CPU): what does loading an unloaded model on demand cost over vLLM's own start?

Rounds alternate, so drift on a shared box hits both alike:

* ``direct`` -- vLLM's OpenAI server started by hand with the same argv the engine replica uses:
  seconds from the start to ``/health`` 200, and to the first token of a streamed chat;
* ``fleet``  -- the fleet's endpoint (Ray head, router + one engine app with idle_timeout 2 s): wait
  until /v1/models says ``unloaded`` (the vLLM child is gone), then the seconds from sending a
  streamed chat to its first token. The engine loads the model on demand; the client never retries.

Overhead = fleet first token after unload - direct start-to-healthy (the issue's measure), and
- direct start-to-first-token (the same work, vLLM alone). Everything started is stopped by pid.

    python bench/lifecycle.py                 # tiny random Llama, 3 rounds each
    python bench/lifecycle.py --model DIR --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from probe import BOUND_S, first_token_s
from relay import (
    CPU_ENGINE_ARGV,
    CPU_ENGINE_ENV,
    MODEL_NAME,
    EngineSetup,
    RayServeStack,
    build_tiny_llama,
    free_port,
    stop_process_group,
)

from serve_app import model_source, vllm_child

IDLE_S = 2.0
CPU_ENGINE = EngineSetup(CPU_ENGINE_ARGV.split(), CPU_ENGINE_ENV, None)


def direct_round(model_dir: Path, work: Path) -> dict[str, float]:
    """Start vLLM as the engine would; time /health and the first token."""
    port = free_port()
    argv = vllm_child.vllm_argv(MODEL_NAME, model_source.resolve(str(model_dir)), "generate",
                                list(CPU_ENGINE.argv), port)
    url = f"http://127.0.0.1:{port}"
    with open(work / "direct.log", "ab") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=vllm_child.child_env(CPU_ENGINE.env, []), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; see {work / 'direct.log'}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        healthy = time.monotonic() - t0
        return {"start_to_healthy_s": healthy, "start_to_first_token_s": first_token_s(url, t0)}
    finally:
        stop_process_group(proc)


def model_state(base_url: str) -> str:
    data = httpx.get(base_url + "/v1/models", timeout=30).json()["data"]
    return str(next(m["state"] for m in data if m["id"] == MODEL_NAME))


def fleet_round(base_url: str) -> dict[str, float]:
    """Wait for the idle unload, then time a request's first token."""
    deadline = time.monotonic() + BOUND_S
    while model_state(base_url) != "unloaded":
        if time.monotonic() > deadline:
            raise TimeoutError("the model was never unloaded")
        time.sleep(0.2)
    return {"first_token_after_unload_s": first_token_s(base_url, time.monotonic())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an HF model folder (default: build a tiny random Llama)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu", type=int, help="GPU mode: sleep/wake and a swap group on this GPU")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--swap", action="store_true", help=(
        "measure one swap in a swap group instead: two copies of the model in a group with awake: 1, "
        "through the endpoint, against a request to the awake member"))
    parser.add_argument("--alternate", type=int, default=0, help=(
        "--swap: the swap scheduler instead: two clients alternating, this many requests each, per --max-wait"))
    parser.add_argument("--max-wait", default="0,5", help=(
        "--swap --alternate: the group's max_wait values to compare, e.g. 0,5 (0: first come first served)"))
    parser.add_argument("--gpus", default="", help="--swap: GPU indices both members share, e.g. 0 (default: CPU)")
    parser.add_argument("--gpu-memory", type=float, default=0.6, help="--swap: each member's share of its GPUs")
    parser.add_argument("--engine", default="", help=(
        '--swap, --gpu: vLLM engine args as JSON for the fleet file, '
        'e.g. \'{"dtype": "bfloat16", "max_model_len": 1024}\' (default: the CPU flags)'))
    args = parser.parse_args(argv)
    if args.gpu is not None:
        import lifecycle_gpu

        return lifecycle_gpu.run(args.model, args.gpu, args.rounds, json.loads(args.engine or "{}"), args.json)
    work = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    model_dir = args.model or build_tiny_llama(work / "tiny-llama")
    if args.swap:
        from swap_bench import run_swap_bench  # one swap, end to end through the endpoint

        return run_swap_bench(model_dir, work, args)
    stack = RayServeStack(model_dir, work / "ray", CPU_ENGINE, with_fleet=True, with_rayllm=False,
                          engine_options={"user_config": {"idle_timeout_s": IDLE_S, "always_on": False}})
    rounds: list[dict[str, Any]] = []
    try:
        stack.launch()
        [endpoint] = stack.wait(time.monotonic() + BOUND_S)
        for i in range(args.rounds):
            rounds.append({"round": i, "target": "direct", **direct_round(model_dir, work)})
            rounds.append({"round": i, "target": "fleet", **fleet_round(endpoint.base_url)})
            print(json.dumps(rounds[-2:]), file=sys.stderr)
    finally:
        stack.stop()
    result = summarize(rounds)
    print(json.dumps({"rounds": rounds, "summary": result}, indent=2) if args.json else render(result))
    return 0


def summarize(rounds: list[dict[str, Any]]) -> dict[str, float]:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds if key in r)

    healthy, direct_ft = median("start_to_healthy_s"), median("start_to_first_token_s")
    fleet_ft = median("first_token_after_unload_s")
    return {"direct_start_to_healthy_s": healthy, "direct_start_to_first_token_s": direct_ft,
            "fleet_first_token_after_unload_s": fleet_ft, "overhead_vs_healthy_s": fleet_ft - healthy,
            "overhead_vs_first_token_s": fleet_ft - direct_ft}


def render(s: dict[str, float]) -> str:
    return "\n".join(f"{k:36} {v:8.2f}" for k, v in s.items())


if __name__ == "__main__":
    sys.exit(main())
