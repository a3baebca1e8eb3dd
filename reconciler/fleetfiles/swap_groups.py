"""Swap groups in the spec: which models take turns, what a GPU must hold for them, what Ray reserves. Pure.

A swap group's members may together declare more of a GPU than it has, because at most ``awake`` of
them are loaded at once (the coordinator, serve_app/swap.py, makes room before one loads). What a GPU
must hold for a group is therefore its ``awake`` largest shares plus what each other member still
holds there while asleep (vLLM's level-1 sleep frees weights and KV cache, not the CUDA context).
Placement adds that up per GPU instead of the plain sum; compile spreads it over the members as Ray
custom resources, so Serve can schedule every member at once and never more than the card holds.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from reconciler.fleetfiles.spec import Fleet, SwapGroup
from reconciler.fleetfiles.units import format_size

# What an engine asleep at vLLM's sleep level 1 still holds on each of its GPUs: the CUDA context,
# CUDA-graph pools and NCCL buffers stay (vLLM docs: sleep frees weights and KV cache, "up to 90%+"
# of the memory; vLLM issue #32714 saw 1.14 GB per GPU left after level-1 sleep on 0.13; #56373: graph
# pools stay resident). 1.5 GiB is a conservative estimate until measured on the fleet's own cards.
# A member with sleep: false unloads instead and holds nothing.
ASLEEP_HOLDS_BYTES = int(1.5 * 1024**3)
RAY_STEP = 1e-4  # Ray's resource precision: reservations are rounded down to it
DEFAULT_GROUP = SwapGroup()


class Use(NamedTuple):
    """One model's use of one GPU, as placement counts it."""

    name: str
    share: float
    always_on: bool
    group: str | None = None
    sleeps: bool = True  # goes to vLLM sleep (holds ASLEEP_HOLDS_BYTES) rather than unloading


def groups_of(fleet: Fleet) -> dict[str, SwapGroup]:
    """Every group in use or declared, with its settings (an undeclared group gets the defaults)."""
    used = {m.swap_group for m in fleet.models.values() if m.swap_group}
    return {name: fleet.swap_groups.get(name, DEFAULT_GROUP) for name in sorted(used | set(fleet.swap_groups))}


def check(fleet: Fleet, problem: Callable[[tuple[str | int, ...], str], None]) -> None:
    """Report what cannot work: lonely groups (typos), groups nobody joins, awake ≥ members, and
    members that cannot take turns (always_on, several replicas)."""
    declared = Counter(m.swap_group for m in fleet.models.values() if m.swap_group)
    for name, model in fleet.models.items():
        group = model.swap_group
        if group is None:
            continue
        where = ("models", name, "swap_group")
        if model.always_on:
            problem(where, f"an always_on model never leaves awake, so it cannot take turns in swap group "
                           f"{group!r}; remove always_on or swap_group")
        if (model.replicas or fleet.defaults.replicas) > 1:
            problem(where, f"a member of swap group {group!r} runs one replica (the group decides when it "
                           "is loaded); set replicas: 1 or leave the group")
        if declared[group] == 1:
            others = [g for g in declared if g != group] + list(fleet.swap_groups)
            close = difflib.get_close_matches(group, others, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; name the same group on the models that take turns"
            problem(where, f"swap group {group!r} has no other member: a group is models that take turns{hint}")
    for group, settings in fleet.swap_groups.items():
        count = declared[group]
        if count == 0:
            problem(("swap_groups", group), f"no model names swap group {group!r}; add swap_group: {group} to "
                                            "the models that take turns, or remove it")
        elif settings.awake >= count > 1:
            problem(("swap_groups", group, "awake"), (
                f"awake: {settings.awake} but the group has {count} members, so they never take turns; "
                f"lower awake below {count} or remove the group"))
        members = sorted(n for n, m in fleet.models.items() if m.swap_group == group)
        if settings.default is not None and settings.default not in members:
            close = difflib.get_close_matches(settings.default, members, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"name one of {', '.join(members) or '(none)'}"
            problem(("swap_groups", group, "default"), f"{settings.default!r} is not a member of swap group "
                                                       f"{group!r}; {hint}")
        if settings.max_wait >= settings.queue_timeout and not math.isinf(settings.max_wait):
            problem(("swap_groups", group, "max_wait"), (
                f"max_wait ({settings.max_wait:g} s) is not below queue_timeout ({settings.queue_timeout:g} s): "
                "a request would be answered 503 before the group swaps for it; lower max_wait or raise "
                "queue_timeout"))


def asleep_share(gpu_bytes: int) -> float:
    return ASLEEP_HOLDS_BYTES / gpu_bytes if gpu_bytes else 0.0


def group_load(uses: Iterable[Use], awake: int, gpu_bytes: int) -> float:
    """Of one GPU, what a group's members on it need at worst: the ``awake`` largest shares awake,
    the others asleep (holding ASLEEP_HOLDS_BYTES each) or unloaded (nothing)."""
    ordered = sorted(uses, key=lambda u: u.share, reverse=True)
    awake_uses, rest = ordered[:awake], ordered[awake:]
    return sum(u.share for u in awake_uses) + sum(asleep_share(gpu_bytes) for u in rest if u.sleeps)


def gpu_load(uses: Iterable[Use], groups: Mapping[str, SwapGroup], gpu_bytes: int) -> float:
    """Of one GPU, what its models need at worst: plain models their share, each group its group_load."""
    total = 0.0
    by_group: dict[str, list[Use]] = {}
    for u in uses:
        if u.group is None:
            total += u.share
        else:
            by_group.setdefault(u.group, []).append(u)
    for group, group_uses in by_group.items():
        total += group_load(group_uses, groups.get(group, DEFAULT_GROUP).awake, gpu_bytes)
    return total


def reservations(uses: Iterable[Use], groups: Mapping[str, SwapGroup], gpu_bytes: int) -> dict[str, float]:
    """What each model on one GPU asks of Ray (its ``fleet_gpu_<i>``): its share, or for a group's
    member an equal part of the group's load, so every member can be scheduled and the sum stays
    what the GPU must hold."""
    out: dict[str, float] = {}
    by_group: dict[str, list[Use]] = {}
    for u in uses:
        if u.group is None:
            out[u.name] = u.share
        else:
            by_group.setdefault(u.group, []).append(u)
    for group, group_uses in by_group.items():
        load = group_load(group_uses, groups.get(group, DEFAULT_GROUP).awake, gpu_bytes)
        part = math.floor(load / len(group_uses) / RAY_STEP) * RAY_STEP
        for u in group_uses:
            out[u.name] = round(part, 4)
    return out


def explain(uses: list[Use], group: str, awake: int, gpu: str, gpu_bytes: int) -> str:
    """One line for `fleetctl validate`: what the group declares on a GPU and what it needs at once."""
    declared = sum(u.share for u in uses)
    load = group_load(uses, awake, gpu_bytes)
    sleepers = max(0, len(uses) - awake)
    listed = ", ".join(f"{u.name} {u.share:g}" for u in uses)
    asleep = (f" + {sleepers} asleep holding ~{format_size(ASLEEP_HOLDS_BYTES)} each"
              if sleepers and any(u.sleeps for u in uses) else "")
    return (f"swap group {group} on {gpu}: {listed} = {declared:g} declared; {awake} awake at once "
            f"needs {load:.2f} (the {awake} largest{asleep})")
