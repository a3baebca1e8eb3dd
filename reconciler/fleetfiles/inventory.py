"""The GPUs a fleet can use: from NVML where GPUs exist, else the fleet's declared inventory, else none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from reconciler.fleetfiles.spec import Inventory as DeclaredInventory

InventorySource = Literal["nvml", "declared", "cpu"]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    memory_bytes: int
    node: str | None = None  # the node's IP; None = this box (the head)
    name: str = ""


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GpuInfo, ...]
    source: InventorySource
    ignored: tuple[GpuInfo, ...] = ()  # this box's cards declared in inventory:, unused because NVML found GPUs

    def warning(self) -> str | None:
        """Says that the declared inventory of this box was ignored, and what was used instead."""
        if not self.ignored:
            return None
        found = ", ".join(f"{g.index} ({g.memory_bytes / 2**30:.0f} GiB)" for g in self.gpus if g.node is None)
        return (f"warning: inventory: declares {len(self.ignored)} GPU(s) of this box, ignored because NVML "
                f"found GPUs {found}; placement uses the cards found. Remove inventory: to silence this")

    def find(self, index: int, node: str | None) -> GpuInfo | None:
        return next((g for g in self.gpus if g.index == index and g.node == node), None)

    def describe(self) -> str:
        if not self.gpus:
            return "this box has no GPUs (NVML found none and the fleet declares no inventory)"
        listed = ", ".join(str(g.index) if g.node is None else f"{g.node}:{g.index}" for g in self.gpus)
        origin = "found by NVML" if self.source == "nvml" else "declared in inventory:"
        if self.source == "nvml" and any(g.node for g in self.gpus):
            origin = "this box's found by NVML, other nodes' declared in inventory:"
        return f"GPUs {listed} ({origin})"


def nvml_gpus() -> tuple[GpuInfo, ...]:
    """The local GPUs as NVML reports them; empty when there is no NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return ()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append(GpuInfo(i, int(mem.total), None, name.decode() if isinstance(name, bytes) else name))
        return tuple(out)
    finally:
        pynvml.nvmlShutdown()


def discover(declared: DeclaredInventory | None) -> Inventory:
    """NVML first (the real box), then the declared inventory (planning for another box), else CPU-only."""
    found = nvml_gpus()
    if found:
        # this box's cards (node None: the head), plus the other nodes' cards the fleet declares
        others = tuple(GpuInfo(g.index, g.memory, g.node, g.name or "")
                       for g in (declared.gpus if declared else []) if g.node is not None)
        ignored = tuple(GpuInfo(g.index, g.memory, None, g.name or "")
                        for g in (declared.gpus if declared else []) if g.node is None)
        return Inventory(found + others, "nvml", ignored)
    if declared is not None and declared.gpus:
        return Inventory(tuple(GpuInfo(g.index, g.memory, g.node, g.name or "") for g in declared.gpus),
                         "declared")
    return Inventory((), "cpu")


def nvml_memory() -> dict[int, tuple[int, int]]:
    """GPU index -> (bytes used, bytes total) from NVML; empty where there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no module, no driver, no device: the page just shows no memory bars
        return {}
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            out[i] = (int(mem.used), int(mem.total))
        return out
    finally:
        pynvml.nvmlShutdown()
