"""The swap scheduler's decisions, pure (no I/O, no clock): who in a swap group holds a turn, and when it ends.

A member that holds a *turn* is admitted requests; at most ``awake`` members hold one. Requests for a
member without a turn wait. A turn ends (the holder *closes*: it admits nothing new, and is put away
once its requests in flight are done) when a waiting member has waited ``max_wait`` since the holder's
turn began (its wake or load done), or at once when the holder is idle (nothing in flight, nothing queued). So two busy
clients asking A, B, A, B… get runs of A, then runs of B, and a request waits at most ``max_wait`` for
a busy member, then one swap (the holder's requests finishing, its sleep, the other's wake).

``TURN_GRACE_S``: a holder that went idle only *after* the other member's request arrived keeps its
turn this much longer (at most ``max_wait``), because a client that asks it back to back sends its
next request a few milliseconds after its answer; without it, two such clients swap per request. A
holder that was idle already when the request came gives way at once (a person switching models
pays no grace). This is a scheduling choice, not a safety margin: a member is never cut, because the
in-flight counts are the routers' own, exact (serve_app.swap), not a guess from vLLM's gauges.

The coordinator (serve_app.swap) keeps the state, calls ``decide`` on every change and on a short
tick, and carries the decision out; tests drive ``decide`` with a fake clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

# Longer than a client's turnaround between two requests (ms on loopback; an agent that parses its
# answer first, tens of ms), short against a swap (~1.5 s on an H100) and the default max_wait (5 s).
TURN_GRACE_S = 0.5


@dataclass(frozen=True)
class View:
    """One member, as the scheduler sees it at one moment (monotonic seconds)."""

    waiting_since: float | None = None  # arrival of its oldest queued request; None: none queued
    in_flight: int = 0  # admitted and not finished: the routers' exact count
    turn_since: float | None = None  # holds a turn since; None: no turn
    closing: bool = False  # its turn is ending: it admits nothing new, and is put away once in_flight is 0
    ready: bool = False  # its turn's wake or load is done: its queue may go
    idle_since: float = -math.inf  # when in_flight and its queue last became empty (meaningful when both are)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiting_since is None


class Decision(NamedTuple):
    """What the coordinator does now; each tuple in the members' name order unless said otherwise."""

    admit: tuple[str, ...] = ()  # turn holders whose queued requests go now
    close: tuple[str, ...] = ()  # holders whose turn ends: no new admissions; put away once drained
    reopen: tuple[str, ...] = ()  # closing holders nobody waits for any more: their turn goes on
    put_away: tuple[str, ...] = ()  # closing holders with nothing in flight: sleep/unload, turn freed
    grant: tuple[str, ...] = ()  # waiting members that get a free turn, longest waiting first


def admits(view: View) -> bool:
    """A request for this member may go now."""
    return view.turn_since is not None and view.ready and not view.closing


def closable(holder: View, waiter: View, max_wait_s: float, now: float, grace_s: float = TURN_GRACE_S) -> bool:
    """Does ``holder``'s turn end for ``waiter``: it waited max_wait since the turn began, or the holder is idle."""
    assert holder.turn_since is not None and waiter.waiting_since is not None
    if not holder.ready or holder.waiting_since is not None:
        return False  # a turn serves its member's whole queue first (with max_wait 0 turns would pass unserved)
    if now - max(waiter.waiting_since, holder.turn_since) >= max_wait_s:
        return True
    if not holder.idle:
        return False
    # idle before the waiter came: nobody is using it; idle since: maybe between two requests of one client
    return holder.idle_since <= waiter.waiting_since or now - holder.idle_since >= min(grace_s, max_wait_s)


def decide(views: Mapping[str, View], awake: int, max_wait_s: float | None, now: float,
           grace_s: float = TURN_GRACE_S) -> Decision:
    """The scheduler's one rule, applied to a whole group at ``now``. ``max_wait_s`` None: never swap while busy."""
    max_wait = math.inf if max_wait_s is None else max_wait_s
    names = sorted(views)
    holders = [m for m in names if views[m].turn_since is not None]
    waiters = sorted((m for m in names if views[m].turn_since is None and views[m].waiting_since is not None),
                     key=lambda m: (views[m].waiting_since, m))
    closing = [m for m in holders if views[m].closing]
    if not waiters:  # nobody to give way to: a closing turn goes on
        return Decision(admit=tuple(m for m in holders if views[m].ready and views[m].waiting_since is not None),
                        reopen=tuple(closing))
    put_away = tuple(m for m in closing if views[m].in_flight == 0)
    free = awake - len(holders) + len(put_away)
    grant = tuple(waiters[:max(free, 0)])
    rest = waiters[len(grant):]
    # every waiter beyond the free turns needs one holder to give way; those draining already count
    need = len(rest) - (len(closing) - len(put_away))
    open_holders = [m for m in holders if not views[m].closing]
    # idle holders first, then the longest turn
    open_holders.sort(key=lambda m: (not views[m].idle, views[m].turn_since, m))
    close: list[str] = []
    for waiter in rest[:max(need, 0)]:
        for holder in open_holders:
            if holder not in close and closable(views[holder], views[waiter], max_wait, now, grace_s):
                close.append(holder)
                break
    admit = tuple(m for m in open_holders if m not in close and admits(views[m]) and views[m].waiting_since is not None)
    return Decision(admit=admit, close=tuple(sorted(close)), put_away=put_away, grant=grant)
