"""The daemon's watcher: one batch per save, fleet.d/ followed when it appears, and no inotify watch
on anything but the fleet folder and fleet.d/ (a checkout's .venv holds thousands of folders). No Ray."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from reconciler.loop.watch import watch


def inotify_watches() -> int:
    """inotify watches this process holds (from /proc: one `inotify wd:` line per watch)."""
    total = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            total += Path(f"/proc/self/fdinfo/{fd}").read_text().count("inotify wd:")
        except OSError:
            continue
    return total


def wait_for(seen: list[set[str]], n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {len(seen)} batches: {seen}"
        time.sleep(0.05)


def test_the_watcher_follows_the_fleet_files_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("models: {}\n")
    for i in range(200):  # a virtualenv's worth of folders beside the fleet
        (tmp_path / ".venv" / "lib" / f"pkg{i}").mkdir(parents=True)
    before = inotify_watches()
    seen: list[set[str]] = []
    stop = threading.Event()
    thread = watch(tmp_path, seen.append, stop, debounce_ms=300)
    try:
        time.sleep(1.0)
        assert inotify_watches() - before <= 2  # the folder (and fleet.d/ once it exists), not 200 more
        (tmp_path / ".venv" / "lib" / "pkg1" / "fleet.yaml").write_text("x")  # not a fleet file
        (tmp_path / "fleet.yaml").write_text("models: {a: {}}\n")
        wait_for(seen, 1)
        assert seen[0] == {str(tmp_path / "fleet.yaml")}
        (tmp_path / "fleet.d").mkdir()  # appears later: followed from then on
        wait_for(seen, 2)
        time.sleep(1.0)
        (tmp_path / "fleet.d" / "more.yaml").write_text("models: {}\n")
        wait_for(seen, 3)
        assert str(tmp_path / "fleet.d" / "more.yaml") in seen[-1]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
