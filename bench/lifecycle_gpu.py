"""Lifecycle on a GPU (``python bench/lifecycle.py --gpu 0 --model DIR``): sleep, wake and swap, measured
through the fleet's endpoint on a fleet brought up the product's way (fleet files, ``fleetctl apply``).

1. ``sleepy`` (gpu_memory 0.2, idle_timeout 3s): time to first token awake; then, each round, wait
   for /v1/models to say ``asleep``, read the GPU's used memory (NVML) and time the first token of
   the request that wakes it. Extra = asleep - awake (the issue's goal: <= 0.5 s for 0.6 B).
2. ``swap-a`` + ``swap-b`` (0.6 of the GPU each: 1.4 with ``sleepy``, so only a swap group with
   ``awake: 1`` fits): alternate requests; each one after the first two is one swap (the other member
   to sleep, this one woken), timed end to end to the first token (goal <= 1.5 s): first right after
   the other member answered (put away as soon as the routers count none of its requests in flight),
   then with the other member idle a while first, as when a person switches models. /v1/models is
   read after every answer: never both members awake.

It checks as it goes (a failed request, memory not freed or both members awake end the run with an
error) and prints what a sleeping engine still holds. Everything runs on our own Ray head, stopped
at the end with all it started.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from probe import BOUND_S, first_token_s, model_states
from relay import build_tiny_llama, free_port

GIB = 1024**3
REST_S = 2.0  # the other member idle this long first: a person switching models


def used_gib(gpu: int) -> float:
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(gpu)).used / GIB
    finally:
        pynvml.nvmlShutdown()


def card(gpu: int) -> str:
    import pynvml

    pynvml.nvmlInit()
    try:
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(gpu))
        return name.decode() if isinstance(name, bytes) else str(name)
    finally:
        pynvml.nvmlShutdown()


class Fleet:
    """A fleet folder on our head; ``apply(models)`` writes fleet.yaml and runs ``fleetctl apply``."""

    def __init__(self, root: Path, dashboard: str, port: int, engine: dict[str, Any]) -> None:
        self.root, self.dashboard, self.port, self.engine = root, dashboard, port, engine
        self.base_url = f"http://127.0.0.1:{port}"

    def apply(self, models: dict[str, Any], extra: dict[str, Any] | None = None) -> float:
        fleet = {"ray": {"dashboard_url": self.dashboard}, "openai": {"port": self.port},
                 "defaults": {"engine": self.engine}, "models": models, **(extra or {})}
        (self.root / "fleet.yaml").write_text(json.dumps(fleet, indent=1))
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "reconciler", "apply", "--auto-approve"], cwd=self.root,
                           capture_output=True, text=True, timeout=BOUND_S)
        print(r.stdout[-1500:] + r.stderr[-3000:], file=sys.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"fleetctl apply failed ({r.returncode})")
        return time.monotonic() - t0

    def states(self) -> dict[str, str]:
        return model_states(self.base_url)

    def wait_state(self, model: str, state: str) -> None:
        deadline = time.monotonic() + BOUND_S
        while (now := self.states().get(model)) != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} never became {state} (last: {now})")
            time.sleep(0.1)

    def first_token_s(self, model: str) -> float:
        return first_token_s(self.base_url, time.monotonic(), model, drain=True)


def sleep_and_wake(fleet: Fleet, gpu: int, rounds: int, source: str) -> dict[str, Any]:
    before = used_gib(gpu)
    fleet.apply({"sleepy": {"source": source, "gpus": [gpu], "gpu_memory": 0.2, "idle_timeout": "3s"}})
    awake = [fleet.first_token_s("sleepy") for _ in range(5)]
    used_awake = used_gib(gpu)
    woken, used_asleep = [], []
    for _ in range(rounds):
        fleet.wait_state("sleepy", "asleep")
        time.sleep(0.5)  # NVML lags the free by a moment
        used_asleep.append(used_gib(gpu))
        woken.append(fleet.first_token_s("sleepy"))
        awake.append(fleet.first_token_s("sleepy"))
    held = statistics.median(used_asleep) - before
    if held > 0.5 * (used_awake - before):
        raise RuntimeError(f"sleep freed too little: {used_awake - before:.1f} GiB awake, {held:.1f} GiB asleep")
    return {"ttft_awake_s": statistics.median(awake), "ttft_from_asleep_s": statistics.median(woken),
            "wake_extra_s": statistics.median(woken) - statistics.median(awake),
            "engine_gib_awake": used_awake - before, "engine_gib_asleep": held,
            "rounds_ttft_from_asleep_s": woken}


def swaps(fleet: Fleet, gpu: int, rounds: int, source: str) -> dict[str, Any]:
    member = {"source": source, "gpus": [gpu], "gpu_memory": 0.6, "idle_timeout": "1h", "swap_group": "pair"}
    fleet.apply({"sleepy": {"source": source, "gpus": [gpu], "gpu_memory": 0.2, "idle_timeout": "3s"},
                 "swap-a": member, "swap-b": member}, {"swap_groups": {"pair": {"awake": 1}}})
    first = {m: fleet.first_token_s(m) for m in ("swap-a", "swap-b")}  # each loads once (or wakes)
    timed: list[float] = []
    rested: list[float] = []
    used: list[float] = []
    # Right after the other member answered (put away once the routers count nothing in flight), and
    # as a person switching models would, the other member idle for a while first.
    for pause_s, into in ((0.0, timed), (REST_S, rested)):
        for i in range(2 * rounds):
            model = ("swap-a", "swap-b")[i % 2]
            time.sleep(pause_s)
            into.append(fleet.first_token_s(model))
            states = fleet.states()
            used.append(used_gib(gpu))
            if states.get(model) != "awake" or [states.get(m) for m in ("swap-a", "swap-b")].count("awake") != 1:
                raise RuntimeError(f"after a request to {model}: {states}")
    return {"first_requests_s": first, "swap_ttft_s": statistics.median(timed), "rounds_swap_ttft_s": timed,
            "swap_after_idle_ttft_s": statistics.median(rested), "rounds_swap_after_idle_ttft_s": rested,
            "idle_s": REST_S, "gpu_used_gib_max": max(used)}


def run(model: Path | None, gpu: int, rounds: int, engine: dict[str, Any], as_json: bool) -> int:
    from reconciler.fleetfiles.inventory import nvml_gpus
    from reconciler.live import cluster

    work = Path(tempfile.mkdtemp(prefix="bench-lifecycle-gpu-"))
    source = str(model or build_tiny_llama(work / "tiny-llama"))
    head = cluster.start_head(num_cpus=8, resources=cluster.gpu_resources(len(nvml_gpus())))
    fleet = Fleet(work, head.dashboard_url, free_port(), {"max_model_len": 1024, **engine})
    result: dict[str, Any] = {"card": card(gpu), "model": source}
    try:
        result["sleep"] = sleep_and_wake(fleet, gpu, rounds, source)
        print(json.dumps(result["sleep"]), file=sys.stderr)
        result["swap"] = swaps(fleet, gpu, rounds, source)
    finally:
        cluster.stop_head(head)
    print(json.dumps(result, indent=2) if as_json else render(result))
    return 0


def render(r: dict[str, Any]) -> str:
    s, w = r["sleep"], r["swap"]
    return "\n".join([
        f"card: {r['card']}",
        f"first token, awake            {s['ttft_awake_s'] * 1000:8.0f} ms",
        f"first token, from asleep      {s['ttft_from_asleep_s'] * 1000:8.0f} ms"
        f"  (extra {s['wake_extra_s'] * 1000:.0f} ms)",
        f"engine's GPU memory awake     {s['engine_gib_awake']:8.1f} GiB",
        f"engine's GPU memory asleep    {s['engine_gib_asleep']:8.1f} GiB  (what a sleeping engine still holds)",
        f"one swap, first token         {w['swap_ttft_s'] * 1000:8.0f} ms  (median of {len(w['rounds_swap_ttft_s'])}, "
        "right after the other member answered)",
        f"one swap, first token         {w['swap_after_idle_ttft_s'] * 1000:8.0f} ms  (the other member idle "
        f"{w['idle_s']:.0f} s first)",
    ])
