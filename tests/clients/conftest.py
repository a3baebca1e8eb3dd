"""One fleet for the client tests: the default fleet.yaml, brought up by ``scripts/start.sh``.

Started as a user on a stock Debian/Ubuntu box would: ``/usr/bin`` first on PATH (so ``python3`` is
the system Python, which refuses pip), no virtualenv active. start.sh then works in the virtual
environment scripts/python-env.sh picks: the one this test run uses (``.ci/run`` made it from that
same system Python), so the install step is a check and only ``fleetctl up`` does work. Only the
ports differ from the shipped fleet.yaml. Everything it started is stopped at the end.

The clients (OpenWebUI in its own venv, Chromium) come from scripts/install-clients.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from reconciler import state_files
from reconciler.live import cluster
from reconciler.live.local_head import kill_leftovers
from serve_app.proctable import cmdline, descendants
from tests.fixtures.default_fleet import copy_default_fleet

REPO = Path(__file__).resolve().parents[2]
OPEN_WEBUI_VERSION = "0.12.4"  # as scripts/install-clients.sh installs it
STOCK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHAT, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"


START_TIMEOUT_S = 1800  # start.sh's own bound (client_fleet)
# pytest-timeout's bound for a client test (pyproject.toml's is 1200 s): the first one waits for
# start.sh, and one of test_openwebui.py's then for OpenWebUI's first start (bounded at 900 s).
CLIENT_TEST_TIMEOUT_S = START_TIMEOUT_S + 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(CLIENT_TEST_TIMEOUT_S))


def missing_client(what: str) -> None:
    """CI must run every client test; elsewhere a missing client is a skip that says how to get it."""
    message = f"{what} is not installed: run `bash scripts/install-clients.sh`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class ClientFleet:
    root: Path
    port: int
    dashboard_url: str
    start: subprocess.CompletedProcess[str]
    env: dict[str, str]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def engine_requests(self, model: str, path: str) -> float:
        """Requests on ``path`` (e.g. /v1/embeddings) that this fleet's vLLM for ``model`` handled, from
        its own /metrics (the HTTP instrumentator's http_requests_total, any status). The vLLM is
        found by its command line among the processes of this fleet's Ray head: other fleets on the
        box may serve a model of the same name. 0 while the model is unloaded (no vLLM): a vLLM that
        starts counts from 0 again."""
        head = recorded_head(self.dashboard_url, self.env)
        assert head is not None, "the client fleet's Ray head is not recorded"
        for pid in descendants(set(cluster.session_processes(head.pid))):
            argv = cmdline(pid).split()
            if ("--served-model-name" in argv and argv[argv.index("--served-model-name") + 1] == model
                    and "--port" in argv and any("vllm" in a for a in argv)):
                port = argv[argv.index("--port") + 1]
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
                return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("http_requests_total{") and f'handler="{path}"' in line)
        return 0.0


def start_env(lock_dir: Path, log_dir: Path) -> dict[str, str]:
    """A stock box's environment: system PATH first, no active virtualenv, no PYTHON override."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=STOCK_PATH + ":" + os.environ.get("PATH", ""), FLEET_LOCK_DIR=str(lock_dir),
               FLEET_LOG_DIR=str(log_dir), NO_COLOR="1")
    if sys.prefix != sys.base_prefix:
        env["FLEET_VENV"] = sys.prefix  # the venv this run uses: start.sh must find it complete
    else:  # a hand-managed env (no venv, e.g. shared by developers): used as it is, never reinstalled
        env.update(PYTHON=sys.executable, FLEET_NO_INSTALL="1")
    if os.environ.get("PYTHONPATH"):  # a worktree's code over the installed one (developers)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


@pytest.fixture(scope="package")
def client_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientFleet]:
    root = tmp_path_factory.mktemp("client-fleet")
    ports = copy_default_fleet(root)
    dash, port = ports.dashboard, ports.openai
    env = start_env(tmp_path_factory.mktemp("locks"), tmp_path_factory.mktemp("vllm-logs"))
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        start = subprocess.run(["bash", str(REPO / "scripts" / "start.sh"), str(root)], cwd=root, env=env,
                               capture_output=True, text=True, timeout=START_TIMEOUT_S)
        assert start.returncode == 0, start.stdout[-4000:] + start.stderr[-4000:]
        yield ClientFleet(root, port, dashboard, start, env)
    finally:
        _stop_fleet(root, dashboard, env)


def _stop_fleet(root: Path, dashboard: str, env: dict[str, str]) -> None:
    """`fleetctl down` (it stops the daemon too), then whatever of the head is left, by pid."""
    subprocess.run([sys.executable, "-c", "from reconciler.cli.fleetctl import main; main()", "down", str(root)],
                   cwd=root, env=env, capture_output=True, timeout=600, check=False)
    head = recorded_head(dashboard, env)
    if head is not None:
        ours = descendants(set(cluster.session_processes(head.pid)))
        cluster.stop_head(head)
        kill_leftovers(ours)


def recorded_head(dashboard: str, env: dict[str, str]) -> cluster.Head | None:
    """The Ray head start.sh started for this dashboard, as its lock folder records it."""
    old = os.environ.get("FLEET_LOCK_DIR")
    os.environ["FLEET_LOCK_DIR"] = env["FLEET_LOCK_DIR"]
    try:
        state = state_files.head_record(dashboard)
    finally:
        if old is None:
            del os.environ["FLEET_LOCK_DIR"]
        else:
            os.environ["FLEET_LOCK_DIR"] = old
    if not state.exists():
        return None  # the head's start settings (kept beside it for a restart) are not a Head's
    return cluster.Head(**{k: v for k, v in json.loads(state.read_text()).items() if k != "start"})


@pytest.fixture(scope="package")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        missing_client("chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing_client("playwright (the Python package)")
    return str(path)


def open_webui_bin() -> Path:
    clients = Path(os.environ.get("FLEET_CLIENTS_DIR") or Path.home() / ".cache" / "vllm-fleet" / "clients")
    return clients / f"open-webui-{OPEN_WEBUI_VERSION}" / "bin" / "open-webui"


@dataclass
class OpenWebUI:
    url: str
    log: Path

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])


def run_open_webui(tmp: Path, fleet: ClientFleet, **env_overrides: str) -> Iterator[OpenWebUI]:
    """An OpenWebUI, offline and without accounts, pointed at the fleet only by its two settings."""
    exe = open_webui_bin()
    if not exe.exists():
        missing_client(f"open-webui {OPEN_WEBUI_VERSION}")
    port = cluster.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({
        # the two settings the README names
        "OPENAI_API_BASE_URL": fleet.endpoint + "/v1", "OPENAI_API_KEY": "unused",
        # a test box: offline, no login, its own data folder and secret
        "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "WEBUI_AUTH": "False", "ENABLE_OLLAMA_API": "false",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false", "DATA_DIR": str(tmp / "data"),
        "WEBUI_SECRET_KEY": "test-only-secret", "ENABLE_VERSION_UPDATE_CHECK": "false",
        **env_overrides,
    })
    log = tmp / "open-webui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ui = OpenWebUI(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, f"open-webui exited {proc.returncode}:\n{ui.log_tail()}"
            try:
                if httpx.get(ui.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"open-webui not healthy in 900 s:\n{ui.log_tail()}"
            time.sleep(2)
        yield ui
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
