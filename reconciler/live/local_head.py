"""The Ray head `fleetctl up` starts on this box: its record, starting it, starting it again, and stopping it.

`up` records what it started — the head, how it was started (CPUs, resources, ports) and for which
fleet folder — in a small state file per dashboard URL (reconciler.state_files). `down` stops exactly
that head, whatever the fleet files say (a typo must not keep the engines on their GPUs); a daemon
whose head died under it (killed, OOM) starts it again from the same record, as `up` would, so the
fleet comes back with nobody typing anything. A Ray that `up` did not start is never touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reconciler import state_files
from reconciler.fleetfiles.inventory import nvml_gpus
from reconciler.live import cluster
from reconciler.live import serve_state as live_mod
from serve_app import proctable

Report = Callable[[str], None]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Record:
    head: cluster.Head
    num_cpus: int
    resources: dict[str, float]
    fleet: str  # the fleet folder `up` was given ("" in records of older releases)
    started_at: float
    object_store_bytes: int | None = None  # None: Ray's own default

    def as_json(self) -> str:
        return json.dumps({**asdict(self.head), "start": {
            "num_cpus": self.num_cpus, "resources": self.resources, "fleet": self.fleet,
            "started_at": self.started_at, "object_store_bytes": self.object_store_bytes}})


def _parse(text: str) -> Record | None:
    try:
        data = json.loads(text)
        start = data.pop("start", {}) or {}
        head = cluster.Head(**{k: data[k] for k in ("gcs_address", "dashboard_url", "pid", "temp_dir", "log_path")})
        return Record(head, int(start.get("num_cpus") or 0), dict(start.get("resources") or {}),
                      str(start.get("fleet") or ""), float(start.get("started_at") or 0.0),
                      start.get("object_store_bytes"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def load(dashboard_url: str) -> Record | None:
    try:
        return _parse(state_files.head_record(dashboard_url).read_text())
    except OSError:
        return None


def records() -> list[Record]:
    """Every head `up` recorded on this box (any dashboard)."""
    found = []
    for path in state_files.head_records():
        with contextlib.suppress(OSError):
            if (rec := _parse(path.read_text())) is not None:
                found.append(rec)
    return found


def for_fleet(root: Path) -> list[Record]:
    """The heads `up` started for the fleet folder ``root``."""
    return [r for r in records() if r.fleet and Path(r.fleet) == root.resolve()]


def forget(dashboard_url: str) -> None:
    state_files.head_record(dashboard_url).unlink(missing_ok=True)


def logical_cpus(config: Mapping[str, Any]) -> int:
    """Ray's CPU count is bookkeeping: enough for every replica's num_cpus, at least the cores."""
    wanted = sum(float((d.get("ray_actor_options") or {}).get("num_cpus", 1)) * int(d.get("num_replicas") or 1)
                 for a in config.get("applications") or [] for d in a.get("deployments") or [])
    return max(os.cpu_count() or 1, math.ceil(wanted) + 1)


def is_local(dashboard_url: str) -> bool:
    return urlsplit(dashboard_url).hostname in LOCAL_HOSTS


def start(dashboard_url: str, *, num_cpus: int, resources: dict[str, float], fleet: Path,
          gcs_port: int | None = None, object_store_bytes: int | None = None) -> Record:
    """Start a detached head whose dashboard is ``dashboard_url`` and record it. Raises cluster.HeadError."""
    head = cluster.start_head(num_cpus=num_cpus, resources=resources, port=gcs_port,
                              dashboard_port=urlsplit(dashboard_url).port or 8265, detach=True,
                              object_store_bytes=object_store_bytes)
    rec = Record(head, num_cpus, resources, str(fleet.resolve()), time.time(), object_store_bytes)
    state_files.head_record(dashboard_url).write_text(rec.as_json())
    return rec


def processes(rec: Record) -> set[int]:
    """The head's processes and everything they started (engines included)."""
    return proctable.descendants(set(cluster.session_processes(rec.head.pid)))


def is_dead(rec: Record) -> bool:
    """No GCS server left in the head's session: Ray is gone, whatever else lingers."""
    return not any("gcs_server" in proctable.cmdline(p) for p in cluster.session_processes(rec.head.pid))


def restart(rec: Record, report: Report) -> Record:
    """Start the recorded head again on the same ports, after stopping what is left of it."""
    report(f"the Ray head `fleetctl up` started (pid {rec.head.pid}) is gone; starting it again")
    cluster.stop_head(rec.head)
    port = int(rec.head.gcs_address.rsplit(":", 1)[1])
    t0 = time.monotonic()
    new = start(rec.head.dashboard_url, num_cpus=rec.num_cpus or logical_cpus({}), resources=rec.resources,
                fleet=Path(rec.fleet or "."), gcs_port=port, object_store_bytes=rec.object_store_bytes)
    report(f"Ray head up again in {time.monotonic() - t0:.0f} s (pid {new.head.pid}, logs in {new.head.temp_dir})")
    return new


def start_for_fleet(dashboard_url: str, config: Mapping[str, Any], fleet: Path, report: Report) -> Record:
    """`up`'s head: on this box only, each GPU as ``fleet_gpu_<i>``, CPUs for every replica of ``config``.

    Raises cluster.HeadError with a sentence to show as it is."""
    if not is_local(dashboard_url):
        raise cluster.HeadError(f"no Ray answers at {dashboard_url}, and `up` starts a head only on this box "
                                "(dashboard_url on 127.0.0.1); start Ray there, or point ray.dashboard_url at it")
    gpus = len(nvml_gpus())
    cpus = logical_cpus(config)
    report(f"starting a local Ray head ({cpus} CPUs, {gpus} GPUs as fleet_gpu_<i>) ...")
    t0 = time.monotonic()
    try:
        rec = start(dashboard_url, num_cpus=cpus, resources=cluster.gpu_resources(gpus), fleet=fleet)
    except cluster.HeadError as e:
        raise cluster.HeadError(f"the Ray head did not start: {e}") from e
    head = rec.head
    report(f"Ray head up in {time.monotonic() - t0:.0f} s (pid {head.pid}, logs in {head.temp_dir})")
    port = head.gcs_address.rsplit(":", 1)[1]
    report(f"other machines join it with: ray start --address=<this machine's IP>:{port} "
           "--node-ip-address=<their IP> --num-gpus 0 --resources '{\"fleet_gpu_0\": 1, ...}' "
           "(one fleet_gpu_<i> per card); then name them in node:")
    return rec


def stop(dashboard_url: str, rec: Record, report: Report) -> set[int]:
    """Stop what `up` started and recorded for ``dashboard_url``: Serve's apps first (engines shut
    down gracefully), then the head as the backstop, then any of its processes still running; and
    forget the record. Returns the pids that survived even SIGKILL."""
    ours = processes(rec)
    try:
        with live_mod.make_client(rec.head.dashboard_url, timeout=90.0) as c:
            c.delete(live_mod.APPLICATIONS_PATH)
    except Exception as e:  # a dead Serve must not stop us from stopping the head
        report(f"Serve did not shut down cleanly ({e}); stopping the head anyway")
    ours |= processes(rec)
    cluster.stop_head(rec.head)
    left = kill_leftovers(ours)
    forget(dashboard_url)
    return left


def kill_leftovers(pids: set[int], wait_s: float = 20.0) -> set[int]:
    """Wait for pids to exit (their guards end them); SIGKILL the rest. Returns the survivors."""
    def alive() -> set[int]:
        return {p for p in pids if proctable.alive(p)}

    deadline = time.monotonic() + wait_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    time.sleep(0.5)
    return alive()
