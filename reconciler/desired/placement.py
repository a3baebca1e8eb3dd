"""Place every model of a fleet on GPUs (or the CPU) and check that it fits. Pure but for reading sizes.

Declared placements are checked (GPU exists, tensor parallel divides the heads, shares on one GPU add
up to at most 1, always-on models fit together, weights fit their share); models without `gpus` are
placed best-fit by their memory estimate. The result is plain data for the compile stage.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from reconciler.desired import tool_parsers
from reconciler.errors import Problem, SpecError, field_path
from reconciler.fleetfiles import estimate, swap_groups
from reconciler.fleetfiles.inventory import GpuInfo, Inventory, discover
from reconciler.fleetfiles.loader import Origins
from reconciler.fleetfiles.spec import DaemonSettings, Fleet, Model, OpenAISettings, RaySettings, Settings, SwapGroup
from reconciler.fleetfiles.swap_groups import Use
from reconciler.fleetfiles.units import format_size

DEFAULT_GPU_SHARE = 0.9  # vLLM's own default gpu_memory_utilization, for a model alone on its GPUs
HEADROOM = 1.25  # weights plus room for KV cache and activations, for automatic placement
# ...but never less than this beyond the weights on each GPU: a GPU engine's CUDA graphs, activations at its
# default batch of tokens, the sampler's logits and a KV cache for one full context. 25 % of a 135M model
# (64 MiB) is far short of that, and vLLM refuses to start when its share cannot hold them.
MIN_RUNTIME = 2**30
SHARE_STEP = 0.01


@dataclass(frozen=True)
class PlacedModel:
    """One model with every default applied and its GPUs decided."""

    name: str
    source: str  # as written, local paths made absolute
    task: Literal["generate", "embed"]
    engine: Mapping[str, Any]
    env: Mapping[str, str]
    gpus: tuple[int, ...]  # () = on the CPU
    node: str | None
    gpu_memory: float | None  # share of each of its GPUs; None on the CPU
    tensor_parallel: int
    always_on: bool
    idle_timeout_s: float | None  # None = never goes down (always_on, or idle_timeout: never)
    unload_after_s: float | None  # asleep → unloaded after this much more idle time; None = stays asleep
    sleep: bool  # on its GPUs, idle goes to vLLM's sleep mode first (False on the CPU)
    start_timeout_s: float
    replicas: int
    weights_bytes: int | None
    placed_by: Literal["declared", "auto", "cpu"]
    tool_parser: str | None = None  # vLLM --tool-call-parser; None = the engine takes no tools
    swap_group: str | None = None
    # What it asks of Ray per GPU (aligned with gpus): its share, or for a swap-group member its
    # part of what the group needs at once (reconciler.fleetfiles.swap_groups). Empty: gpu_memory on each.
    reserved: tuple[float, ...] = ()
    # LoRA adapters served on it, by the model name each is served as: {name: source, local paths absolute}
    adapters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacedFleet:
    models: tuple[PlacedModel, ...]
    inventory: Inventory
    ray: RaySettings
    openai: OpenAISettings
    settings: Settings
    root: str = field(default=".")
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    disabled: tuple[str, ...] = ()  # declared with enabled: false: validated, not placed, not served
    swap_groups: Mapping[str, SwapGroup] = field(default_factory=dict)  # groups with a served member
    notes: tuple[str, ...] = ()  # what fits how, for `fleetctl validate` (swap groups' GPU budgets)


def place(fleet: Fleet, origins: Origins | None = None, root: Path | str = ".",
          inventory: Inventory | None = None) -> PlacedFleet:
    """Decide where each model runs; raise SpecError (every problem, with file:line) when it can't fit."""
    origins = origins or Origins()
    root = Path(root)
    inv = inventory if inventory is not None else discover(fleet.inventory)
    problems: list[Problem] = []

    def problem(path: tuple[str | int, ...], message: str) -> None:
        on_model = len(path) == 2  # a whole model: point at its name
        problems.append(Problem(origins.of(path, key=on_model), field_path(path), message))

    groups = swap_groups.groups_of(fleet)
    swap_groups.check(fleet, problem)
    used: dict[tuple[str | None, int], list[Use]] = defaultdict(list)
    placed: dict[str, PlacedModel] = {}
    # read once: a local folder's safetensors headers, or the Hub's metadata when it answers
    weights = {name: estimate.weights_bytes(m.source, root, m.size) if inv.gpus else m.size
               for name, m in fleet.models.items()}
    auto: list[tuple[str, Model]] = []
    disabled = tuple(name for name, m in fleet.models.items() if not m.enabled)
    for name, model in fleet.models.items():
        if model.gpus is None:
            if model.enabled:
                auto.append((name, model))
            continue
        replicas = model.replicas or fleet.defaults.replicas
        result = _check_declared(name, model, inv, root, weights[name], replicas, problem)
        if result is not None and model.enabled:  # a disabled model's GPUs are checked, not reserved
            placed[name] = _placed(fleet, name, model, root, result, model.node, "declared", weights[name])
            for idx in result[0]:
                used[(model.node, idx)].append(_use(fleet, name, model, result[1]))
    _check_shares(used, fleet, inv, groups, problem)
    for name, model in sorted(auto, key=lambda item: weights[item[0]] or 0, reverse=True):
        if not inv.gpus:  # a CPU box or cluster: Ray puts it on its node, or any node
            placed[name] = _placed(fleet, name, model, root, ((), None), model.node, "cpu", weights[name])
            continue
        auto_result = _auto_place(fleet, name, model, inv, weights[name], used, groups, problem)
        if auto_result is not None:
            node, result = auto_result
            placed[name] = _placed(fleet, name, model, root, result, node, "auto", weights[name])
    if problems:
        raise SpecError(problems)
    ordered = tuple(_reserve(placed[n], used, inv, groups) for n in fleet.models if n in placed)
    served_groups = {g: s for g, s in groups.items() if any(m.swap_group == g for m in ordered)}
    return PlacedFleet(ordered, inv, fleet.ray, fleet.openai, fleet.settings, str(root), fleet.daemon, disabled,
                       served_groups, _notes(used, inv, groups))


def _use(fleet: Fleet, name: str, model: Model, share: float) -> Use:
    sleeps = model.sleep if model.sleep is not None else fleet.defaults.sleep
    return Use(name, share, model.always_on, model.swap_group, sleeps)


def _gpu_bytes(inv: Inventory, node: str | None, idx: int) -> int:
    gpu = inv.find(idx, node)
    return gpu.memory_bytes if gpu else 0


def _reserve(model: PlacedModel, used: Mapping[tuple[str | None, int], list[Use]], inv: Inventory,
             groups: Mapping[str, SwapGroup]) -> PlacedModel:
    """A swap-group member asks Ray for its part of the group's need, not its whole share."""
    if model.swap_group is None or not model.gpus:
        return model
    reserved = tuple(
        swap_groups.reservations(used[(model.node, i)], groups, _gpu_bytes(inv, model.node, i))[model.name]
        for i in model.gpus)
    return replace(model, reserved=reserved)


def _notes(used: Mapping[tuple[str | None, int], list[Use]], inv: Inventory,
           groups: Mapping[str, SwapGroup]) -> tuple[str, ...]:
    warning = inv.warning()
    notes = [warning] if warning else []
    for (node, idx), uses in sorted(used.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        gpu = f"GPU {idx}" if node is None else f"GPU {idx} on node {node!r}"
        for group in sorted({u.group for u in uses if u.group}):
            members = [u for u in uses if u.group == group]
            notes.append(swap_groups.explain(members, group, groups[group].awake, gpu, _gpu_bytes(inv, node, idx)))
        if any(u.group for u in uses):
            total = swap_groups.gpu_load(uses, groups, _gpu_bytes(inv, node, idx))
            notes.append(f"{gpu}: {total:.2f} of 1 needed at once in all")
    return tuple(notes)


def _check_declared(name: str, model: Model, inv: Inventory, root: Path, weights: int | None, replicas: int,
                    problem: Any) -> tuple[tuple[int, ...], float] | None:
    gpus = tuple(model.gpus or ())
    ok = True
    for i, idx in enumerate(gpus):
        if inv.find(idx, model.node) is None:
            where = f" on node {model.node!r}" if model.node else ""
            problem(("models", name, "gpus", i), f"GPU {idx}{where} does not exist; {inv.describe()}")
            ok = False
    if not ok:
        return None
    tp = model.tensor_parallel or len(gpus)
    if tp < len(gpus) and replicas != len(gpus) // tp:
        # the replicas split the listed GPUs, tensor_parallel each: one set per replica, none idle or shared
        problem(("models", name, "replicas"), (
            f"{len(gpus)} gpus with tensor_parallel {tp} make {len(gpus) // tp} sets of GPUs, one per replica, "
            f"but replicas is {replicas}; set replicas: {len(gpus) // tp}, or list {tp * replicas} gpus"))
        return None
    config = estimate.model_config(model.source, root)
    heads = estimate.attention_heads(config) if config else None
    if heads and heads % tp:
        field_name = "tensor_parallel" if model.tensor_parallel else "gpus"
        problem(("models", name, field_name), (
            f"tensor parallel size {tp} does not divide the model's {heads} attention heads; "
            f"use a GPU count that divides {heads}"))
        return None
    share = model.gpu_memory if model.gpu_memory is not None else DEFAULT_GPU_SHARE
    for idx in gpus:
        gpu = inv.find(idx, model.node)
        assert gpu is not None
        if weights is not None and weights / tp > share * gpu.memory_bytes:
            problem(("models", name, "gpu_memory" if model.gpu_memory is not None else "gpus"), (
                f"the weights need {format_size(weights / tp)} per GPU but a share of {share:g} of GPU "
                f"{idx} is {format_size(share * gpu.memory_bytes)}; raise gpu_memory or add GPUs"))
            return None
    return gpus, share


def _check_shares(used: Mapping[tuple[str | None, int], list[Use]], fleet: Fleet, inv: Inventory,
                  groups: Mapping[str, SwapGroup], problem: Any) -> None:
    for (node, idx), users in sorted(used.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        gpu = f"GPU {idx}" if node is None else f"GPU {idx} on node {node!r}"
        always = [(u.name, u.share) for u in users if u.always_on]
        total_always = sum(s for _, s in always)
        total = swap_groups.gpu_load(users, groups, _gpu_bytes(inv, node, idx))
        last = users[-1].name
        if total_always > 1 + 1e-9:
            listed = ", ".join(f"{n} ({s:g})" for n, s in always)
            problem(("models", always[-1][0], "gpu_memory"), (
                f"always-on models {listed} need {total_always:g} of {gpu}; always-on models stay "
                "loaded together, so their shares must add up to at most 1"))
        elif total > 1 + 1e-9:
            path = ("models", last, "gpu_memory") if fleet.models[last].gpu_memory is not None else (
                "models", last, "gpus")
            if not any(u.group for u in users):
                listed = ", ".join(f"{u.name} ({u.share:g})" for u in users)
                problem(path, (f"{gpu} is shared by {listed}: {total:g} of its memory in all, more than 1; "
                               "lower their gpu_memory shares so they add up to at most 1"))
                continue
            plain = ", ".join(f"{u.name} ({u.share:g})" for u in users if u.group is None) or "no other model"
            grouped = "; ".join(swap_groups.explain([u for u in users if u.group == g], g, groups[g].awake, gpu,
                                             _gpu_bytes(inv, node, idx))
                                for g in sorted({u.group for u in users if u.group}))
            problem(path, (f"{gpu} needs {total:.2f} of its memory at once, more than 1: {grouped}; beside "
                           f"them {plain}. Lower gpu_memory shares, or let fewer members of a swap group "
                           "be awake at once"))


def _auto_place(fleet: Fleet, name: str, model: Model, inv: Inventory, weights: int | None,
                used: dict[tuple[str | None, int], list[Use]], groups: Mapping[str, SwapGroup], problem: Any
                ) -> tuple[str | None, tuple[tuple[int, ...], float]] | None:
    """Best fit: the GPU(s) that will have the least memory left over; the error gives the numbers."""
    if weights is None:
        problem(("models", name), (
            "cannot place this model automatically: its size is unknown (no safetensors in a local folder, "
            "and the Hub gave none); set size: (e.g. 16GiB) or gpus: [...]"))
        return None
    tp = model.tensor_parallel or 1
    need = max(weights * HEADROOM / tp, weights / tp + MIN_RUNTIME)
    extra = (f"{int((HEADROOM - 1) * 100)}% for KV cache" if weights * (HEADROOM - 1) / tp >= MIN_RUNTIME
             else f"{format_size(MIN_RUNTIME)} for the engine and its KV cache")
    candidates = [g for g in inv.gpus if model.node is None or g.node == model.node]
    if not candidates:
        problem(("models", name, "node"), (
            f"node {model.node} has no GPUs in the inventory; {inv.describe()}. Declare its cards under "
            "inventory.gpus with node: set, or pick one of the listed nodes"))
        return None
    free = {(g.node, g.index): 1.0 - swap_groups.gpu_load(used[(g.node, g.index)], groups, g.memory_bytes)
            for g in candidates}

    def share_of(g: GpuInfo) -> float:
        return math.ceil(need / g.memory_bytes / SHARE_STEP) * SHARE_STEP

    def left_after(g: GpuInfo) -> float:  # a swap-group member may add less than its share
        return 1.0 - swap_groups.gpu_load([*used[(g.node, g.index)], _use(fleet, name, model, share_of(g))], groups,
                                   g.memory_bytes)
    fitting = [g for g in candidates if left_after(g) >= -1e-9]
    fitting.sort(key=lambda g: (left_after(g) * g.memory_bytes, g.index))
    if len(fitting) < tp or (fitting and len({g.node for g in fitting[:tp]}) > 1):
        best = max(candidates, key=lambda g: free[(g.node, g.index)] * g.memory_bytes)
        most = free[(best.node, best.index)] * best.memory_bytes
        per = " per GPU" if tp > 1 else ""
        problem(("models", name), (
            f"does not fit: it needs {format_size(need)}{per} ({format_size(weights)} of weights"
            f"{f' over {tp} GPUs' if tp > 1 else ''} + {extra}), but the most "
            f"free is {format_size(most)} on GPU {best.index} ({free[(best.node, best.index)]:.2f} of "
            f"{format_size(best.memory_bytes)}); {format_size(need - most)} missing. Free a GPU share, "
            "or set gpus: and gpu_memory: by hand"))
        return None
    chosen = fitting[:tp]
    share = max(share_of(g) for g in chosen)
    for g in chosen:
        used[(g.node, g.index)].append(_use(fleet, name, model, share))
    return chosen[0].node, (tuple(sorted(g.index for g in chosen)), round(share, 4))


def _absolute(source: str, root: Path) -> str:
    """Local paths relative to the fleet's folder become absolute; other sources stay as written."""
    if source.startswith(("./", "../", "~/")):
        return str((root / Path(source).expanduser()).resolve())
    return source


def _placed(fleet: Fleet, name: str, model: Model, root: Path, where: tuple[tuple[int, ...], float | None],
            node: str | None, by: Literal["declared", "auto", "cpu"], weights: int | None) -> PlacedModel:
    d = fleet.defaults
    gpus, share = where
    idle = model.idle_timeout if model.idle_timeout is not None else d.idle_timeout
    start = model.start_timeout if model.start_timeout is not None else d.start_timeout
    unload_after = model.unload_after if model.unload_after is not None else d.unload_after
    sleep = model.sleep if model.sleep is not None else d.sleep
    cpu = d.on_cpu if not gpus else None  # CPU-only settings (float32, eager) never reach a GPU engine
    return PlacedModel(
        name=name,
        source=_absolute(model.source, root),
        task=model.task,
        engine={**d.engine, **(cpu.engine if cpu else {}), **model.engine},
        env={**d.env, **(cpu.env if cpu else {}), **model.env},
        gpus=gpus,
        node=node,
        gpu_memory=share if gpus else None,
        tensor_parallel=(model.tensor_parallel or len(gpus)) if gpus else 1,
        always_on=model.always_on,
        idle_timeout_s=None if math.isinf(idle) or model.always_on else idle,
        unload_after_s=None if math.isinf(unload_after) else unload_after,
        sleep=bool(gpus) and sleep,
        start_timeout_s=start,
        replicas=model.replicas or d.replicas,
        weights_bytes=weights,
        placed_by=by,
        tool_parser=tool_parsers.tool_parser(
            model.source, model.task, model.tool_parser or model.engine.get("tool_call_parser")),
        swap_group=model.swap_group,
        adapters={a: _absolute(src, root) for a, src in sorted(model.adapters.items())},
    )
