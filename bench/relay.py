"""Relay benchmark: how much does the fleet's data path cost against vLLM's own server?

One machine, one model, endpoints measured with the same load:

* ``direct`` -- vLLM's OpenAI server started directly (the baseline);
* ``fleet``  -- this project's endpoint: a Ray head started by ``reconciler.live.cluster.start_head``,
  then a Serve config with the router app and one engine app PUT to the dashboard REST API, as
  ``compile_serve_config`` shapes it (Serve's proxy off, the router's own servers on the port);
* ``rayllm`` -- Ray Serve LLM's ``ray.serve.llm:build_openai_app`` on a Ray head with Serve's
  HTTP proxy (route prefix ``/rayllm``), as a peer;
* ``legacy`` -- with ``--legacy-router IMPORT``: another router (e.g. an older serve_app/router.py
  copied to an importable module) behind Serve's HTTP proxy, on the head of ``rayllm``.

Load: streamed chat completions of exactly ``--tokens`` tokens (``ignore_eos``, ``min_tokens`` =
``max_tokens``), at each concurrency in ``--concurrency``. Rounds alternate between the targets
(A/B/C/A/B/C...) so drift on the box is shared. Each round has a fixed request count and a time cap.
Everything started is stopped at the end, by process id.

    python bench/relay.py                    # builds a tiny random Llama, runs all three targets
    python bench/relay.py --model DIR --targets direct,fleet --json
    python bench/relay.py --ray-env RAY_SERVE_ENABLE_HA_PROXY=1   # try a Serve knob
    python bench/relay.py --model DIR --gpu 0 --engine-argv "--dtype bfloat16 --max-model-len 1024 \
        --kv-cache-memory-bytes 8G" --concurrency 1,16,64,256 --client-procs 4 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from serve_app import proctable
from serve_app.contract import (
    ENGINE_DEPLOYMENT,
    ENGINE_IMPORT,
    ROUTER_APP,
    ROUTER_DEPLOYMENT,
    ROUTER_IMPORT,
    EngineArgs,
    EngineUserConfig,
    RouterArgs,
    RouterModel,
    RouterUserConfig,
)

MODEL_NAME = "bench-tiny"
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_ENGINE_ARGV = "--dtype float32 --enforce-eager --max-model-len 1024"
# Ray workers of the fleet path that --profile-dir samples with py-spy.
PROFILED = ("ray::ProxyActor", "ray::ServeReplica:router:router", "ray::HAProxyManager")
# The relay's own processes per target (Ray process titles), whose CPU is "relay CPU per token".
RELAY_TITLES = {
    "fleet": ("ray::ServeReplica:router:router",),
    "legacy": ("ray::ProxyActor", "ray::ServeReplica:router:router"),
    "rayllm": ("ray::ProxyActor", "ray::ServeReplica:rayllm:OpenAiIngress"),
}
COMPLETION_TOKENS = re.compile(r'"completion_tokens":\s*(\d+)')
NOT_STARTED: list[str] = []  # why a requested target is missing from the results


@dataclass(frozen=True)
class EngineSetup:
    """How every target runs vLLM: the same flags, environment and GPU for all."""

    argv: list[str]
    env: dict[str, str]
    gpu: int | None  # None: CPU

    def child_env(self) -> dict[str, str]:
        """Environment of a vLLM started by hand (direct)."""
        visible = "" if self.gpu is None else str(self.gpu)
        return {**os.environ, **self.env, "CUDA_VISIBLE_DEVICES": visible}

    def kwargs(self) -> dict[str, Any]:
        """The same flags as vLLM engine kwargs (for Ray Serve LLM): --a-b V -> a_b: V, --x -> x: True."""
        out: dict[str, Any] = {}
        i = 0
        while i < len(self.argv):
            key = self.argv[i].removeprefix("--").replace("-", "_")
            if i + 1 < len(self.argv) and not self.argv[i + 1].startswith("--"):
                out[key] = _typed(self.argv[i + 1])
                i += 2
            else:
                out[key] = True
                i += 1
        return out


def _typed(value: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

def build_tiny_llama(dest: Path) -> Path:
    """Write a random tiny Llama (head_dim 64, which the CPU attention kernel accepts) to ``dest``.

    The tokenizer is a byte-level BPE trained on the spot, with a plain chat template, so that
    /v1/chat/completions works. Generation is gibberish, which is all a relay benchmark needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [PROMPT, "user assistant system", "the quick brown fox jumps over the lazy dog"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(dest)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    return dest


# --------------------------------------------------------------------------------------------
# Processes and ports
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``proc`` (started with a new session), SIGKILL on timeout."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def wait_http_ok(url: str, timeout_s: float, alive: Any = None) -> None:
    """Poll ``url`` until it answers 200; ``alive()`` returning False aborts early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"process died while waiting for {url}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def busy_cpu_s() -> float:
    """Seconds of non-idle CPU time of the whole box so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds used so far by this process and all its live descendants (Ray, vLLM, ...)."""
    ours = proctable.descendants({os.getpid()})
    ticks = sum(p.cpu_ticks for p in proctable.processes() if p.pid in ours)
    return ticks / os.sysconf("SC_CLK_TCK")


def ray_worker_pids(session_id: int, titles: tuple[str, ...]) -> dict[str, int]:
    """Pids of our head's Ray workers whose process title starts with one of ``titles``."""
    from reconciler.live import cluster

    found: dict[str, int] = {}
    for pid in cluster.session_processes(session_id):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        for t in titles:
            if title.startswith(t) and t not in found:
                found[t] = pid
    return found


def relay_cpu_s(target: Any) -> float:
    """CPU seconds used so far by the target's relay processes (0 for direct)."""
    titles = RELAY_TITLES.get(str(target.name).split(":")[0], ())
    session = getattr(target, "session_id", 0)
    if not titles or not session:
        return 0.0
    from reconciler.live import cluster

    members = set(cluster.session_processes(session))
    ticks = 0
    for p in proctable.processes():
        if p.pid not in members:
            continue
        try:
            title = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(titles):
            ticks += p.cpu_ticks
    return ticks / os.sysconf("SC_CLK_TCK")


def start_profilers(pids: dict[str, int], seconds: float, out_dir: Path) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` (collapsed stacks, non-blocking) on each pid for ``seconds``."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found: no profile", file=sys.stderr)
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for title, pid in pids.items():
        name = title.replace("ray::", "").replace(":", "-")
        argv = [exe, "record", "--nonblocking", "--gil", "--format", "raw", "-r", "250", "-d", str(int(seconds)),
                "-p", str(pid), "-o", str(out_dir / f"{name}.txt")]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def wait_quiet(max_load: float, wait_s: float) -> float:
    """Wait (at most ``wait_s``) until the 1-minute load is below ``max_load``; return the load."""
    deadline = time.monotonic() + wait_s
    while load1() >= max_load and time.monotonic() < deadline:
        time.sleep(10)
    return load1()


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

class Target(Protocol):
    """An OpenAI endpoint under test."""

    name: str
    base_url: str  # ends before /v1
    model: str


@dataclass
class DirectVLLM:
    """vLLM's OpenAI server, started directly as a child process."""

    model_dir: Path
    log_dir: Path
    engine: EngineSetup
    name: str = "direct"
    model: str = MODEL_NAME
    base_url: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the server process (``wait`` waits for it)."""
        port = free_port()
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", self.model, "--host", "127.0.0.1", "--port", str(port),
                "--disable-uvicorn-access-log", *self.engine.argv]
        log = open(self.log_dir / "direct-vllm.log", "wb")  # noqa: SIM115 (lives with the process)
        self.proc = subprocess.Popen(argv, env=self.engine.child_env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.base_url = f"http://127.0.0.1:{port}"

    def wait(self, deadline: float) -> list[DirectVLLM]:
        """Wait for /health; return the endpoint."""
        proc = self.proc
        assert proc is not None
        wait_http_ok(f"{self.base_url}/health", deadline - time.monotonic(), alive=lambda: proc.poll() is None)
        print(f"{self.name} up", file=sys.stderr)
        return [self]

    def stop(self) -> None:
        """Stop the server's whole process group."""
        if self.proc is not None:
            stop_process_group(self.proc)


@dataclass
class ServeEndpoint:
    """An app on the shared Ray Serve instance (the fleet router, or Ray Serve LLM's app)."""

    name: str
    base_url: str
    model: str = MODEL_NAME
    session_id: int = 0  # the Ray head's process group: where its workers live


def engine_app(model_dir: Path, engine: EngineSetup, engine_options: dict[str, Any],
               split_gpus: list[int] | None = None) -> dict[str, Any]:
    """The fleet's engine application for the model, in the shape of docs/contracts.md; with
    ``split_gpus``, one replica on each of those GPUs (``gpus`` + ``replica_gpus: 1``)."""
    gpus = list(split_gpus) if split_gpus else ([] if engine.gpu is None else [engine.gpu])
    args = EngineArgs(model=MODEL_NAME, source=str(model_dir), task="generate", engine_argv=list(engine.argv),
                      env=dict(engine.env), gpus=gpus, start_timeout_s=600.0,
                      replica_gpus=1 if split_gpus else None)
    return {
        "name": MODEL_NAME,
        "route_prefix": None,
        "import_path": ENGINE_IMPORT,
        "args": args.wire(),
        "deployments": [{
            "name": ENGINE_DEPLOYMENT,
            "num_replicas": len(split_gpus) if split_gpus else 1,
            "max_ongoing_requests": 1000,
            "health_check_period_s": 10.0,
            "health_check_timeout_s": 30.0,
            "graceful_shutdown_timeout_s": 20.0,
            "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
            "user_config": EngineUserConfig(idle_timeout_s=None, always_on=True).wire(),
            **engine_options,
        }],
    }


def router_app(router_options: dict[str, Any], port: int, workers: int, legacy: str | None) -> dict[str, Any]:
    """The fleet's router application (docs/contracts.md); ``legacy``: another router's import path,
    served at "/" through Serve's HTTP proxy instead of on its own port."""
    return {
        "name": ROUTER_APP,
        "route_prefix": "/" if legacy else None,
        "import_path": legacy or ROUTER_IMPORT,
        "args": {} if legacy else RouterArgs(host="127.0.0.1", port=port).wire(),
        "deployments": [{
            "name": ROUTER_DEPLOYMENT,
            "num_replicas": 1 if legacy else workers,
            "max_ongoing_requests": 1000,
            "ray_actor_options": {"num_cpus": 0},
            "user_config": RouterUserConfig(models={MODEL_NAME: RouterModel(task="generate", always_on=True)},
                                            load_timeout_s=600.0).wire(),
            **router_options,
        }],
    }


def rayllm_app(model_dir: Path, engine: EngineSetup) -> dict[str, Any]:
    """Ray Serve LLM's OpenAI app for the same model, at route prefix /rayllm.

    On a GPU its head has Ray's own GPU resource (that one card, see RayServeStack.launch), and the
    LLM server asks for it in its bundle, Ray Serve LLM's own default way. (A CPU bundle with
    CUDA_VISIBLE_DEVICES in the runtime_env ran on 2 x H100, but on an H200 that head's apps did
    not answer within 4 minutes, on a head of 4 CPUs; not diagnosed then.)
    """
    bundle: dict[str, float] = {"CPU": 1} if engine.gpu is None else {"CPU": 1, "GPU": 1}
    return {
        "name": "rayllm",
        "route_prefix": "/rayllm",
        "import_path": "ray.serve.llm:build_openai_app",
        "args": {"llm_configs": [{
            "model_loading_config": {"model_id": MODEL_NAME, "model_source": str(model_dir)},
            "engine_kwargs": engine.kwargs(),
            "placement_group_config": {"bundles": [bundle]},
            "runtime_env": {"env_vars": dict(engine.env)},
            "deployment_config": {"num_replicas": 1, "max_ongoing_requests": 1000},
        }]},
    }


@dataclass
class RayServeStack:
    """One Ray head (ours), with the fleet apps and optionally Ray Serve LLM's app on its Serve."""

    model_dir: Path
    work_dir: Path
    engine: EngineSetup
    with_fleet: bool
    with_rayllm: bool
    legacy_router: str | None = None  # a router import path served through Serve's proxy
    workers: int = 1
    ray_env: dict[str, str] = field(default_factory=dict)
    router_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)
    fleet_name: str = "fleet"
    split_gpus: list[int] | None = None  # the engine's replicas, one on each of these GPUs
    head: Any = None
    serve_port: int = 0
    dashboard_url: str = ""

    def launch(self) -> None:
        """Start the head and PUT the config (``wait`` waits for the apps)."""
        from reconciler.live import cluster

        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = self.head_env()
        # HAProxy is the head's own option (private files and ports, and stop_head removes the
        # haproxy process Ray leaves behind); the baseline runs Serve's Python proxy.
        fast = env.pop("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"
        gpus = 0
        if self.with_rayllm and self.engine.gpu is not None:  # Ray Serve LLM asks Ray for its GPU
            env["CUDA_VISIBLE_DEVICES"], gpus = str(self.engine.gpu), 1
        self.head = cluster.start_head(num_cpus=8, resources={}, env=env, fast_ingress=fast, num_gpus=gpus)
        self.dashboard_url = self.head.dashboard_url
        self.serve_port = free_port()
        apps: list[dict[str, Any]] = []
        if self.with_fleet:
            apps += [router_app(self.router_options, self.serve_port, self.workers, self.legacy_router),
                     engine_app(self.model_dir, self.engine, self.engine_options, self.split_gpus)]
        if self.with_rayllm:
            apps.append(rayllm_app(self.model_dir, self.engine))
        if self.serve_proxy:
            config = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": self.serve_port},
                      "applications": apps}
        else:  # as compile_serve_config: the router's own servers take the port
            config = {"proxy_location": "Disabled", "applications": apps}
        r = httpx.put(f"{self.dashboard_url}/api/serve/applications/", json=config, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"PUT of the Serve config failed: {r.status_code} {r.text[-2000:]}")

    @property
    def serve_proxy(self) -> bool:
        return self.with_rayllm or self.legacy_router is not None

    def wait(self, deadline: float) -> list[ServeEndpoint]:
        """Wait until every app answers a chat request; return the endpoints."""
        url = f"http://127.0.0.1:{self.serve_port}"
        endpoints = []
        if self.with_fleet:
            endpoints.append(ServeEndpoint(self.fleet_name, url, session_id=self.head.pid))
        if self.with_rayllm:
            endpoints.append(ServeEndpoint("rayllm", f"{url}/rayllm", session_id=self.head.pid))
        for ep in endpoints:
            try:
                wait_chat_ok(ep, deadline, self.app_states)
            except TimeoutError as e:
                raise TimeoutError(f"{e}\nServe's applications on that head: {self.app_states()}") from None
        return endpoints

    def app_states(self) -> str:
        """Each Serve application's status and message (what to look at when one never answers)."""
        try:
            apps = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=30).json()["applications"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            return f"(unreadable: {e!r})"
        return "; ".join(f"{name}: {a.get('status')} {a.get('message', '')[-500:]}" for name, a in apps.items())

    def head_env(self) -> dict[str, str]:
        """The head's environment: the Serve knobs under test."""
        return {"FLEET_LOG_DIR": str(self.work_dir / "fleet-logs"), **self.ray_env}

    def stop(self) -> None:
        """Stop our Ray head and everything on it (its process group; never a global ``ray stop``)."""
        if self.head is not None:
            from reconciler.live import cluster

            cluster.stop_head(self.head)
            shutil.rmtree(self.head.temp_dir, ignore_errors=True)


def wait_chat_ok(ep: Target, deadline: float, describe: Callable[[], str] | None = None) -> None:
    """Send a 2-token chat request until one succeeds (the app is up end to end); every 30 s, say on
    stderr what it answers so far (and ``describe()``: e.g. Serve's application states)."""
    body = {"model": ep.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    last = ""
    started = next_note = time.monotonic()
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{ep.base_url}/v1/chat/completions", json=body, timeout=60)
            if r.status_code == 200:
                print(f"{ep.name} up in {time.monotonic() - started:.0f} s", file=sys.stderr)
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        if time.monotonic() >= next_note:
            extra = f"; {describe()}" if describe is not None else ""
            print(f"waiting for {ep.name} ({time.monotonic() - started:.0f} s): {last}{extra}", file=sys.stderr)
            next_note += 30
        time.sleep(3)
    raise TimeoutError(f"{ep.name} not answering chat: {last}")


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One streamed request: time to first token, tokens received, wall time, or an error."""

    ttft_s: float
    tokens: int
    total_s: float
    error: str = ""


@dataclass
class Round:
    """One round: one target, one concurrency, a fixed number of requests."""

    target: str
    concurrency: int
    index: int
    wall_s: float
    load1: float
    cpu_s: float
    foreign_cpu_s: float  # CPU time on the box used by processes that are not ours
    samples: list[Sample]
    relay_cpu_s: float = 0.0  # CPU time of the target's relay processes (proxy, router, ingress)
    # the fleet router's own hops over the round, from its /metrics (hop -> cumulative buckets, sum, count)
    hops: dict[str, Any] = field(default_factory=dict)


HOP_FAMILY = "fleet_router_hop_seconds"
TTFT_FAMILY = "fleet_ttft_seconds"


async def scrape_hops(ep: Target) -> dict[str, Any]:
    """The router's hop and TTFT histograms for the bench model (serve_app.metrics); {} where the
    target has no /metrics of the fleet (direct vLLM, Ray Serve LLM, a legacy router)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(f"{ep.base_url}/metrics")
    except httpx.HTTPError:
        return {}
    if r.status_code != 200 or HOP_FAMILY not in r.text:
        return {}
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(r.text):
        if family.name not in (HOP_FAMILY, TTFT_FAMILY):
            continue
        for smp in family.samples:
            if smp.labels.get("model") != ep.model:
                continue
            hop = smp.labels.get("hop", "ttft")
            h = out.setdefault(hop, {"buckets": {}, "sum": 0.0, "count": 0.0})
            if smp.name.endswith("_bucket"):
                h["buckets"][float(smp.labels["le"])] = smp.value
            elif smp.name.endswith("_sum"):
                h["sum"] = smp.value
            elif smp.name.endswith("_count"):
                h["count"] = smp.value
    return out


def hops_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a round added to each hop's histogram."""
    out = {}
    for hop, a in after.items():
        b = before.get(hop, {"buckets": {}, "sum": 0.0, "count": 0.0})
        out[hop] = {"buckets": {le: n - b["buckets"].get(le, 0.0) for le, n in a["buckets"].items()},
                    "sum": a["sum"] - b["sum"], "count": a["count"] - b["count"]}
    return out


def hop_rows(rounds: list[Round]) -> list[dict[str, Any]]:
    """Per (concurrency, target) with hops: each hop's mean, p50 and p99 in ms over its rounds."""
    from reconciler.loop.pulse import quantile

    rows = []
    for conc, target in sorted({(r.concurrency, r.target) for r in rounds if r.hops}):
        merged: dict[str, Any] = {}
        for r in rounds:
            if (r.concurrency, r.target) != (conc, target):
                continue
            for hop, h in r.hops.items():
                m = merged.setdefault(hop, {"buckets": {}, "sum": 0.0, "count": 0.0})
                for le, n in h["buckets"].items():
                    m["buckets"][le] = m["buckets"].get(le, 0.0) + n
                m["sum"] += h["sum"]
                m["count"] += h["count"]
        row: dict[str, Any] = {"concurrency": conc, "target": target}
        for hop, m in merged.items():
            buckets = sorted(m["buckets"].items())
            row[hop] = {"mean_ms": 1000 * m["sum"] / m["count"] if m["count"] else float("nan"),
                        "p50_ms": 1000 * (quantile(0.5, buckets) or float("nan")),
                        "p99_ms": 1000 * (quantile(0.99, buckets) or float("nan")), "n": m["count"]}
        rows.append(row)
    return rows


def render_hops(rows: list[dict[str, Any]]) -> str:
    """Where the router's milliseconds go: route, connect, engine, out (and its TTFT) per row."""
    names = ("route", "connect", "engine", "out", "ttft")
    head = f"{'conc':>4} {'target':<8} " + " ".join(f"{n + ' mean/p50/p99 ms':>26}" for n in names)
    lines = ["the fleet router's hops, from its /metrics (histogram buckets: p50/p99 are interpolated)", head,
             "-" * len(head)]
    for r in rows:
        cells = []
        for n in names:
            h = r.get(n)
            cells.append(f"{h['mean_ms']:>8.2f}/{h['p50_ms']:>7.2f}/{h['p99_ms']:>8.2f}" if h else f"{'-':>26}")
        lines.append(f"{r['concurrency']:>4} {r['target']:<8} " + " ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


def chat_body(model: str, tokens: int) -> dict[str, Any]:
    """A streamed chat completion of exactly ``tokens`` tokens."""
    return {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True, "temperature": 0.0,
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    """Send one streamed request; TTFT is the first SSE chunk that carries content."""
    t0 = time.perf_counter()
    ttft = -1.0
    chunks = 0
    usage_tokens = -1
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return Sample(-1.0, 0, time.perf_counter() - t0, f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if ttft < 0:  # parse until the first content; afterwards only count (cheap)
                    msg = json.loads(line[6:])
                    if any((c.get("delta") or {}).get("content") for c in msg.get("choices") or []):
                        ttft = time.perf_counter() - t0
                        chunks += 1
                    continue
                found = COMPLETION_TOKENS.search(line)
                if found:
                    usage_tokens = int(found.group(1))
                else:
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Sample(ttft, chunks, time.perf_counter() - t0, repr(e)[:200])
    return Sample(ttft, usage_tokens if usage_tokens >= 0 else chunks, time.perf_counter() - t0)


async def client_share(url: str, body: dict[str, Any], concurrency: int, n_requests: int,
                       cap_s: float) -> list[Sample]:
    """``n_requests`` with ``concurrency`` in flight from this process, none started after ``cap_s``."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + cap_s

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.perf_counter() < deadline:
            queue.get_nowait()
            samples.append(await one_request(client, url, body))

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cap_s + 60), limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), cap_s + 120)
    return samples


def _client_process(url: str, body: dict[str, Any], concurrency: int, n_requests: int, cap_s: float) -> list[Sample]:
    return asyncio.run(client_share(url, body, concurrency, n_requests, cap_s))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_round(ep: Target, concurrency: int, n_requests: int, tokens: int, cap_s: float,
                    index: int, pool: ProcessPoolExecutor | None = None) -> Round:
    """Run ``n_requests`` with ``concurrency`` in flight, stopping new ones after ``cap_s``.

    With a pool of client processes the streams are split over them: one Python client parsing
    SSE tops out near what one Python relay does, and must not be what is measured.
    """
    url = f"{ep.base_url}/v1/chat/completions"
    body = chat_body(ep.model, tokens)
    procs = min(pool._max_workers, concurrency) if pool is not None else 1  # type: ignore[attr-defined]
    hops0 = await scrape_hops(ep)
    load, cpu0, own0, relay0 = load1(), busy_cpu_s(), own_cpu_s(), relay_cpu_s(ep)
    start = time.perf_counter()
    if procs <= 1:
        samples = await client_share(url, body, concurrency, n_requests, cap_s)
    else:
        loop = asyncio.get_running_loop()
        shares = zip(_split(concurrency, procs), _split(n_requests, procs), strict=True)
        parts = await asyncio.gather(*(loop.run_in_executor(pool, _client_process, url, body, c, n, cap_s)
                                       for c, n in shares))
        samples = [s for part in parts for s in part]
    wall = time.perf_counter() - start
    busy, own = busy_cpu_s() - cpu0, own_cpu_s() - own0
    relay = relay_cpu_s(ep) - relay0
    await asyncio.sleep(1.2 if hops0 else 0)  # the other router processes write their totals every second
    hops = hops_delta(hops0, await scrape_hops(ep)) if hops0 else {}
    return Round(ep.name, concurrency, index, wall, load, busy, max(0.0, busy - own), samples, relay, hops)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(rounds: list[Round], targets: list[str]) -> list[dict[str, Any]]:
    """One row per (concurrency, target): tokens/s, TTFT p50/p99, CPU per token, and ratios vs direct."""
    rows: list[dict[str, Any]] = []
    for conc in sorted({r.concurrency for r in rounds}):
        base: dict[str, Any] | None = None
        for name in targets:
            rs = [r for r in rounds if r.concurrency == conc and r.target == name]
            if not rs:
                continue
            ok = [s for r in rs for s in r.samples if not s.error]
            tokens = sum(s.tokens for s in ok)
            wall = sum(r.wall_s for r in rs)
            ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s >= 0]
            per_round = [sum(s.tokens for s in r.samples if not s.error) / r.wall_s for r in rs]
            row = {
                "concurrency": conc, "target": name, "rounds": len(rs),
                "requests": sum(len(r.samples) for r in rs), "errors": sum(1 for r in rs for s in r.samples
                                                                          if s.error),
                "tok_s": tokens / wall if wall else 0.0,
                "tok_s_round_min": min(per_round), "tok_s_round_max": max(per_round),
                "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
                "cpu_ms_per_tok": (1000 * sum(r.cpu_s - r.foreign_cpu_s for r in rs) / tokens
                                   if tokens else float("nan")),
                "relay_cpu_us_per_tok": (1e6 * sum(r.relay_cpu_s for r in rs) / tokens if tokens else float("nan")),
                "others_cpu_share": sum(r.foreign_cpu_s for r in rs) / (wall * (os.cpu_count() or 1)),
                "load1_max": max(r.load1 for r in rs),
            }
            if name == "direct":
                base = row
            if base is not None:
                row["tok_s_ratio"] = row["tok_s"] / base["tok_s"] if base["tok_s"] else float("nan")
                row["ttft_p50_added_ms"] = row["ttft_p50_ms"] - base["ttft_p50_ms"]
                row["ttft_p99_added_ms"] = row["ttft_p99_ms"] - base["ttft_p99_ms"]
            rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a fixed-width text table."""
    head = (f"{'conc':>4} {'target':<14} {'tok/s':>8} {'ratio':>6} {'TTFT p50':>9} {'+p50':>7} "
            f"{'TTFT p99':>9} {'+p99':>7} {'cpu ms/tok':>10} {'relay us/tok':>12} {'err':>4} {'load':>5} "
            f"{'others':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.get("tok_s_ratio", float("nan"))
        lines.append(
            f"{r['concurrency']:>4} {r['target']:<14} {r['tok_s']:>8.1f} {ratio:>6.3f} "
            f"{r['ttft_p50_ms']:>7.1f}ms {r.get('ttft_p50_added_ms', float('nan')):>+7.1f} "
            f"{r['ttft_p99_ms']:>7.1f}ms {r.get('ttft_p99_added_ms', float('nan')):>+7.1f} "
            f"{r['cpu_ms_per_tok']:>10.2f} {r['relay_cpu_us_per_tok']:>12.1f} {r['errors']:>4} {r['load1_max']:>5.2f} "
            f"{100 * r['others_cpu_share']:>5.1f}%"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_kv(items: list[str]) -> dict[str, str]:
    """``["K=V", ...]`` to a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The options every bench that starts the fleet shares: the model, vLLM's flags and device."""
    p.add_argument("--model", type=Path, help="model folder (default: build a tiny random Llama)")
    p.add_argument("--engine-argv", default=CPU_ENGINE_ARGV, help="vLLM flags for every target (one string)")
    p.add_argument("--engine-env", action="append", default=None, metavar="K=V",
                   help="environment for every target's vLLM, repeatable (default: a 1 GiB CPU KV cache "
                   "without --gpu, nothing with it)")
    p.add_argument("--gpu", type=int, help="GPU index every target's vLLM runs on (default: CPU)")
    p.add_argument("--workers", type=int, default=1, help="the fleet router's processes (openai.workers)")


def engine_setup(args: argparse.Namespace) -> EngineSetup:
    """vLLM's flags, environment and device from add_engine_options' options."""
    default_env = [] if args.gpu is not None else [f"{k}={v}" for k, v in CPU_ENGINE_ENV.items()]
    return EngineSetup(shlex.split(args.engine_argv), parse_kv(args.engine_env or default_env), args.gpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_options(p)
    p.add_argument("--targets", default="direct,fleet,rayllm",
                   help="comma list of direct,fleet,rayllm,legacy (legacy needs --legacy-router)")
    p.add_argument("--replicas-on", metavar="GPUS", help="one more fleet stack, target fleet:replicas, whose "
                   "engine has one replica on each of these GPUs (e.g. 0,1: replicas 2 on 2 GPUs)")
    p.add_argument("--legacy-router", metavar="IMPORT", help="import path of a router served through "
                   "Serve's HTTP proxy, measured as target legacy (e.g. the previous serve_app/router.py "
                   "copied to an importable module)")
    p.add_argument("--client-procs", type=int, default=1,
                   help="load-generator processes the streams are split over (use several on a GPU)")
    p.add_argument("--concurrency", default="1,16", help="comma list of concurrencies")
    p.add_argument("--requests", default="", help="requests per round per concurrency, e.g. '1:8,16:32' "
                   "(default: max(16, 6 x concurrency))")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per target and concurrency")
    p.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    p.add_argument("--round-cap-s", type=float, default=120.0, help="time cap of one round")
    p.add_argument("--start-timeout-s", type=float, default=600.0, help="time to bring each target up")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for 1-min load below this first")
    p.add_argument("--quiet-wait-s", type=float, default=600.0, help="at most this long")
    p.add_argument("--max-others", type=float, default=0.15,
                   help="redo a round in which other processes used more than this share of the CPUs")
    p.add_argument("--retries", type=int, default=3, help="at most this many redos per round")
    p.add_argument("--ray-env", action="append", default=[], metavar="K=V",
                   help="environment for the Ray head (Serve knobs), repeatable")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:K=V[,K=V]",
                   help="one more fleet stack (own Ray head) with these extra head env vars, measured "
                   "as target fleet:LABEL in the same interleaved rounds; repeatable")
    p.add_argument("--router-option", action="append", default=[], metavar="K=JSON",
                   help="extra deployment option for the fleet router, repeatable")
    p.add_argument("--profile-dir", type=Path, help="py-spy the proxy and router replica during the "
                   "first fleet round at the highest concurrency; collapsed stacks go here")
    p.add_argument("--profile-s", type=float, default=20.0, help="seconds to sample")
    p.add_argument("--keep-dir", action="store_true", help="keep the work folder (logs) at the end")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_args(argv)


def requests_per_round(spec: str, concurrency: int) -> int:
    """Requests per round for a concurrency, from ``--requests``."""
    table = {int(k): int(v) for k, v in (x.split(":") for x in spec.split(",") if x)}
    return table.get(concurrency, max(16, 6 * concurrency))


@contextlib.contextmanager
def started(args: argparse.Namespace, work: Path) -> Iterator[list[Target]]:
    """Start the requested targets (stopping all of them on the way out); yield them in order."""
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    model_dir = args.model.resolve() if args.model else build_tiny_llama(work / "model")
    engine = engine_setup(args)
    ray_env = parse_kv(args.ray_env)
    router_opts = {k: json.loads(v) for k, v in parse_kv(args.router_option).items()}
    if "legacy" in names and not args.legacy_router:
        raise SystemExit("target legacy needs --legacy-router IMPORT")
    stacks: list[Any] = []
    if "direct" in names:
        stacks.append(DirectVLLM(model_dir, work, engine))
    if "fleet" in names:
        stacks.append(RayServeStack(model_dir, work / "ray-main", engine, True, False, workers=args.workers,
                                    ray_env=ray_env, router_options=router_opts))
    if "rayllm" in names or "legacy" in names:  # both need Serve's HTTP proxy: a head of their own
        stacks.append(RayServeStack(model_dir, work / "ray-proxy", engine, "legacy" in names, "rayllm" in names,
                                    legacy_router=args.legacy_router if "legacy" in names else None,
                                    ray_env=ray_env, router_options=router_opts, fleet_name="legacy"))
    if args.replicas_on:
        gpus = [int(g) for g in args.replicas_on.split(",")]
        stacks.append(RayServeStack(model_dir, work / "ray-replicas", engine, True, False, workers=args.workers,
                                    ray_env=ray_env, router_options=router_opts, fleet_name="fleet:replicas",
                                    split_gpus=gpus))
        names.append("fleet:replicas")
    for spec in args.variant:
        label, _, env = spec.partition(":")
        stacks.append(RayServeStack(model_dir, work / f"ray-{label}", engine, True, False, workers=args.workers,
                                    ray_env={**ray_env, **parse_kv(env.split(",") if env else [])},
                                    router_options=router_opts, fleet_name=f"fleet:{label}"))
        names.append(f"fleet:{label}")
    targets: dict[str, Target] = {}
    try:
        for stack in stacks:  # everything starts at once; then we wait for each
            stack.launch()
        deadline = time.monotonic() + args.start_timeout_s
        for stack in stacks:
            try:
                for ep in stack.wait(deadline):
                    targets[ep.name] = ep
            except (TimeoutError, RuntimeError) as e:  # measure the others; say why this one is missing
                print(f"NOT MEASURED: a target did not come up: {e}", file=sys.stderr)
                NOT_STARTED.append(str(e)[-1500:])
        yield [targets[n] for n in names if n in targets]
    finally:
        for stack in reversed(stacks):
            with contextlib.suppress(Exception):
                stack.stop()


async def measure(args: argparse.Namespace, targets: list[Target]) -> list[Round]:
    """Warm every target up, then run the alternating rounds."""
    rounds: list[Round] = []
    concs = [int(c) for c in args.concurrency.split(",")]
    pool = None
    if args.client_procs > 1:
        pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    for t in targets:  # warm-up: one short round per target, not recorded
        await run_round(t, max(concs), max(concs), args.tokens, args.round_cap_s, -1, pool)
    for conc in concs:
        n = requests_per_round(args.requests, conc)
        for i in range(args.rounds):
            for t in targets:
                profilers = []
                if args.profile_dir and t.name.startswith("fleet") and conc == max(concs) and i == 0:
                    pids = ray_worker_pids(getattr(t, "session_id", 0), PROFILED)
                    profilers = start_profilers(pids, args.profile_s, args.profile_dir / t.name)
                r = await run_round(t, conc, n, args.tokens, args.round_cap_s, i, pool)
                for p in profilers:
                    p.wait(timeout=args.profile_s + 60)
                for _ in range(args.retries):  # others' work on the box spoils a round: redo it
                    if r.foreign_cpu_s <= args.max_others * r.wall_s * (os.cpu_count() or 1):
                        break
                    print(f"  (others used {r.foreign_cpu_s:.1f} CPU s; redoing)", file=sys.stderr)
                    await asyncio.sleep(10)
                    r = await run_round(t, conc, n, args.tokens, args.round_cap_s, i, pool)
                rounds.append(r)
                print(f"  c={conc} round {i} {t.name:<7} {sum(s.tokens for s in r.samples) / r.wall_s:8.1f} "
                      f"tok/s  load {r.load1:.2f}  others {r.foreign_cpu_s:.1f} CPU s  "
                      f"errors {sum(1 for s in r.samples if s.error)}",
                      file=sys.stderr)
    if pool is not None:
        pool.shutdown()
    return rounds


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """Turn SIGTERM into SystemExit."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (or JSON)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the finally blocks stop what we started
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    print(f"work folder {work}; load {load1():.2f}", file=sys.stderr)
    try:
        print(f"waiting for load < {args.max_load} before starting", file=sys.stderr)
        wait_quiet(args.max_load, args.quiet_wait_s)
        with started(args, work) as targets:
            load = wait_quiet(args.max_load + 0.5, args.quiet_wait_s)  # our idle servers add a little
            print(f"targets up; load {load:.2f} at start", file=sys.stderr)
            rounds = asyncio.run(measure(args, targets))
        rows = summarize(rounds, [t.name for t in targets])
        errors = sorted({s.error for r in rounds for s in r.samples if s.error})[:5]
        report = {"machine": f"{os.cpu_count()} CPUs", "gpu": args.gpu, "engine_argv": args.engine_argv,
                  "workers": args.workers, "client_procs": args.client_procs,
                  "load1_at_start": load, "tokens": args.tokens,
                  "ray_env": parse_kv(args.ray_env), "rows": rows, "hops": hop_rows(rounds),
                  "first_errors": errors,
                  "not_started": NOT_STARTED,
                  "rounds": [asdict(r) for r in rounds] if args.json else None}
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print(render_table(rows))
            if any(r.hops for r in rounds):
                print()
                print(render_hops(hop_rows(rounds)))
            for e in errors:
                print("error:", e)
            for e in NOT_STARTED:
                print("not measured:", e)
        return 0
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
