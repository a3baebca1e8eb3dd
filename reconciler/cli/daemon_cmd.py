"""`fleetctl daemon`: run the reconcile loop and the read-only status API until SIGTERM.

Also the helpers `fleetctl up` / `down` use to start and stop a daemon in the background: its pid
and address live in a small state file (reconciler.state_files, one per Ray dashboard).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import httpx

from reconciler import state_files
from reconciler.change import last_good
from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from reconciler.fleetfiles.loader import fleet_root
from reconciler.fleetfiles.spec import DaemonSettings
from reconciler.loop.daemon import Daemon
from serve_app import proctable


def _settings(path: Path) -> tuple[DaemonSettings, str | None]:
    """The daemon's settings and the dashboard URL from the files; while they are invalid, from the
    last good copy the daemon kept (so a restarted daemon serves where it did); else the defaults."""
    try:
        placed = desired_state(path).placed
    except SpecError:
        kept = last_good.desired(fleet_root(path))
        if kept is None:
            return DaemonSettings(), None
        placed = kept[0].placed
    return placed.daemon, placed.ray.dashboard_url


@click.command("daemon")
@click.argument("path", default=".", type=click.Path(path_type=Path))
@click.option("--host", default=None, help="Address of the status API (default: daemon.host, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port of the status API (default: daemon.port, 8266).")
@click.option("--resync", "resync_s", type=float, default=None,
              help="Seconds between passes without edits (default: daemon.resync, 30 s).")
def daemon_cmd(path: Path, host: str | None, port: int | None, resync_s: float | None) -> None:
    """Keep the live fleet equal to the files at PATH, and serve a read-only status page.

    \b
    Reconciles when fleet.yaml or fleet.d/*.yaml change (a burst of writes is one pass), and
    every `daemon.resync` seconds anyway, so drift heals: an app changed or deleted by hand, a
    restarted Ray head. An invalid edit changes nothing live; the error (file:line) shows on
    the status page until the files are fixed. Status API (read-only, loopback by default):
      /         the page        /status   JSON (as `fleetctl status --json`)
      /healthz  liveness        /metrics  Prometheus
    Stops cleanly on SIGTERM or Ctrl-C. `fleetctl up` starts it; `fleetctl down` stops it.
    """
    import uvicorn

    from reconciler.loop.status_api import ExposureError, Metrics, check_exposure, make_app, scrub_logs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per dashboard poll is noise
    # Until the loop runs, a stop request simply ends the process: nothing has been started yet.
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)
    settings, dashboard = _settings(path)
    host, port = host or settings.host, port or settings.port
    try:  # a status API off loopback needs a token (daemon.token_env)
        token = check_exposure(host, settings)
    except ExposureError as e:
        raise click.ClickException(str(e)) from None
    if dashboard:  # so that `fleetctl down` finds and stops this daemon, however it was started
        other = running_daemon(dashboard)
        if other and other[0] != os.getpid():
            raise click.ClickException(f"a fleet daemon already runs for {dashboard} (pid {other[0]}, status "
                                       f"{other[1]}); stop it first (`kill {other[0]}` or `fleetctl down`)")
        register(dashboard, os.getpid(), f"http://{host}:{port}/")
    metrics_box: list[Metrics] = []
    daemon = Daemon(path, resync_s=resync_s, on_pass=lambda s: metrics_box[0].observe(s) if metrics_box else None)
    metrics_box.append(Metrics(daemon))
    scrub_logs(daemon)
    server = uvicorn.Server(uvicorn.Config(make_app(daemon, metrics_box[0], token=token), host=host, port=port,
                                           log_level="warning", access_log=False, lifespan="off"))
    api = threading.Thread(target=server.run, name="status-api", daemon=True)
    api.start()

    def stop(signum: int, _frame: Any) -> None:
        logging.getLogger("fleetctl.daemon").info("signal %d: stopping", signum)
        daemon.stop()
        server.should_exit = True
        # A pass ends at its next step (none waits on an engine); one stuck in a slow read is abandoned
        # after a grace: the next daemon's pass reads the world afresh, so nothing half-done is lost.
        threading.Thread(target=_exit_after, args=(STOP_GRACE_S, dashboard), name="stop-grace",
                         daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(f"fleetctl daemon: watching {daemon.root}; status on http://{host}:{port}/", err=True)
    try:
        daemon.run()
    finally:
        server.should_exit = True
        api.join(timeout=10)
        if dashboard:
            unregister(dashboard, os.getpid())
    click.echo("fleetctl daemon: stopped", err=True)


STOP_GRACE_S = 5.0


def _exit_now(signum: int, _frame: Any) -> None:
    logging.getLogger("fleetctl.daemon").info("signal %d before the loop started: stopping", signum)
    raise SystemExit(0)


def _exit_after(seconds: float, dashboard: str | None) -> None:
    time.sleep(seconds)
    logging.getLogger("fleetctl.daemon").warning("the pass did not end within %.0f s of the signal; "
                                                 "abandoning it", seconds)
    if dashboard:
        unregister(dashboard, os.getpid())
    logging.shutdown()
    os._exit(0)


def watching(root: Path) -> list[int]:
    """Pids of `fleetctl daemon` processes on this box whose fleet folder is ``root``, however started."""
    root = root.resolve()
    found = []
    for proc in proctable.processes():
        argv = proctable.cmdline(proc.pid).split()
        if proc.pid == os.getpid() or "daemon" not in argv or not any(a.endswith(("fleetctl", "reconciler"))
                                                                     for a in argv[: argv.index("daemon")]):
            continue
        rest = _positionals(argv[argv.index("daemon") + 1:])
        try:
            cwd = Path(os.readlink(f"/proc/{proc.pid}/cwd"))
        except OSError:
            continue
        where = (cwd / (rest[0] if rest else ".")).resolve()
        if where == root or where.parent == root and where.is_file():
            found.append(proc.pid)
    return found


def _positionals(args: list[str]) -> list[str]:
    """The daemon command's positional arguments (its PATH), its options and their values left out."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--host", "--port", "--resync"):
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def stop_watching(root: Path, report: Any, wait_s: float = 20.0) -> list[int]:
    """SIGTERM every daemon watching the fleet at ``root`` (SIGKILL after wait_s); their pids."""
    pids = watching(root)
    _terminate(pids, report, wait_s)
    return pids


def _terminate(pids: list[int], report: Any, wait_s: float) -> None:
    """SIGTERM the daemons, wait for them (reaping our own children), SIGKILL what is left after wait_s."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while any(proctable.alive(p) for p in pids) and time.monotonic() < deadline:
        for p in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, os.WNOHANG)
        time.sleep(0.2)
    for p in pids:
        if proctable.alive(p):
            report(f"the daemon (pid {p}) did not stop in {wait_s:.0f} s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def running_daemon(dashboard_url: str) -> tuple[int, str] | None:
    """(pid, status URL) of a live daemon registered for this dashboard, else None."""
    try:
        data = json.loads(state_files.daemon_record(dashboard_url).read_text())
        pid = int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, str(data.get("url", ""))) if proctable.alive(pid) and "reconciler" in proctable.cmdline(pid) \
        else None


def register(dashboard_url: str, pid: int, url: str, log: str = "") -> None:
    state_files.daemon_record(dashboard_url).write_text(json.dumps({"pid": pid, "url": url, "log": log}))


def unregister(dashboard_url: str, pid: int) -> None:
    path = state_files.daemon_record(dashboard_url)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if int(json.loads(path.read_text())["pid"]) == pid:
            path.unlink()


def start_background(path: Path, dashboard_url: str, log_dir: Path, report: Any) -> str | None:
    """Start `fleetctl daemon PATH` detached; wait for its status API. Returns the page URL."""
    settings, _ = _settings(path)
    log = log_dir / f"daemon-{os.getpid()}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "daemon", str(path.resolve())],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/"
    register(dashboard_url, proc.pid, url, str(log))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            report(f"the daemon exited (code {proc.returncode}); its log: {log}")
            return None
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "healthz", timeout=2).status_code in (200, 503):
                return url
        time.sleep(0.3)
    report(f"the daemon's status API did not answer at {url} within 30 s; its log: {log}")
    return url


def stop_background(dashboard_url: str, report: Any, wait_s: float = 20.0) -> bool:
    """SIGTERM the daemon `up` started (SIGKILL after wait_s). True when one was stopped."""
    path = state_files.daemon_record(dashboard_url)
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if proctable.alive(pid) and "reconciler" in proctable.cmdline(pid):
        _terminate([pid], report, wait_s)
    path.unlink(missing_ok=True)
    return True
