"""Where the reconciler keeps its local state: one folder, one file per kind and Serve instance.

Everything the tool remembers between runs lives in ``state_dir()`` (FLEET_LOCK_DIR if set, else
$XDG_CACHE_HOME/vllm-fleet): the apply lock, the daemon's and the head's records, measured start
times, a running download's progress (one file each per dashboard URL, since two fleets conflict
only when they talk to the same Serve) and the last good fleet files (one per fleet folder).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def state_dir() -> Path:
    """FLEET_LOCK_DIR if set, else $XDG_CACHE_HOME/vllm-fleet (~/.cache/vllm-fleet); made if missing."""
    explicit = os.environ.get("FLEET_LOCK_DIR")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(explicit) if explicit else Path(cache) / "vllm-fleet"
    path.mkdir(parents=True, exist_ok=True)
    return path


def serve_key(dashboard_url: str) -> str:
    """A short stable name for one Serve instance (its dashboard URL, trailing slash ignored)."""
    return hashlib.sha256(dashboard_url.rstrip("/").encode()).hexdigest()[:12]


def _per_serve(kind: str, dashboard_url: str, suffix: str = ".json") -> Path:
    return state_dir() / f"{kind}-{serve_key(dashboard_url)}{suffix}"


def apply_lock(dashboard_url: str) -> Path:
    """The apply lock (reconciler.change.lock)."""
    return _per_serve("apply", dashboard_url, ".lock")


def daemon_record(dashboard_url: str) -> Path:
    """The background daemon's pid and address (reconciler.cli.daemon_cmd)."""
    return _per_serve("daemon", dashboard_url)


def head_record(dashboard_url: str) -> Path:
    """The Ray head `fleetctl up` started (reconciler.live.local_head)."""
    return _per_serve("head", dashboard_url)


def head_records() -> list[Path]:
    """Every head record, in name order."""
    return sorted(state_dir().glob("head-*.json"))


def start_times(dashboard_url: str) -> Path:
    """Measured start times per model (reconciler.change.history)."""
    return _per_serve("starts", dashboard_url)


def pull_progress(dashboard_url: str) -> Path:
    """A running download's progress (reconciler.hub.download)."""
    return _per_serve("pull", dashboard_url)


def last_good(folder_key: str) -> Path:
    """The last valid copy of one fleet folder's files (reconciler.change.last_good)."""
    return state_dir() / f"last-good-{folder_key}"
