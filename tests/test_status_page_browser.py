"""The status page refreshes itself in a real headless Chromium: a change of the daemon's pulse shows
on the open page (never reloaded) within its polling interval. The daemon here runs no pass and
reads no endpoint; its pulse is set by the test (the real fleet's version: tests/daemon/test_live_fleet.py)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from reconciler.live.cluster import free_port
from reconciler.loop.daemon import Daemon
from reconciler.loop.pulse import PULSE_S
from reconciler.loop.status_api import make_app

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium on this machine")

ROW = {"model": "chat", "kind": "engine", "task": "generate", "state": "ready", "since": None, "health": "Healthy",
       "sync": "Synced", "replicas": "1/1", "gpus": "cpu", "message": ""}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    daemon = Daemon(tmp_path)
    daemon._set(status={"format_version": "2", "health": "Healthy", "in_sync": True, "models": [ROW]})
    motion: dict[str, Any] = {"at": time.time(), "models": {}, "events": []}
    daemon.pulse = lambda: motion  # type: ignore[method-assign]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(daemon), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", motion
    server.should_exit = True
    thread.join(10)


def test_the_open_page_shows_new_motion_within_its_refresh(served: tuple[str, dict[str, Any]]) -> None:
    from playwright.sync_api import sync_playwright

    url, motion = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            cell = "#models tr[data-model='chat'] td.rps"
            assert page.inner_text(cell).strip() == "-"
            motion["models"] = {"chat": {"requests_per_s": 3.5, "tokens_per_s": 420.0, "ttft_p50_s": 0.05,
                                         "in_flight": 2, "state": "awake", "since": time.time() - 30}}
            motion["events"] = [{"model": "chat", "event": "wake", "seconds": 0.3, "at": time.time()}]
            changed = time.monotonic()
            page.wait_for_function(f"document.querySelector(\"{cell}\").innerText.trim() == '3.5'",
                                   timeout=(PULSE_S + 3) * 1000)
            seen_after = time.monotonic() - changed
            assert "woke in 300 ms" in page.inner_text("#events")
            assert page.inner_text("#models tr[data-model='chat'] td.state").startswith("awake")
        finally:
            browser.close()
    assert seen_after <= PULSE_S + 3
