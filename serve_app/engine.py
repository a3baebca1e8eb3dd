"""The model engine: one Serve deployment (``engine``) per model.

Each replica runs vLLM's own OpenAI server as a child process (under ``serve_app.guard``, so no
vLLM process outlives the replica, even a SIGKILLed one), waits for its ``/health``, reports the
child's health to Serve, and hands the router the child's URL so requests go straight to vLLM.
It serves no requests itself: the router relays them.

import_path ``serve_app.engine:app``; the args are the ``args`` of docs/contracts.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from ray import serve
from ray.serve import Application

from serve_app import endpoints, model_source
from serve_app.contract import ENGINE_DEPLOYMENT, ENGINE_START_ATTEMPTS, engine_log_name

logger = logging.getLogger("ray.serve")

# vLLM binds to loopback only: it has no auth of its own on most routes. The router therefore
# relays to engines on its own node (a single-box fleet); see the report for multi-node.
HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
# The guard's SIGTERM grace for vLLM; below the contract's graceful_shutdown_timeout_s (20 s).
STOP_GRACE_S = 10.0
ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# Default runner per fleet task, added unless engine_argv names one (vLLM 0.32 has no --task).
TASK_ARGV = {"generate": ["--runner", "generate"], "embed": ["--runner", "pooling"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _log_dir() -> Path:
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
    return {**os.environ, **resolved, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}


def _expand(value: str) -> str:
    """``"${NAME}"`` (how fleet files pass secrets such as HF_TOKEN) takes NAME from this replica's
    environment, which Ray workers inherit from their node; unset means empty, as in a shell."""
    match = ENV_REF.match(value)
    return os.environ.get(match.group(1), "") if match else value


def vllm_argv(model: str, resolved: model_source.Resolved, task: str, engine_argv: list[str], port: int) -> list[str]:
    """The vLLM OpenAI server command line (an argv list; never a shell)."""
    task_argv = [] if "--runner" in engine_argv else TASK_ARGV.get(task, [])
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        *resolved.argv(),
        "--served-model-name", model,
        "--host", HOST,
        "--port", str(port),
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


async def _run_guarded(argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> int:
    """Run a helper command to completion under the guard; its exit code."""
    proc = _guarded(argv, env, log_path)
    try:
        deadline = time.monotonic() + timeout_s
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


@serve.deployment(name=ENGINE_DEPLOYMENT, max_constructor_retry_count=ENGINE_START_ATTEMPTS)
class Engine:
    """One vLLM OpenAI server, as a guarded child process of this replica."""

    async def __init__(
        self,
        model: str,
        source: str,
        task: str = "generate",
        engine_argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        gpus: list[int] | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        self._model = model
        self._proc: subprocess.Popen[bytes] | None = None
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._registered = False
        self.idle_timeout_s: float | None = None
        self.always_on = False
        self._log_path = _log_dir() / engine_log_name(model, os.getpid())
        deadline = time.monotonic() + start_timeout_s
        environ = child_env(env or {}, gpus or [])
        resolved = await self._resolve(source, environ, start_timeout_s)
        port = _free_port()
        self._url = f"http://{HOST}:{port}"
        argv = vllm_argv(model, resolved, task, list(engine_argv or []), port)
        logger.info("starting vLLM for %s: %s (log: %s)", model, argv, self._log_path)
        self._proc = _guarded(argv, environ, self._log_path)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        try:
            await self._wait_ready(deadline)
        except BaseException:
            self._shutdown()
            raise
        await self._register()
        logger.info("vLLM for %s is ready at %s (guard pid %d)", model, self._url, self._proc.pid)

    async def _register(self) -> None:
        """Tell the routers where this replica's vLLM listens (and that it still does)."""
        await asyncio.to_thread(endpoints.register, self._model, self._replica, self._url)
        self._registered = True

    async def _resolve(self, source: str, environ: dict[str, str], timeout_s: float) -> model_source.Resolved:
        try:
            return model_source.resolve(source)
        except model_source.NotPrepared:
            pass
        # The conversion imports torch/transformers: keep that out of the replica's memory.
        argv = [sys.executable, "-m", "serve_app.model_source", source]
        code = await _run_guarded(argv, environ, self._log_path, timeout_s)
        if code != 0:
            raise RuntimeError(f"preparing {source!r} failed (exit {code}):\n{log_tail(self._log_path)}")
        return model_source.resolve(source)

    async def _wait_ready(self, deadline: float) -> None:
        while True:
            self._raise_if_exited("while starting")
            try:
                if (await self._client.get(self._url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM for {self._model!r} was not healthy within start_timeout_s; "
                    f"last lines of its log ({self._log_path}):\n{log_tail(self._log_path)}"
                )
            await asyncio.sleep(0.5)

    def _raise_if_exited(self, when: str) -> None:
        code = self._proc.poll() if self._proc else -1
        if code is not None:
            raise RuntimeError(
                f"vLLM for {self._model!r} exited with code {code} {when}; "
                f"last lines of its log ({self._log_path}):\n{log_tail(self._log_path)}"
            )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """In-place settings; the idle-unload lifecycle that reads them comes later."""
        timeout = user_config.get("idle_timeout_s")
        self.idle_timeout_s = None if timeout is None else float(timeout)
        self.always_on = bool(user_config.get("always_on", False))

    async def check_health(self) -> None:
        """Unhealthy when the child died or its /health fails: Serve then replaces us."""
        self._raise_if_exited("")
        response = await self._client.get(self._url + "/health")
        if response.status_code != 200:
            raise RuntimeError(f"vLLM /health answered {response.status_code}: {response.text[:200]}")
        await self._register()  # the refresh that keeps the registration from going stale

    async def endpoint(self) -> str:
        """The child's base URL, for the router to relay to; raises when the child is dead.

        Routers learn every replica's URL from ``serve_app.endpoints``; they call this when they
        know none for the model (it goes to a live replica, and is where a sleeping one wakes).
        """
        self._raise_if_exited("")
        return self._url

    async def info(self) -> dict[str, Any]:
        """What operators and tests look at: URL, pids, log file, in-place settings."""
        return {
            "url": self._url,
            "replica_pid": os.getpid(),
            "guard_pid": self._proc.pid if self._proc else None,
            "alive": bool(self._proc and self._proc.poll() is None),
            "log_path": str(self._log_path),
            "idle_timeout_s": self.idle_timeout_s,
            "always_on": self.always_on,
        }

    def _shutdown(self) -> None:
        if getattr(self, "_registered", False):
            self._registered = False
            with contextlib.suppress(Exception):  # the GCS may be gone with the cluster
                endpoints.unregister(self._model, self._replica)
        proc = getattr(self, "_proc", None)  # __del__ may run on a half-built instance
        if proc is not None:
            _stop(proc)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown; the guard covers every other way to die.
        self._shutdown()


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: the contract's engine ``args`` become constructor args."""
    return Engine.bind(**args)
