"""Engines sharing a GPU start in turns (serve_app.gpu_turns): real file locks, across processes too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serve_app import gpu_turns


@pytest.fixture(autouse=True)
def locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEET_GPU_LOCK_DIR", str(tmp_path))
    return tmp_path


async def _timeline(starts: list[list[int]], hold_s: float = 0.3) -> list[tuple[str, int]]:
    events: list[tuple[str, int]] = []

    async def engine(i: int, gpus: list[int]) -> None:
        async with gpu_turns.start_turn(gpus):
            events.append(("in", i))
            await asyncio.sleep(hold_s)
            events.append(("out", i))

    await asyncio.gather(*(engine(i, g) for i, g in enumerate(starts)))
    return events


def test_same_gpu_starts_one_at_a_time() -> None:
    events = asyncio.run(_timeline([[0], [0], [0]]))
    # never two "in" without an "out" between them
    assert [kind for kind, _ in events] == ["in", "out"] * 3


def test_other_gpus_and_cpu_engines_do_not_wait() -> None:
    events = asyncio.run(_timeline([[0], [1], []]))
    assert [kind for kind, _ in events[:3]] == ["in", "in", "in"]


def test_tensor_parallel_engines_overlapping_on_one_gpu_take_turns() -> None:
    events = asyncio.run(_timeline([[0, 1], [1, 2]]))
    assert [kind for kind, _ in events] == ["in", "out", "in", "out"]


def test_a_cancelled_wait_and_a_finished_turn_both_let_go() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        async with gpu_turns.start_turn([0]):
            waiter = asyncio.ensure_future(_enter([0], seen, "cancelled"))
            await asyncio.sleep(0.5)
            waiter.cancel()
        await _enter([0], seen, "next")  # would hang if the cancelled waiter had kept the lock
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == ["next"]


async def _enter(gpus: list[int], seen: list[str], label: str) -> None:
    async with gpu_turns.start_turn(gpus):
        seen.append(label)


def test_another_process_holding_the_gpu_makes_us_wait_until_it_dies(locks: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(locks / 'gpu-0.lock')!r}, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "held"
        waited: list[int] = []

        async def scenario() -> None:
            entering = asyncio.ensure_future(_enter([0], [], "x"))
            await asyncio.sleep(0.6)
            assert not entering.done()  # the other process's start holds GPU 0
            holder.kill()  # a crashed start: the kernel drops its lock
            await asyncio.wait_for(entering, 10)

        async def with_notice() -> None:
            async with gpu_turns.start_turn([1], on_wait=waited.append):
                await scenario()

        asyncio.run(with_notice())
        assert waited == []  # GPU 1 was free
    finally:
        holder.kill()
        holder.wait()


def test_replicas_that_split_gpus_each_claim_their_own_set_and_a_dead_ones_set_is_free_again() -> None:
    async def scenario() -> list[list[int]]:
        first, a = await gpu_turns.claim_gpus("chat", [0, 1, 2, 3], 2, first=0)
        second, b = await gpu_turns.claim_gpus("chat", [0, 1, 2, 3], 2, first=0)  # same rank: takes the other
        waited: list[list[int]] = []
        third = asyncio.ensure_future(gpu_turns.claim_gpus("chat", [0, 1, 2, 3], 2, first=1, on_wait=waited.append))
        await asyncio.sleep(0.6)
        assert not third.done() and waited == [[0, 1, 2, 3]]  # every set held: it waits, and says so once
        a.close()  # the replica on GPUs 0, 1 went
        got, c = await asyncio.wait_for(third, 10)
        other, d = await gpu_turns.claim_gpus("embed", [0, 1, 2, 3], 2)  # another model's sets are its own
        for handle in (b, c, d):
            handle.close()
        return [first, second, got, other]

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) == [[0, 1], [2, 3], [0, 1], [0, 1]]
