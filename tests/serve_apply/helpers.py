"""Helpers for the plan/apply tests: write fleet files, run `fleetctl` as a subprocess, and read
replica ids and vLLM child pids. Restarts are judged by those, never by timestamps
(last_deployed_time_s moves on every PUT).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.live import serve_state as live
from serve_app.proctable import cmdline, descendants
from tests.fixtures.serve_api import TEST_ENGINE_ARGS, TEST_ENGINE_ENV

ENGINE_DEFAULTS = json.dumps({**TEST_ENGINE_ARGS, "max_model_len": 256})


@dataclass
class Fleet:
    """A fleet folder bound to one Ray head, and ways to drive fleetctl against it."""

    root: Path
    dashboard_url: str
    port: int
    lock_dir: Path
    model_dir: Path
    env_extra: dict[str, str | None] = field(default_factory=dict)  # for fleetctl; None removes a variable

    def write(self, models: dict[str, dict[str, Any]], extra: str = "") -> None:
        write_atomic(self.root / "fleet.yaml", self.text(models, extra))

    def text(self, models: dict[str, dict[str, Any]], extra: str = "") -> str:
        lines = [
            "ray:", f"  dashboard_url: {self.dashboard_url}",
            "openai:", "  host: 127.0.0.1", f"  port: {self.port}",
            "defaults:", "  idle_timeout: 15m", f"  engine: {ENGINE_DEFAULTS}",
            f"  env: {json.dumps(TEST_ENGINE_ENV)}",
            "models:",
        ]  # fmt: skip
        for name, fields in models.items():
            lines.append(f"  {name}:")
            lines.append(f"    source: {fields.get('source', self.model_dir)}")
            lines += [f"    {k}: {v}" for k, v in fields.items() if k != "source"]
        return "\n".join(lines) + "\n" + extra

    def fleetctl(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(fleetctl_argv(*args), cwd=self.root, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(fleetctl_argv(*args), cwd=self.root, env=self.env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "FLEET_LOCK_DIR": str(self.lock_dir), "NO_COLOR": "1"}
        for k, v in self.env_extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def live(self) -> live.LiveState:
        return live.read_live_state(self.dashboard_url)

    def put_by_hand(self, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        """Change Serve behind fleetctl's back, as a person with curl would: PUT the live config's
        applications as ``edit`` returns them (it gets copies), with the live globals."""
        state = self.live()
        apps = edit([copy.deepcopy(dict(a.config or {})) for a in state.apps.values()])
        body = {"proxy_location": "EveryNode", **dict(state.globals), "applications": apps}
        with live.make_client(self.dashboard_url) as c:
            assert c.put(live.APPLICATIONS_PATH, json=body).status_code == 200

    def remove_by_hand(self, app: str) -> None:
        """The live config without ``app``, PUT by hand."""
        self.put_by_hand(lambda apps: [a for a in apps if a["name"] != app])

    def set_idle_by_hand(self, app: str, seconds: float) -> None:
        """One app's idle_timeout changed on Serve by hand (an in-place field: no restart)."""

        def edit(apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
            for cfg in apps:
                if cfg["name"] == app:
                    cfg["deployments"][0]["user_config"]["idle_timeout_s"] = seconds
            return apps

        self.put_by_hand(edit)


def write_atomic(path: Path, text: str) -> None:
    """Write as editors save: a temp file renamed over the old one, so no reader sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fleetctl_argv(*args: str) -> list[str]:
    exe = shutil.which("fleetctl")
    return [exe, *args] if exe else [sys.executable, "-c", "from reconciler.cli.fleetctl import main; main()", *args]


def vllm_child_pids(replica_pid: int | None) -> set[int]:
    """The vLLM server processes under one replica (through its guard)."""
    if replica_pid is None:
        return set()
    return {pid for pid in descendants({replica_pid}) - {replica_pid}
            if "vllm.entrypoints.openai.api_server" in cmdline(pid)}


def fingerprint(state: live.LiveState) -> dict[str, Any]:
    """Per app: the running replica ids and the vLLM child pids. Equal means not restarted."""
    out = {}
    for name, app in state.apps.items():
        replicas = [r for d in app.deployments for r in d.replicas if r.state == "RUNNING"]
        out[name] = {"replicas": sorted(r.replica_id for r in replicas),
                     "children": sorted(p for r in replicas for p in vllm_child_pids(r.pid))}
    return out
