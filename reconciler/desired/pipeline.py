"""Fleet files → desired Serve config in one call: load, validate, place, compile. The CLI and daemon use this."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from reconciler.desired.compile import compile_serve_config
from reconciler.desired.placement import PlacedFleet, place
from reconciler.fleetfiles.inventory import Inventory
from reconciler.fleetfiles.validate import LoadedFleet, load_fleet


@dataclass(frozen=True)
class DesiredState:
    loaded: LoadedFleet
    placed: PlacedFleet
    config: dict[str, Any]


def desired_state(path: str | os.PathLike[str] = ".", inventory: Inventory | None = None,
                  root: str | os.PathLike[str] | None = None) -> DesiredState:
    """Raise SpecError (every problem, with file:line) when the files are invalid or do not fit.
    ``root``: where relative model paths resolve, when the files are a kept copy (reconciler.change.last_good)."""
    loaded = load_fleet(path)
    placed = place(loaded.spec, loaded.origins, root if root is not None else loaded.root, inventory)
    return DesiredState(loaded, placed, compile_serve_config(placed))
