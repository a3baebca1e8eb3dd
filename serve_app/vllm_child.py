"""The vLLM child an engine replica supervises: vLLM's own OpenAI server as a guarded process.

Its command line (``vllm_argv``), environment (``child_env``: pinned to its GPUs, secrets expanded),
where it listens (loopback on the head, the node's address elsewhere, behind the fleet's engine
token), its log file, and the process itself: start, health, stop, sleep and wake (vLLM's dev
endpoints) and the activity counters the idle rule reads. ``serve_app.guard`` makes sure no vLLM
process outlives the replica; the replica (serve_app/engine.py) decides when to do what.
"""

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve_app import lifecycle, model_source, proctable
from serve_app.contract import (
    ENGINE_MIDDLEWARE,
    ENGINE_TOKEN_ENV,
    ENGINE_TOKEN_HEADER,
    HEAD_NODE_RESOURCE,
    RUNNER_FLAG,
)
from serve_app.contract import deadline as contract_deadline

logger = logging.getLogger("ray.serve")

# On the head, where the routers run, vLLM binds loopback only. On any other node it binds the
# node's address so the routers can reach it, and then requires the fleet's engine token on every
# path (serve_app.engine_auth), since vLLM's own --api-key guards /v1 only.
HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
# The guard's SIGTERM grace for vLLM; below the contract's graceful_shutdown_timeout_s (20 s).
STOP_GRACE_S = 10.0
ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# A swap member's unload waits this long at most for vLLM's whole process tree to be gone, so the
# member loading next finds the memory free.
TREE_GONE_S = 15.0


def _free_port(host: str = HOST) -> int:
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(_family(host)) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen_host() -> str:
    """Where this replica's vLLM listens: loopback on the head (the routers' node), else the
    address Ray knows this node by, which the routers on the head can reach."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None or HEAD_NODE_RESOURCE in (node.get("Resources") or {}):
        return HOST
    return str(node.get("NodeManagerAddress") or ray.util.get_node_ip_address())


def log_dir() -> Path:
    """Ray's log folder of this node, so the dashboard's log API serves vLLM's log to `fleetctl`
    (apply's progress shows what a starting engine is doing). FLEET_LOG_DIR overrides it."""
    explicit = os.environ.get("FLEET_LOG_DIR")
    path = Path(explicit) if explicit else _ray_logs_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ray_logs_dir() -> Path:
    try:
        from ray._private import worker  # no public API names the node's log folder

        return Path(worker._global_node.get_logs_dir_path())
    except Exception:  # outside a Ray worker (unit use): a temp folder does
        return Path(tempfile.gettempdir()) / "vllm-fleet-logs"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file (vLLM's stdout+stderr), or a note when it is unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def child_env(env: dict[str, str], gpus: list[int]) -> dict[str, str]:
    """The child's environment, pinned to exactly its GPUs.

    Ray 2.60 no longer sets CUDA_VISIBLE_DEVICES for an actor that asks for no GPUs (num_gpus
    0 or unset; see ray/_private/accelerators/accelerator.py and utils.set_visible_accelerator_ids,
    ray issue #54868; RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 restores the old "" override). Our
    replicas ask for fleet_gpu_<i> custom resources with num_gpus 0, so they inherit the raylet's
    environment and would see every GPU. We therefore always set it: the model's GPU indices,
    or "" for a CPU model so it can never touch a GPU.
    """
    resolved = {k: _expand(v) for k, v in env.items()}
    pci = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # CUDA numbers the cards as NVML (the placement) does
    return {**os.environ, **pci, **resolved, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}


def _expand(value: str) -> str:
    """``"${NAME}"`` (how fleet files pass secrets such as HF_TOKEN) takes NAME from this replica's
    environment, which Ray workers inherit from their node; unset means empty, as in a shell."""
    match = ENV_REF.match(value)
    return os.environ.get(match.group(1), "") if match else value


def vllm_argv(model: str, resolved: model_source.Resolved, runner: str, engine_argv: list[str], port: int,
              host: str = HOST) -> list[str]:
    """The vLLM OpenAI server command line (an argv list; never a shell). Off loopback, every path
    needs the fleet's engine token (the middleware reads it from the environment, not argv)."""
    # the runner comes with engine_argv when the reconciler compiled it; a hand-written argv may lack it
    task_argv = [] if RUNNER_FLAG in engine_argv else [RUNNER_FLAG, runner]
    guard = [] if host == HOST else ["--middleware", ENGINE_MIDDLEWARE]
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *resolved.argv(),
        "--served-model-name", model,
        "--host", host,
        "--port", str(port),
        *guard,
        "--enable-server-load-tracking",  # GET /load: requests in flight, which the idle rule reads
        # the replica's own polls (vLLM >= 0.16); relayed requests are still logged
        "--disable-access-log-for-endpoints", "/health,/load,/metrics",
        *task_argv,
        *engine_argv,
    ]  # fmt: skip


def _guarded(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    # A new session: the guard leads its own process group, which it kills wholesale.
    cmd = [sys.executable, "-m", "serve_app.guard", "--grace-s", str(STOP_GRACE_S), "--", *argv]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


async def _run_guarded(argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float | None) -> int:
    """Run a helper command to completion under the guard; its exit code."""
    proc = _guarded(argv, env, log_path)
    try:
        deadline = contract_deadline(time.monotonic(), timeout_s)
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv[3:]} did not finish in {timeout_s:.0f} s")
            await asyncio.sleep(0.5)
        return proc.returncode
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask the guard to stop its group; SIGKILL the group (it leads it) if that takes too long."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()  # the guard stops vLLM (SIGTERM, grace, then SIGKILL for the group)
        proc.wait(STOP_GRACE_S + 5.0)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()



class Child:
    """One model's vLLM server process (at most one at a time), where it listens and its log.

    ``start`` / ``stop`` change the process; the rest only look at it or talk to it over HTTP.
    """

    def __init__(self, model: str, environ: dict[str, str], log_path: Path, host: str, token: str) -> None:
        self.model = model
        self.environ = environ
        self.log_path = log_path
        self.host = host
        self.port = _free_port(host)
        self.url = base_url(host, self.port)
        # The token goes to vLLM by environment only when it listens on the network (not loopback).
        if host != HOST:
            self.environ[ENGINE_TOKEN_ENV] = token
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0),
                                        headers={ENGINE_TOKEN_HEADER: token})
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_guard_pid: int | None = None  # the latest child's, kept after it stops

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def prepare(self, source: str, timeout_s: float | None) -> model_source.Resolved:
        """The model's files for vLLM: resolved at once, or prepared first (a GGUF converted...)."""
        try:
            return model_source.resolve(source)
        except model_source.NotPrepared:
            pass
        # The conversion imports torch/transformers: keep that out of the replica's memory.
        argv = [sys.executable, "-m", "serve_app.model_source", source]
        code = await _run_guarded(argv, self.environ, self.log_path, timeout_s)
        if code != 0:
            raise RuntimeError(f"preparing {source!r} failed (exit {code}):\n{log_tail(self.log_path)}")
        return model_source.resolve(source)

    def argv(self, resolved: model_source.Resolved, runner: str, engine_argv: list[str]) -> list[str]:
        """The command line for a start now: the old port when still free (routers' cached URL stays good)."""
        if not _port_free(self.port, self.host):
            self.port = _free_port(self.host)
            self.url = base_url(self.host, self.port)
        return vllm_argv(self.model, resolved, runner, engine_argv, self.port, self.host)

    def start(self, argv: list[str]) -> None:
        logger.info("starting vLLM for %s: %s (log: %s)", self.model, argv, self.log_path)
        self.proc = _guarded(argv, self.environ, self.log_path)
        self.last_guard_pid = self.proc.pid

    async def wait_ready(self, deadline: float) -> None:
        """Until its /health answers 200; raises when it exits first or ``deadline`` passes."""
        while True:
            self.raise_if_exited("while starting")
            try:
                if (await self.client.get(self.url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM for {self.model!r} was not healthy within start_timeout_s; "
                    f"last lines of its log ({self.log_path}):\n{log_tail(self.log_path)}"
                )
            await asyncio.sleep(0.5)

    def raise_if_exited(self, when: str) -> None:
        code = self.proc.poll() if self.proc else -1
        if code is not None:
            raise RuntimeError(
                f"vLLM for {self.model!r} exited with code {code} {when}; "
                f"last lines of its log ({self.log_path}):\n{log_tail(self.log_path)}"
            )

    async def check_health(self) -> None:
        """Raises when the process exited or its /health does not answer 200."""
        self.raise_if_exited("")
        response = await self.client.get(self.url + "/health")
        if response.status_code != 200:
            raise RuntimeError(f"vLLM /health answered {response.status_code}: {response.text[:200]}")

    def stop(self, wait_tree: bool = False) -> None:
        """Stop the process (blocking, up to the guard's grace); ``wait_tree``: until its whole
        process tree is gone too, so the next engine on its GPUs finds the memory free."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop(proc)
            if wait_tree:
                deadline = time.monotonic() + TREE_GONE_S
                while proctable.session_members(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.1)

    async def sleep(self) -> None:
        """vLLM sleep mode level 1: weights to host RAM, GPU memory freed. Raises httpx.HTTPError."""
        # mode=wait: a request that slipped in since the last look finishes first (newer vLLM; older ignore it)
        response = await self.client.post(self.url + "/sleep", params={"level": 1, "mode": "wait"}, timeout=120.0)
        response.raise_for_status()

    async def wake(self) -> None:
        response = await self.client.post(self.url + "/wake_up", timeout=120.0)
        response.raise_for_status()

    async def activity(self) -> tuple[int, float]:
        """Requests in flight (the larger of /load and the running/queued gauges) and the total
        finished so far (NaN when /metrics does not answer)."""
        load = await self.client.get(self.url + "/load")
        metrics = await self.client.get(self.url + "/metrics")
        served = int(load.json().get("server_load", 0)) if load.status_code == 200 else 0
        running = lifecycle.counter_total(metrics.text, lifecycle.BUSY_GAUGES) if metrics.status_code == 200 else 0
        finished = lifecycle.counter_total(metrics.text) if metrics.status_code == 200 else math.nan
        return max(served, int(running)), finished
