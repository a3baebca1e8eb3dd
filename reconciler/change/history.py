"""Measured start times of each model on this fleet, kept with the other state files (reconciler.state_files).

Apply records how long each created or restarted model took from the PUT to healthy; the plan
shows the last one as a restart's expected downtime. One small JSON file per Serve instance.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler import state_files

KEEP = 10  # starts remembered per model


@dataclass(frozen=True)
class Starts:
    by_model: Mapping[str, list[list[float]]] = field(default_factory=dict)  # model -> [[at, seconds], ...]

    def latest(self) -> dict[str, float]:
        return {m: runs[-1][1] for m, runs in self.by_model.items() if runs}


def load(dashboard_url: str) -> Starts:
    try:
        data = json.loads(state_files.start_times(dashboard_url).read_text())
    except (OSError, ValueError):
        return Starts()
    return Starts(data) if isinstance(data, dict) else Starts()


def record(dashboard_url: str, seconds: Mapping[str, float]) -> None:
    """Add measured starts (model -> seconds); atomic, so a reader never sees half a file."""
    if not seconds:
        return
    data = {m: list(runs) for m, runs in load(dashboard_url).by_model.items()}
    for model, s in seconds.items():
        data[model] = (data.get(model, []) + [[time.time(), round(s, 1)]])[-KEEP:]
    path = state_files.start_times(dashboard_url)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
