"""Render the daemon's status page from made-up data and screenshot it (docs/status-page.png).

For the README when no real fleet runs here: the fleet is examples/3x24gb, every number (rates, TTFT,
events, NVML readings) is invented. The serve test tests/daemon/test_live_fleet.py takes the real one
(FLEET_STATUS_SCREENSHOT=path). Needs playwright and a Chromium (CHROMIUM, default /usr/bin/chromium).

    python scripts/status_page_preview.py [out.png]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from reconciler.desired.pipeline import desired_state
from reconciler.loop import status_api

ROOT = Path(__file__).resolve().parent.parent


def main(out: Path) -> None:
    now = time.time()
    placed = desired_state(ROOT / "examples" / "3x24gb").placed
    placed = dataclasses.replace(placed, inventory=dataclasses.replace(placed.inventory, source="nvml"))
    status_api.nvml_memory = lambda: {0: (23.1e9, 25.8e9), 1: (23.0e9, 25.8e9), 2: (4.9e9, 25.8e9)}  # made up
    rows = [
        ("qwen2.5-14b-instruct", "generate", "awake", now - 754, "0,1", False),
        ("llama-3.1-8b-instruct", "generate", "asleep", now - 95, "2", False),
        ("bge-m3", "embed", "awake", now - 8110, "2", True),
    ]
    models = [{"model": m, "kind": "engine", "task": t, "state": "ready", "since": None, "health": "Healthy",
               "sync": "Synced", "replicas": "1/1", "gpus": g, "always_on": a, "message": ""}
              for m, t, _s, _since, g, a in rows]
    models.append({"model": "router", "kind": "router", "task": None, "state": "ready", "since": None,
                   "health": "Healthy", "sync": "Synced", "replicas": "2/2", "gpus": "-", "message": ""})
    doc = {"health": "Healthy", "in_sync": True, "models": models, "daemon": {
        "path": "/srv/fleet", "revision": {"commit": "3f9c2a17be", "dirty": False}, "reconciles": 412,
        "drift_corrections": 1, "last_reconcile": {"started_at": now - 12, "result": "synced"},
        "last_change": {"started_at": now - 5400, "result": "applied", "seconds": 71.4,
                        "changes": [{"action": "update", "model": "llama-3.1-8b-instruct",
                                     "reasons": ["idle_timeout 15m -> 10m (in place)"]}]}}}
    motion = {
        "qwen2.5-14b-instruct": (4.2, 1510.0, 0.061, 7), "llama-3.1-8b-instruct": (0.0, 0.0, 0.142, 0),
        "bge-m3": (11.5, 2960.0, 0.009, 1)}
    state = {r[0]: (r[2], r[3]) for r in rows}
    pulse = {"at": now - 1, "models": {
        m: {"requests_per_s": rps, "tokens_per_s": tps, "ttft_p50_s": p50, "ttft_p50_window": True,
            "in_flight": fl, "state": state[m][0], "since": state[m][1]}
        for m, (rps, tps, p50, fl) in motion.items()},
        "events": [{"model": m, "event": e, "seconds": s, "at": now - ago} for m, e, s, ago in (
            ("llama-3.1-8b-instruct", "sleep", 0.41, 95), ("qwen2.5-14b-instruct", "wake", 0.298, 754),
            ("llama-3.1-8b-instruct", "wake", 0.305, 1190), ("llama-3.1-8b-instruct", "sleep", 0.39, 1710),
            ("qwen2.5-14b-instruct", "sleep", 0.52, 2460), ("llama-3.1-8b-instruct", "load", 48.7, 5460),
            ("qwen2.5-14b-instruct", "load", 83.2, 8020), ("bge-m3", "load", 21.9, 8110))]}
    html = status_api.render_page(doc, placed, pulse)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_content(html)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "status-page.png")
