"""The Ray head `fleetctl up` starts on this box: its record, starting it, and starting it again.

`up` records what it started — the head, how it was started (CPUs, resources, ports) and for which
fleet folder — in a small state file per dashboard URL beside the apply lock. `down` stops exactly
that head, whatever the fleet files say (a typo must not keep the engines on their GPUs); a daemon
whose head died under it (killed, OOM) starts it again from the same record, as `up` would, so the
fleet comes back with nobody typing anything. A Ray that `up` did not start is never touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reconciler import cluster
from reconciler import lock as lock_mod
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


def state_path(dashboard_url: str) -> Path:
    lock = lock_mod.lock_path(dashboard_url)
    return lock.with_name(lock.name.replace("apply-", "head-").replace(".lock", ".json"))


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
        return _parse(state_path(dashboard_url).read_text())
    except OSError:
        return None


def records() -> list[Record]:
    """Every head `up` recorded on this box (any dashboard)."""
    found = []
    for path in sorted(lock_mod.lock_dir().glob("head-*.json")):
        with contextlib.suppress(OSError):
            if (rec := _parse(path.read_text())) is not None:
                found.append(rec)
    return found


def for_fleet(root: Path) -> list[Record]:
    """The heads `up` started for the fleet folder ``root``."""
    return [r for r in records() if r.fleet and Path(r.fleet) == root.resolve()]


def forget(dashboard_url: str) -> None:
    state_path(dashboard_url).unlink(missing_ok=True)


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
    state_path(dashboard_url).write_text(rec.as_json())
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
