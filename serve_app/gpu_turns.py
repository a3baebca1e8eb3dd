"""Engines that share a GPU start one at a time on their node.

vLLM sizes its KV cache at start from the GPU's free memory, measured device-wide: it profiles a
forward pass and counts whatever else appeared on the device meanwhile as its own overhead. Two
engines starting together on one GPU therefore see each other's allocations, and the second one
either gets a much smaller cache than its ``gpu_memory`` share or fails with "No available memory
for the cache blocks". Once an engine is healthy its memory is fixed, so starting in turns is
enough. A lock file per GPU on the node (the GPU is physical: fleets on one box share it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)
POLL_S = 0.2


def lock_dir() -> Path:
    path = Path(os.environ.get("FLEET_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / "vllm-fleet-gpu-locks"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.asynccontextmanager
async def start_turn(gpus: list[int], on_wait: Callable[[int], None] | None = None) -> AsyncIterator[None]:
    """Hold the start lock of each of ``gpus`` (taken in index order, so two engines never wait on
    each other) until the block ends. Polls without blocking a thread, so a cancelled start lets go
    at once; the kernel drops a lock whose holder died, so a crashed start never blocks the GPU."""
    handles: list[IO[str]] = []
    try:
        for gpu in sorted(set(gpus)):
            handle = open(lock_dir() / f"gpu-{gpu}.lock", "a")  # noqa: SIM115 -- closed in finally
            handles.append(handle)
            if not _try_lock(handle):
                if on_wait:
                    on_wait(gpu)
                while not _try_lock(handle):
                    await asyncio.sleep(POLL_S)
        yield
    finally:
        for handle in handles:
            handle.close()  # closing the file releases its lock


async def claim_gpus(model: str, gpus: list[int], per_replica: int, first: int = 0,
                     on_wait: Callable[[list[int]], None] | None = None) -> tuple[list[int], IO[str]]:
    """One replica's own ``per_replica`` of a model's ``gpus``, for replicas that split them.

    The sets are ``gpus`` in order, ``per_replica`` each. A replica holds its set's lock file for
    its whole life (the returned handle: close it to let go); the kernel drops it when the replica
    dies, so a replaced replica finds its predecessor's set free. It tries the ``first``-th set
    first (its Serve rank, so replicas starting together rarely race for one) and waits while every
    set is held, e.g. by an old replica still stopping during a restart.
    """
    sets = [gpus[i:i + per_replica] for i in range(0, len(gpus), per_replica)]
    start = first % len(sets)
    order = sets[start:] + sets[:start]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    told = False
    while True:
        for gpu_set in order:
            handle = open(lock_dir() / f"replica-{name}-gpus-{'-'.join(map(str, gpu_set))}.lock", "a")  # noqa: SIM115
            if _try_lock(handle):
                return gpu_set, handle
            handle.close()
        if not told and on_wait:
            on_wait(gpus)
            told = True
        await asyncio.sleep(POLL_S)
