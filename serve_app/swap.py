"""Swap groups at run time: one small Serve deployment (``swap``) that decides who in a group may load.

A swap group's members take turns: at most ``awake`` of them hold their GPUs (or RAM) at once. A
member's engine loads or wakes only after ``acquire()`` here returned a grant; until then the group's
other members stay as they are. ``acquire`` serves a group's callers one at a time, first come first
served (asyncio's lock is FIFO), and holds the group until the granted member calls ``release()``
(its load ended, well or not) or its lease runs out (the member died mid-load). To make room it asks
the members what they are doing (``state()``), and puts the least recently used idle one to sleep or
unloads it (``evict()``, which the member refuses while it has requests in flight: a busy member is
never cut). When every awake member stays busy past the group's ``queue_timeout``, the caller gets
``GroupBusy`` with the reason, which the router answers as a 503.

The members are the truth: nothing here remembers who is awake, so a restarted coordinator carries
on from what the engines say. It is its own application (``swap-groups``, compiled by the
reconciler from ``swap_groups:`` like the rest of the fleet), changed in place through
``user_config`` (docs/contracts.md); members sleeping and waking change no Serve config.
import_path ``serve_app.swap:app``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve import Application, metrics

from serve_app.contract import ENGINE_DEPLOYMENT, SWAP_DEPLOYMENT, SwapGroupConfig, SwapUserConfig

logger = logging.getLogger("ray.serve")

# Member states that hold nothing (serve_app.lifecycle): room for another member.
FREE_STATES = frozenset({"asleep", "unloaded", "failed"})
POLL_S = 0.25  # how often a waiting caller looks again at busy members
STATE_TIMEOUT_S = 10.0
EVICT_TIMEOUT_S = 180.0  # a sleep is ~1 s on a GPU; an unload waits out vLLM's stop grace


class GroupBusy(RuntimeError):
    """No room in the group within its queue_timeout: every awake member had requests in flight."""


@dataclass
class Group:
    awake: int
    members: list[str]
    queue_timeout_s: float | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holder: str | None = None  # the grant token of the member loading now
    swaps: int = 0
    waiting: int = 0


def _group(config: SwapGroupConfig, old: Group | None) -> Group:
    group = Group(config.awake, list(config.members), config.queue_timeout_s)
    if old is not None:  # keep the queue and the lease across an in-place change
        group.lock, group.holder, group.swaps, group.waiting = old.lock, old.holder, old.swaps, old.waiting
    return group


def busy_message(group_name: str, group: Group, model: str, peak: dict[str, int], waited_s: float) -> str:
    """Why ``model`` got no room: each awake member and the most requests it had in flight while it waited."""
    # A member that every look found at 0 was refused by evict() for requests finishing within its
    # quiet time (vLLM's counts read 0 between back-to-back requests): say that, not "0 in flight".
    busy = ", ".join(f"`{m}` (up to {n} request(s) in flight)" if n else f"`{m}` (requests finishing back to back)"
                     for m, n in sorted(peak.items()))
    return (f"`{model}` is in swap group `{group_name}`, where {group.awake} model(s) may be awake at once, "
            f"and every awake one stayed busy: {busy}. Waited {waited_s:.0f} s (queue_timeout "
            f"{group.queue_timeout_s:.0f} s); try again when they finish, or raise swap_groups."
            f"{group_name}.awake if the GPUs hold more.")


@serve.deployment(name=SWAP_DEPLOYMENT)
class SwapGroups:
    """Grants members of each swap group the right to load, making room first."""

    def __init__(self) -> None:
        self._groups: dict[str, Group] = {}
        self._swaps = metrics.Counter(
            "fleet_swaps", "Members of a swap group put to sleep or unloaded to make room for another.",
            tag_keys=("group", "model"))
        self._waits = metrics.Histogram(
            "fleet_swap_wait_seconds", "How long a member waited for room in its swap group.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600], tag_keys=("group",))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        groups = SwapUserConfig.parse(user_config).groups
        self._groups = {name: _group(cfg, self._groups.get(name)) for name, cfg in groups.items()}

    async def acquire(self, group_name: str, model: str, lease_s: float) -> str:
        """Wait (FIFO) until ``model`` may load, making room; a token for ``release``. Raises GroupBusy."""
        group = self._groups.get(group_name)
        if group is None or model not in group.members:
            raise GroupBusy(f"`{model}` is not a member of swap group `{group_name}` in the live fleet "
                            "(is the fleet applied?)")
        t0 = time.monotonic()
        group.waiting += 1
        try:
            await group.lock.acquire()
        finally:
            group.waiting -= 1
        token = uuid.uuid4().hex
        group.holder = token
        try:
            await self._make_room(group_name, group, model, t0)
        except BaseException:
            self._release(group, token)
            raise
        # A member that dies mid-load never calls release: its lease frees the group.
        asyncio.get_running_loop().call_later(lease_s, self._release, group, token)
        self._waits.observe(time.monotonic() - t0, tags={"group": group_name})
        return token

    def release(self, group_name: str, token: str) -> None:
        """The granted member's load or wake ended: the next caller may go."""
        group = self._groups.get(group_name)
        if group is not None:
            self._release(group, token)

    @staticmethod
    def _release(group: Group, token: str) -> None:
        if group.holder == token:
            group.holder = None
            group.lock.release()

    async def _make_room(self, group_name: str, group: Group, model: str, t0: float) -> None:
        busy_since: float | None = None
        peak: dict[str, int] = {}  # the most requests each member had in flight at any look of this wait
        while True:
            states = await self._states([m for m in group.members if m != model])
            holding = {m: s for m, s in states.items() if s is not None and s.get("state") not in FREE_STATES}
            if len(holding) < group.awake:
                return
            for m, s in holding.items():
                peak[m] = max(peak.get(m, 0), int(s.get("in_flight") or 0))
            # least recently used first; those that looked idle at their last look before the others
            order = sorted(holding, key=lambda m: (bool(holding[m].get("in_flight")),
                                                   float(holding[m].get("last_request_at") or 0)))
            for victim in order:
                if holding[victim].get("state") == "awake" and await self._evict(victim):
                    group.swaps += 1
                    self._swaps.inc(tags={"group": group_name, "model": victim})
                    logger.info("swap group %s: %s made room for %s", group_name, victim, model)
                    break
            else:
                # all busy, or going down already: wait, bounded only while they are busy
                transitioning = any(s.get("state") != "awake" for s in holding.values())
                now = time.monotonic()
                busy_since = None if transitioning else (busy_since or now)
                if (busy_since is not None and group.queue_timeout_s is not None
                        and now - busy_since > group.queue_timeout_s):
                    busiest = {m: peak[m] for m in holding}
                    raise GroupBusy(busy_message(group_name, group, model, busiest, now - t0))
                await asyncio.sleep(POLL_S)
                continue

    async def _states(self, models: list[str]) -> dict[str, dict[str, Any] | None]:
        async def one(m: str) -> dict[str, Any] | None:
            try:
                return dict(await asyncio.wait_for(_engine(m).state.remote(), STATE_TIMEOUT_S))
            except Exception as e:  # a replica being replaced: its vLLM went with the old one
                logger.warning("swap: no state from %s (%r); counting it as holding nothing", m, e)
                return None

        return dict(zip(models, await asyncio.gather(*(one(m) for m in models)), strict=True))

    async def _evict(self, model: str) -> bool:
        try:
            return bool(await asyncio.wait_for(_engine(model).evict.remote(), EVICT_TIMEOUT_S))
        except Exception as e:
            logger.warning("swap: %s could not make room: %r", model, e)
            return False

    async def status(self) -> dict[str, Any]:
        """Each group: its settings, members with their states, swaps made, callers waiting."""
        out: dict[str, Any] = {}
        for name, group in sorted(self._groups.items()):
            states = await self._states(group.members)
            out[name] = {
                "awake": group.awake,
                "queue_timeout_s": group.queue_timeout_s,
                "members": {m: (s or {}).get("state", "unknown") for m, s in states.items()},
                "swaps": group.swaps,
                "waiting": group.waiting,
                "loading": group.holder is not None,
            }
        return out


def _engine(model: str) -> Any:
    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model, _check_exists=False)


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: everything is user_config."""
    return SwapGroups.bind()
