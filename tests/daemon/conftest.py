"""A running `fleetctl daemon` against a Ray head of its own, for the live-fleet scenarios.

The daemon is started as a user would (`python -m reconciler daemon FOLDER`), with a secret API
key and an HF_TOKEN in its environment so every response can be searched for them. The Ray head
can be stopped and started again on the same ports (the restart scenario).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.live import cluster
from serve_app.contract import ENGINE_START_ATTEMPTS_ENV
from tests.serve_apply.helpers import Fleet

# Not real secrets: values the tests look for in every output, to prove none is shown.
SECRETS = {"FLEET_TEST_SECRET_KEY": "sk-fleet-test-0123456789abcdef", "HF_TOKEN": "hf_testtoken0123456789abcdef"}
RESYNC_S = 8
# Engine starts Serve tries before it gives up (3 by default): 2 still shows a bound (not 1 start,
# not a loop) and spares a failed vLLM start in the test of a model that cannot load.
START_ATTEMPTS = 2
# the router reads the API key from its node's environment, the engine HF_TOKEN
HEAD_ENV = {**SECRETS, ENGINE_START_ATTEMPTS_ENV: str(START_ATTEMPTS)}


@dataclass
class Live:
    """The fleet folder, the head it points to, and the daemon watching it."""

    fleet: Fleet
    api: str
    head: cluster.Head
    ports: tuple[int, int]  # GCS, dashboard: kept across a head restart
    daemon: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    def status(self) -> dict[str, Any]:
        return httpx.get(self.api + "/status", timeout=10).json()

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status()["models"] if m["model"] == name), None)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 900, every: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except (httpx.HTTPError, KeyError, ValueError) as e:
                last = e
            if last and not isinstance(last, Exception):
                return last
            time.sleep(every)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}\n--- daemon log ---\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start_daemon(self) -> None:
        env = {**self.fleet.env(), **SECRETS}
        out = open(self.log, "ab")  # noqa: SIM115 - the daemon keeps writing to it
        self.daemon = subprocess.Popen([sys.executable, "-m", "reconciler", "daemon", str(self.fleet.root)],
                                       env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait("the status API", lambda: httpx.get(self.api + "/healthz", timeout=2).status_code == 200, 60)

    def stop_daemon(self) -> int | None:
        if self.daemon is None:
            return None
        self.daemon.send_signal(signal.SIGTERM)
        try:
            return self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.daemon.pid, signal.SIGKILL)
            return self.daemon.wait(10)
        finally:
            self.daemon = None

    def restart_head(self) -> None:
        cluster.stop_head(self.head)
        self.head = start_head(*self.ports)


def start_head(gcs: int, dashboard: int, temp_dir: str | None = None) -> cluster.Head:
    return cluster.start_head(num_cpus=4, resources={"fleet_gpu_0": 1.0}, port=gcs, dashboard_port=dashboard,
                              object_store_bytes=256 * 1024**2, env=HEAD_ENV, temp_dir=temp_dir)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llama_path: Path) -> Iterator[Live]:
    ports = (cluster.free_port(), cluster.free_port())
    head = start_head(*ports)
    root = tmp_path_factory.mktemp("daemon-fleet")
    fleet = Fleet(root, head.dashboard_url, cluster.free_port(), tmp_path_factory.mktemp("locks"), tiny_llama_path)
    api_port = cluster.free_port()
    lv = Live(fleet, f"http://127.0.0.1:{api_port}", head, ports, log=root.parent / f"{root.name}-daemon.log")
    try:
        yield lv
    finally:
        lv.stop_daemon()
        cluster.stop_head(lv.head)


def daemon_section(api_port: int) -> str:
    return f"daemon:\n  port: {api_port}\n  resync: {RESYNC_S}s\n"
