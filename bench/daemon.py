"""How fast the live fleet reacts: file save → first PUT, a hand-deleted app → restored, and the
status API under 50 concurrent clients. Runs a real Ray head and `fleetctl daemon` on a fleet with
no engines (the router alone), so what is timed is the daemon and Serve, not a vLLM start.

    python bench/daemon.py [--edits 20] [--deletes 5] [--clients 50] [--requests 20] [--while-starting] [--json]

Goals: save → first PUT ≤ 1 s (p50 and max); restored ≤ resync + 1 s; API p99 reported.
``--while-starting`` adds the never-blind case: a real vLLM engine (a tiny random Llama on the CPU)
starting while edits to the router are saved — each edit must reach Serve as fast as with nothing
starting (before the reconcile step stopped waiting on engines, an edit waited out the whole start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconciler.live import cluster  # noqa: E402
from reconciler.live import serve_state as live_mod  # noqa: E402

RESYNC_S = 5


def fleet_text(dashboard: str, port: int, api: int, load_timeout: int, model: Path | None = None) -> str:
    models = (f"models:\n  starting:\n    source: {model}\n"
              "    engine: {dtype: float32, enforce_eager: true, max_model_len: 256}\n"
              "    env: {VLLM_CPU_KVCACHE_SPACE: \"1\"}\n") if model else "models: {}\n"
    return (f"ray:\n  dashboard_url: {dashboard}\nopenai:\n  port: {port}\n  load_timeout: {load_timeout}s\n"
            f"daemon:\n  port: {api}\n  resync: {RESYNC_S}s\n{models}")


def save(path: Path, text: str) -> float:
    """An editor's save (temp file renamed over); returns when it happened (time.time())."""
    tmp = path.with_name(".fleet.yaml.tmp")
    tmp.write_text(text)
    at = time.time()
    os.replace(tmp, path)
    return at


def wait_for(check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except (httpx.HTTPError, KeyError, TypeError):
            got = None
        if got:
            return got
        time.sleep(0.02)
    raise TimeoutError("timed out")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def api_load(url: str, clients: int, requests: int) -> list[float]:
    """``clients`` concurrent keep-alive clients, ``requests`` each. aiohttp: an httpx client
    on 2 cores was itself the bottleneck (curl saw 3.7 ms per request where httpx saw 150)."""
    import aiohttp

    lat: list[float] = []

    async def one(session: aiohttp.ClientSession) -> None:
        for _ in range(requests):
            t = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
                r.raise_for_status()
            lat.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(one(session) for _ in range(clients)))
    return lat


def while_starting(path: Path, head: cluster.Head, port: int, api: int, status: str, edits: int) -> dict[str, Any]:
    """Add a model (a real vLLM start, a minute on a CPU), then save router edits while it starts."""
    from tests.fixtures.tiny_llama import tiny_llama_path

    model = tiny_llama_path()
    save(path, fleet_text(head.dashboard_url, port, api, 700, model))
    wait_for(lambda: "starting" in live_mod.read_live_state(head.dashboard_url).apps, 120)
    lat, starting_at_put = [], 0
    for i in range(edits):
        saved = save(path, fleet_text(head.dashboard_url, port, api, 701 + i, model))
        last = wait_for(lambda s=saved: (c := httpx.get(status).json()["daemon"]["last_change"])
                        and (c.get("first_put_at") or 0) > s and c)
        lat.append(last["first_put_at"] - saved)
        app = live_mod.read_live_state(head.dashboard_url).apps.get("starting")
        starting_at_put += app is not None and app.status != "RUNNING"
        time.sleep(0.3)
    wait_for(lambda: live_mod.read_live_state(head.dashboard_url).apps["starting"].status == "RUNNING", 600)
    return {"p50": statistics.median(lat), "max": max(lat), "n": len(lat), "starting_at_put": starting_at_put}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--deletes", type=int, default=5)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--while-starting", action="store_true",
                    help="also time edits saved while a real vLLM engine starts (a tiny Llama, ~1 min on a CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-daemon-"))
    head = cluster.start_head(num_cpus=2, resources={}, object_store_bytes=128 * 1024**2)
    port, api = cluster.free_port(), cluster.free_port()
    path = work / "fleet.yaml"
    save(path, fleet_text(head.dashboard_url, port, api, 600))
    env = {**os.environ, "FLEET_LOCK_DIR": str(work / "locks")}
    (work / "locks").mkdir()
    log = open(work / "daemon.log", "ab")  # noqa: SIM115
    daemon = subprocess.Popen([sys.executable, "-m", "reconciler", "daemon", str(work)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    status = f"http://127.0.0.1:{api}/status"
    out: dict[str, Any] = {}
    try:
        wait_for(lambda: httpx.get(status).json()["in_sync"], 300)
        # 1. save -> first PUT
        put_lat = []
        for i in range(args.edits):
            saved = save(path, fleet_text(head.dashboard_url, port, api, 601 + i))
            last = wait_for(lambda s=saved: (c := httpx.get(status).json()["daemon"]["last_change"])
                            and (c.get("first_put_at") or 0) > s and c)
            put_lat.append(last["first_put_at"] - saved)
            time.sleep(0.3)
        out["save_to_put_s"] = {"p50": statistics.median(put_lat), "max": max(put_lat), "n": len(put_lat)}
        # 2. the router app deleted by hand -> PUT again -> RUNNING again
        re_put, running = [], []
        for _ in range(args.deletes):
            state = live_mod.read_live_state(head.dashboard_url)
            body = {**dict(state.globals), "applications": [a.config for n, a in state.apps.items() if n != "router"]}
            with live_mod.make_client(head.dashboard_url) as c:
                c.put(live_mod.APPLICATIONS_PATH, json=body).raise_for_status()
            gone = time.time()
            last = wait_for(lambda g=gone: (c := httpx.get(status).json()["daemon"]["last_change"])
                            and (c.get("first_put_at") or 0) > g and c, 180)
            re_put.append(last["first_put_at"] - gone)
            wait_for(lambda: (a := live_mod.read_live_state(head.dashboard_url).apps.get("router"))
                     and a.status == "RUNNING", 120)
            running.append(time.time() - gone)
        out["deleted_to_put_s"] = {"p50": statistics.median(re_put), "max": max(re_put), "resync_s": RESYNC_S}
        out["deleted_to_running_s"] = {"p50": statistics.median(running), "max": max(running)}
        # 3. edits while an engine starts (the daemon must not wait on it)
        if args.while_starting:
            out["while_starting"] = while_starting(path, head, port, api, status, args.edits // 2 or 1)
        # 4. status API under load
        lat = asyncio.run(api_load(status, args.clients, args.requests))
        out["status_api_ms"] = {"clients": args.clients, "requests": len(lat), "p50": pct(lat, 0.5) * 1000,
                                "p99": pct(lat, 0.99) * 1000, "max": max(lat) * 1000}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        cluster.stop_head(head)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    s, d, r, a = out["save_to_put_s"], out["deleted_to_put_s"], out["deleted_to_running_s"], out["status_api_ms"]
    print(f"file save -> first PUT      p50 {s['p50']:.3f} s   max {s['max']:.3f} s   ({s['n']} edits; goal <= 1 s)")
    print(f"app deleted -> PUT again    p50 {d['p50']:.2f} s   max {d['max']:.2f} s   "
          f"(resync {RESYNC_S} s; goal <= {RESYNC_S + 1} s)")
    print(f"app deleted -> RUNNING      p50 {r['p50']:.2f} s   max {r['max']:.2f} s")
    if "while_starting" in out:
        w = out["while_starting"]
        print(f"save -> PUT, engine starting p50 {w['p50']:.3f} s   max {w['max']:.3f} s   ({w['n']} edits, "
              f"{w['starting_at_put']} of them while the engine was still starting; goal <= 1 s)")
    print(f"GET /status, {a['clients']} clients  p50 {a['p50']:.1f} ms   p99 {a['p99']:.1f} ms   max {a['max']:.1f} ms "
          f"({a['requests']} requests)")


if __name__ == "__main__":
    main()
