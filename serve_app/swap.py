"""Swap groups at run time: one small Serve deployment (``swap``) that schedules each group's members.

A swap group's members take turns: at most ``awake`` of them hold their GPUs (or RAM) at once. Every
request for a member passes here first (``enter``, called by the router that relays it, and ``leave``
when it ended), so the coordinator knows each member's queue and its exact requests in flight, and
decides with serve_app.scheduler who holds a *turn*: a holder is admitted requests; a request for
another member waits until the group swaps (the holder's turn ends once the other waited
``max_wait``, or at once when the holder is idle; then the holder admits nothing new, its requests
in flight finish, it is put to sleep (GPU) or unloaded (CPU, ``evict()``), and the other member is
woken or loaded and its whole queue admitted). So two clients alternating A, B, A, B get runs, not a
swap per request, and a busy member is never cut. Past the group's ``queue_timeout`` a waiting
request is answered 503 with the reason (``enter`` returns it; ``GroupBusy`` for ``acquire``).

Exact in-flight counts, with several routers: each admission is a ticket (a random id) that the
router keeps until the request ends and then gives back (``leave``). Every router also reports
the tickets it holds every 2 s (``report``): a ticket the coordinator lost (it restarted) is adopted
again, and one whose router forgot it (a lost ``leave``, a router that died) is dropped once it is
older than ``SWEEP_S``, or ``ROUTER_STALE_S`` after its router's last report. A request counts from
its admission to its last byte, streams included, whichever router relays it, and no request reaches
an engine without a ticket (the router relays only through ``serve_app.relay``, which asks ``enter``
for every swap member; vLLM's port is not reachable otherwise). The engine's ``evict()`` still
refuses while its vLLM reports requests, a second guard for the seconds after a coordinator restart.

Engines load only after ``acquire()`` here granted them room (a member without a turn, e.g. asked by
``fleetctl load``, first waits for one like a request); ``release()`` ends the grant. Who is awake is
asked of the members (``state()``), never remembered, so a restarted coordinator carries on from what
the engines say. A group may name a ``default`` member, woken (or loaded) once every member has gone
down by itself (idle_timeout), so the next request finds it ready.

Each swap is timed where it happens (waiting for quiet, sleep, wake, routing to the first admitted
request) and kept in ``status()`` (``swap_log``). It is its own application (``swap-groups``),
changed in place through ``user_config`` (docs/contracts.md). import_path ``serve_app.swap:app``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve import Application, metrics

from serve_app import scheduler
from serve_app.contract import ENGINE_DEPLOYMENT, SWAP_DEPLOYMENT, SwapGroupConfig, SwapUserConfig

logger = logging.getLogger("ray.serve")

# Member states that hold nothing (serve_app.lifecycle): room for another member.
FREE_STATES = frozenset({"asleep", "unloaded", "failed"})
POLL_S = 0.25  # how often a caller waiting for room looks again at the members
TICK_S = 0.05  # the scheduler's pace while someone waits or a turn drains (grace and max_wait are timers)
IDLE_TICK_S = 1.0  # and while nothing happens (the default member's check)
DEFAULT_CHECK_S = 2.0  # how often a group with a default member asks its members whether all went down
STATE_TIMEOUT_S = 10.0
EVICT_TIMEOUT_S = 180.0  # a sleep is ~1 s on a GPU; an unload waits out vLLM's stop grace
SWEEP_S = 10.0  # a ticket its router no longer reports is dropped once this old (an admission in transit is ms)
ROUTER_STALE_S = 10.0  # routers report every 2 s; one silent this long is gone, and its tickets with it
LEFT_KEEP_S = 30.0  # tickets given back, remembered so a report sent before the leave does not adopt them again
SWAP_LOG = 50  # swaps kept in status()


class GroupBusy(RuntimeError):
    """No room in the group within its queue_timeout: every awake member had requests in flight."""


@dataclass
class Group:
    """One group: its settings (replaced in place) and the scheduler's state (kept across a change)."""

    config: SwapGroupConfig
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one room-making at a time (evict, acquire)
    holder: str | None = None  # the grant token of the member loading now
    swaps: int = 0
    waiting: int = 0  # acquire() callers queued for the lock
    queues: dict[str, list[float]] = field(default_factory=dict)  # member -> arrival of each queued request
    turns: dict[str, float] = field(default_factory=dict)  # member -> its turn began
    closing: dict[str, dict[str, Any]] = field(default_factory=dict)  # member -> the swap record under way
    ready: set[str] = field(default_factory=set)  # holders whose wake/load is done
    idle_since: dict[str, float] = field(default_factory=dict)
    handovers: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)  # put away, not yet given
    routing: dict[str, dict[str, Any]] = field(default_factory=dict)  # member -> record awaiting its first admission
    log: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=SWAP_LOG))
    changed: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None
    default_checked: float = 0.0

    # settings, short
    @property
    def awake(self) -> int:
        return self.config.awake

    @property
    def members(self) -> list[str]:
        return self.config.members

    @property
    def queue_timeout_s(self) -> float | None:
        return self.config.queue_timeout_s

    def notify(self) -> None:
        """Wake whoever waits on a change of this group (the scheduler's loop, queued requests)."""
        if self.changed is not None and not self.changed.done():
            self.changed.set_result(None)
        self.changed = None

    async def wait_change(self, timeout_s: float) -> None:
        if self.changed is None:
            self.changed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.changed), timeout_s)


@dataclass
class Ticket:
    group: str
    model: str
    router: str
    at: float  # monotonic: admitted (or adopted)


def busy_message(group_name: str, group: Group, model: str, peak: dict[str, int], waited_s: float) -> str:
    """Why ``model`` got no room: each member holding a turn and the most requests it had in flight meanwhile."""
    busy = ", ".join(f"`{m}` (up to {n} request(s) in flight)" if n else f"`{m}` (holding its turn)"
                     for m, n in sorted(peak.items())) or "(none)"
    timeout = group.queue_timeout_s if group.queue_timeout_s is not None else math.inf
    return (f"`{model}` is in swap group `{group_name}`, where {group.awake} model(s) may be awake at once, "
            f"and every awake one stayed busy: {busy}. Waited {waited_s:.0f} s (queue_timeout "
            f"{timeout:.0f} s); try again when they finish, or raise swap_groups."
            f"{group_name}.awake if the GPUs hold more.")


@serve.deployment(name=SWAP_DEPLOYMENT)
class SwapGroups:
    """Schedules each swap group's members (turns, requests admitted, swaps) and grants them the right to load."""

    def __init__(self) -> None:
        self._groups: dict[str, Group] = {}
        self._tickets: dict[str, Ticket] = {}
        self._in_flight: collections.Counter[str] = collections.Counter()  # model -> tickets out
        self._left: dict[str, float] = {}  # ticket -> when it was given back
        self._routers: dict[str, float] = {}  # router replica -> its last report
        self._swaps = metrics.Counter(
            "fleet_swaps", "Members of a swap group put to sleep or unloaded to make room for another.",
            tag_keys=("group", "model"))
        self._waits = metrics.Histogram(
            "fleet_swap_wait_seconds", "How long a member waited for room in its swap group.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600], tag_keys=("group",))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        groups = SwapUserConfig.parse(user_config).groups
        old = self._groups
        self._groups = {}
        for name, cfg in groups.items():
            group = old.get(name) or Group(cfg)
            group.config = cfg  # in place: the queues, turns and the lease carry over
            for gone in set(group.turns) - set(cfg.members):
                group.turns.pop(gone, None)
                group.ready.discard(gone)
            self._groups[name] = group
            group.notify()

    # ---- requests: admitted by turn (the routers call these) ----

    async def enter(self, group_name: str, model: str, router: str) -> dict[str, Any]:
        """Wait until a request for ``model`` may go: {"ticket": id} (give it back with ``leave``), or
        {"busy": why} after the group's queue_timeout. A model the live fleet groups nowhere: {"ticket": None}."""
        group = self._groups.get(group_name)
        self._routers[router] = time.monotonic()
        if group is None or model not in group.members:
            return {"ticket": None}
        self._running(group_name, group)
        t0 = time.monotonic()
        if not scheduler.admits(self._view(group, model)):
            queue = group.queues.setdefault(model, [])
            queue.append(t0)
            group.notify()
            peak: dict[str, int] = {}
            try:
                while not scheduler.admits(self._view(group, model)):
                    for m in group.turns:
                        peak[m] = max(peak.get(m, 0), self._in_flight[m])
                    now = time.monotonic()
                    # bounded while others hold the turns; its own wake or load is bounded by the router's load_timeout
                    if (model not in group.turns and group.queue_timeout_s is not None
                            and now - t0 > group.queue_timeout_s):
                        return {"busy": busy_message(group_name, group, model, peak, now - t0)}
                    await group.wait_change(POLL_S)
            finally:
                queue.remove(t0)
                group.notify()
        return {"ticket": self._admit(group_name, group, model, router)}

    def _admit(self, group_name: str, group: Group, model: str, router: str) -> str:
        now = time.monotonic()
        ticket = uuid.uuid4().hex
        self._tickets[ticket] = Ticket(group_name, model, router, now)
        self._in_flight[model] += 1
        record = group.routing.pop(model, None)
        if record is not None:  # the first request of a turn: the swap's last step, routing
            record["route_s"] = round(now - record.pop("_ready_at"), 4)
            record["admitted_at"] = time.time()
        return ticket

    def leave(self, ticket: str) -> None:
        """A request admitted by ``enter`` ended (answered, failed or abandoned)."""
        self._left[ticket] = time.monotonic()
        self._drop(ticket)

    def _drop(self, ticket: str) -> None:
        t = self._tickets.pop(ticket, None)
        if t is None:
            return
        self._in_flight[t.model] -= 1
        group = self._groups.get(t.group)
        if group is not None:
            if self._in_flight[t.model] <= 0 and not group.queues.get(t.model):
                group.idle_since[t.model] = time.monotonic()
            group.notify()

    def report(self, router: str, tickets: dict[str, list[str]]) -> None:
        """A router's tickets now ({ticket: [group, model]}): adopt unknown ones, drop forgotten old ones."""
        now = time.monotonic()
        self._routers[router] = now
        for ticket, (group_name, model) in tickets.items():
            if ticket not in self._tickets and ticket not in self._left:  # we restarted: it is still in flight
                self._tickets[ticket] = Ticket(group_name, model, router, now)
                self._in_flight[model] += 1
        self._sweep(now, router, set(tickets))
        for name, group in self._groups.items():
            self._running(name, group)

    def _sweep(self, now: float, router: str | None = None, reported: set[str] | None = None) -> None:
        """Drop tickets whose router went silent, and those ``router`` no longer reports (old enough)."""
        for ticket, t in list(self._tickets.items()):
            gone = now - self._routers.get(t.router, t.at) > ROUTER_STALE_S
            forgotten = (t.router == router and reported is not None and ticket not in reported
                         and now - t.at > SWEEP_S)
            if gone or forgotten:
                logger.warning("swap: dropping a ticket of %s from router %s (%s)", t.model, t.router,
                               "router silent" if gone else "no longer reported")
                self._drop(ticket)
        self._left = {k: at for k, at in self._left.items() if now - at < LEFT_KEEP_S}

    # ---- the scheduler's loop, one per group ----

    def _view(self, group: Group, model: str) -> scheduler.View:
        queue = group.queues.get(model)
        return scheduler.View(
            waiting_since=min(queue) if queue else None, in_flight=max(self._in_flight[model], 0),
            turn_since=group.turns.get(model), closing=model in group.closing, ready=model in group.ready,
            idle_since=group.idle_since.get(model, -math.inf))

    def _running(self, name: str, group: Group) -> None:
        if group.task is None or group.task.done():
            group.task = asyncio.get_running_loop().create_task(self._run(name, group))

    async def _run(self, name: str, group: Group) -> None:
        while self._groups.get(name) is group:
            acted = False
            try:
                acted = await self._step(name, group)
            except Exception:  # keep scheduling; the next tick tries again
                logger.exception("swap group %s: scheduling", name)
            if acted:
                continue  # a turn closed or passed: decide again at once (an idle holder is put away now)
            busy = any(group.queues.values()) or group.closing or group.routing
            await group.wait_change(TICK_S if busy else IDLE_TICK_S)

    async def _step(self, name: str, group: Group) -> bool:
        """Decide and carry it out; True when a turn closed, reopened or passed."""
        now = time.monotonic()
        self._sweep(now)
        views = {m: self._view(group, m) for m in group.members}
        decision = scheduler.decide(views, group.awake, group.config.max_wait_s, now)
        for m in decision.reopen:
            group.closing.pop(m, None)
        for m in decision.close:
            waiter = min((w for w in group.members if w not in group.turns and views[w].waiting_since is not None),
                         key=lambda w: views[w].waiting_since or 0.0, default=None)
            group.closing[m] = {"from": m, "for": waiter, "at": time.time(), "_closed": now,
                                "reason": "idle" if views[m].idle else "max_wait"}
            logger.info("swap group %s: %s's turn ends for %s", name, m, waiter)
        put_away_all = True
        for m in decision.put_away:
            put_away_all &= await self._put_away(name, group, m)
        if not put_away_all:
            return False  # refused (its vLLM still has requests): no turn is free yet; the next tick tries again
        for m in decision.grant:
            record = group.handovers.popleft() if group.handovers else {"from": None, "at": time.time(),
                                                                        "reason": "free"}
            self._grant(name, group, m, record)
        acted = bool(decision.close or decision.reopen or decision.put_away or decision.grant)
        if not acted and not any(group.queues.values()):
            await self._default_check(name, group)
        return acted

    async def _put_away(self, name: str, group: Group, model: str) -> bool:
        record = group.closing[model]
        t0 = time.monotonic()
        record["quiet_s"] = round(t0 - record.pop("_closed"), 4)
        async with group.lock:  # not while a member's acquire makes room
            before = (await self._states([model])).get(model) or {}
            t1 = time.monotonic()
            ok = await self._evict(model)
        if not ok:
            record["_closed"] = t0 - record.pop("quiet_s")
            return False
        record["sleep_s"] = round(time.monotonic() - t1, 4)
        record["from_state"] = before.get("state")
        group.closing.pop(model, None)
        group.turns.pop(model, None)
        group.ready.discard(model)
        if before.get("state") not in FREE_STATES:
            group.swaps += 1
            self._swaps.inc(tags={"group": name, "model": model})
        group.handovers.append(record)
        return True

    def _grant(self, name: str, group: Group, model: str, record: dict[str, Any]) -> None:
        group.turns[model] = time.monotonic()
        group.ready.discard(model)
        record["to"] = model
        asyncio.get_running_loop().create_task(self._prepare(name, group, model, record))

    async def _prepare(self, name: str, group: Group, model: str, record: dict[str, Any]) -> None:
        """Wake or load a member whose turn begins, then let its queue go."""
        t0 = time.monotonic()
        try:
            await _engine(model).endpoint.remote()
        except Exception as e:  # its requests meet the reason through the engine's endpoint() (a 503 with it)
            logger.warning("swap group %s: %s did not come up for its turn: %s", name, model, e)
            record["error"] = str(getattr(e, "cause", None) or e)[-300:]
        record["wake_s"] = round(time.monotonic() - t0, 4)
        record["_ready_at"] = time.monotonic()
        record.pop("for", None)
        group.log.append(record)
        # The turn's slice (what max_wait bounds) starts now, when it can serve: counted from the grant,
        # a wake longer than max_wait (a CPU load, a large model) ended the turn as soon as its queue went.
        group.turns[model] = record["_ready_at"]
        group.ready.add(model)
        if group.queues.get(model):
            group.routing[model] = record
        else:
            record.pop("_ready_at")
        logger.info("swap group %s: %s's turn (from %s): %s", name, model, record.get("from"),
                    {k: v for k, v in record.items() if k.endswith("_s")})
        group.notify()

    async def _default_check(self, name: str, group: Group) -> None:
        """Every member went down by itself (idle_timeout): wake the default one, unless it went down last."""
        default = group.config.default
        now = time.monotonic()
        if default not in group.members or now - group.default_checked < DEFAULT_CHECK_S:
            return
        group.default_checked = now
        if any(self._in_flight[m] for m in group.members) or group.holder is not None:
            return
        states = await self._states(group.members)
        if any(s is None or s.get("state") not in FREE_STATES for s in states.values()):
            return
        last = max(group.members, key=lambda m: float((states[m] or {}).get("last_request_at") or 0.0))
        if last == default or any(group.queues.values()):
            return
        group.turns.clear()  # turns of members asleep by their idle rule are stale
        group.ready.clear()
        logger.info("swap group %s: every member idled down; waking the default, %s", name, default)
        self._grant(name, group, default, {"from": None, "at": time.time(), "reason": "default"})

    # ---- loads: room made first (engines call these from their load or wake) ----

    async def acquire(self, group_name: str, model: str, lease_s: float) -> str:
        """Wait (FIFO) until ``model`` may load, making room; a token for ``release``. Raises GroupBusy.

        A member without a turn (``fleetctl load``, a request that reached its engine directly) first
        waits for one, as a request would."""
        group = self._groups.get(group_name)
        if group is None or model not in group.members:
            raise GroupBusy(f"`{model}` is not a member of swap group `{group_name}` in the live fleet "
                            "(is the fleet applied?)")
        self._running(group_name, group)
        t0 = time.monotonic()
        if model not in group.turns:
            await self._await_turn(group_name, group, model, t0)
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

    async def _await_turn(self, group_name: str, group: Group, model: str, t0: float) -> None:
        logger.info("swap group %s: %s's engine asks to come up without a turn (fleetctl load, or a request "
                    "that reached its engine unscheduled); it waits for one as a request does", group_name, model)
        queue = group.queues.setdefault(model, [])
        queue.append(t0)
        group.notify()
        peak: dict[str, int] = {}
        try:
            while model not in group.turns:
                for m in group.turns:
                    peak[m] = max(peak.get(m, 0), self._in_flight[m])
                now = time.monotonic()
                if group.queue_timeout_s is not None and now - t0 > group.queue_timeout_s:
                    raise GroupBusy(busy_message(group_name, group, model, peak, now - t0))
                await group.wait_change(POLL_S)
        finally:
            queue.remove(t0)
            group.notify()

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
        """Put away members that hold no turn (least recently used first) until ``model`` fits."""
        busy_since: float | None = None
        peak: dict[str, int] = {}
        while True:
            states = await self._states([m for m in group.members if m != model])
            holding = {m: s for m, s in states.items() if s is not None and s.get("state") not in FREE_STATES}
            if len(holding) < group.awake:
                return
            for m in holding:
                peak[m] = max(peak.get(m, 0), self._in_flight[m])
            order = sorted((m for m in holding if m not in group.turns and not self._in_flight[m]),
                           key=lambda m: float(holding[m].get("last_request_at") or 0))
            for victim in order:
                if holding[victim].get("state") == "awake" and await self._evict(victim):
                    group.swaps += 1
                    self._swaps.inc(tags={"group": group_name, "model": victim})
                    logger.info("swap group %s: %s made room for %s", group_name, victim, model)
                    break
            else:
                # turn holders, busy ones, or going down already: wait, bounded only while they are busy
                transitioning = any(s.get("state") != "awake" for s in holding.values())
                now = time.monotonic()
                busy_since = None if transitioning else (busy_since or now)
                if (busy_since is not None and group.queue_timeout_s is not None
                        and now - busy_since > group.queue_timeout_s):
                    raise GroupBusy(busy_message(group_name, group, model, {m: peak[m] for m in holding},
                                                 now - t0))
                await asyncio.sleep(POLL_S)

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
        """Each group: settings, members' states, turns, queues, requests in flight, swaps and their timings."""
        out: dict[str, Any] = {}
        for name, group in sorted(self._groups.items()):
            self._running(name, group)
            states = await self._states(group.members)
            out[name] = {
                "awake": group.awake,
                "queue_timeout_s": group.queue_timeout_s,
                "max_wait_s": group.config.max_wait_s,
                "default": group.config.default,
                "members": {m: (s or {}).get("state", "unknown") for m, s in states.items()},
                "turns": {m: "closing" if m in group.closing else ("open" if m in group.ready else "waking")
                          for m in group.turns},
                "queued": {m: len(group.queues.get(m) or []) for m in group.members},
                "in_flight": {m: max(self._in_flight[m], 0) for m in group.members},
                "swaps": group.swaps,
                "waiting": group.waiting + sum(len(q) for q in group.queues.values()),
                "loading": group.holder is not None,
                "swap_log": [{k: v for k, v in r.items() if not k.startswith("_")} for r in group.log],
            }
        return out


def _engine(model: str) -> Any:
    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model, _check_exists=False)


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: everything is user_config."""
    return SwapGroups.bind()
