"""Watch a fleet's files (fleet.yaml, fleet.d/*.yaml) and call back once per burst of changes.

watchfiles debounces in Rust: an editor's atomic save or a `git pull` touching ten files within
the debounce window arrives as one batch, hence one callback. Runs in its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import watchfiles

from reconciler.fleetfiles.loader import FLEET_DIR, FLEET_FILE

# A batch ends after QUIET_MS without a change (at most DEBOUNCE_MS after its first): enough to
# join a save's write+rename, or a checkout's files, even on a loaded box.
QUIET_MS = 200
DEBOUNCE_MS = 2000


def is_fleet_file(root: Path, path: str) -> bool:
    p = Path(path)
    if p.parent == root:
        return p.name == FLEET_FILE
    return p.parent == root / FLEET_DIR and p.suffix in (".yaml", ".yml")


def watch(root: Path, on_change: Callable[[set[str]], None], stop: threading.Event,
          debounce_ms: int = DEBOUNCE_MS) -> threading.Thread:
    """Start a thread calling ``on_change(paths)`` per debounced batch, until ``stop`` is set.

    Only the fleet folder itself and its fleet.d/ are watched, neither recursively: the folder may be
    a checkout holding a virtualenv or model files, thousands of directories that would each cost an
    inotify watch (an LXC container's limit is often 8192). fleet.d/ appearing or going starts a new
    watch that follows it."""
    root = root.resolve()
    extra = root / FLEET_DIR

    def wanted(_change: watchfiles.Change, path: str) -> bool:
        return is_fleet_file(root, path) or Path(path) == extra

    def run() -> None:
        while not stop.is_set():
            paths = [root, *([extra] if extra.is_dir() else [])]
            try:
                for changes in watchfiles.watch(*paths, watch_filter=wanted, debounce=debounce_ms, step=QUIET_MS,
                                                stop_event=stop, rust_timeout=1000, yield_on_timeout=False,
                                                recursive=False):
                    on_change({p for _c, p in changes})
                    if extra.is_dir() != (extra in paths):
                        break  # fleet.d came or went: watch anew
            except (OSError, RuntimeError):  # a watched folder removed under the watcher
                stop.wait(1.0)

    thread = threading.Thread(target=run, name="fleet-watch", daemon=True)
    thread.start()
    return thread
