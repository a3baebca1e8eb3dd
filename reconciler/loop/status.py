"""The status document: per model desired / live / sync / health / state / replicas / GPUs / last
error, in one JSON shape for `fleetctl status --json` and the daemon's ``GET /status``.

Pure: built from the placed fleet, the live state and the plan; the daemon adds its own section.
Carries no configs, and Serve's messages (a replica's traceback may quote its arguments) are
scrubbed of the fleet's env values (reconciler.fleetfiles.redact), so no secret leaks through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.change.plan import Action, Plan
from reconciler.desired.placement import PlacedFleet, PlacedModel
from reconciler.fleetfiles.redact import env_values, scrub
from reconciler.fleetfiles.units import format_size
from reconciler.live.health import STATE_HEALTH, AppHealth, Health, Sync, app_health, worst
from reconciler.live.serve_state import LiveState
from serve_app.contract import ENGINE_IMPORT, SWAP_IMPORT, ModelState

FORMAT_VERSION = "2"
# The lifecycle states a running engine reports (serve_app.lifecycle), shown instead of "ready".
_LIFECYCLE = {s.value for s in (ModelState.LOADING, ModelState.AWAKE, ModelState.SLEEPING, ModelState.ASLEEP,
                                ModelState.WAKING, ModelState.UNLOADING, ModelState.UNLOADED, ModelState.FAILED)}


def model_rows(plan: Plan, live: LiveState, placed: PlacedFleet | None = None,
               runtime: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``runtime``: each model's lifecycle state from the router's /v1/models (awake, unloaded...)."""
    names = [c.model for c in plan.changes] + [f.name for f in plan.foreign
                                                if f.name not in {c.model for c in plan.changes}]
    by_name = {m.name: m for m in placed.models} if placed else {}
    secrets = env_values([plan.put_config, *(c.before for c in plan.changes), *(a.config for a in live.apps.values())])
    rows = []
    for name in names:
        change = plan.change_for(name)
        app = live.apps.get(name)
        cfg = (change.after if change and change.after else None) or (app.config if app else None) or {}
        running = sum(d.running_replicas for d in app.deployments) if app else 0
        target = sum(d.target_num_replicas or 0 for d in app.deployments) if app else 0
        h = app_health(app)
        state, since = h.state.value, None
        lifecycle = (runtime or {}).get(name)
        if h.state is ModelState.READY and lifecycle and lifecycle.get("state") in _LIFECYCLE:
            state, since = lifecycle["state"], lifecycle.get("since")
            h = AppHealth(ModelState(state), STATE_HEALTH[ModelState(state)], str(lifecycle.get("reason") or ""))
        elif lifecycle and lifecycle.get("state") == ModelState.UNAVAILABLE.value:  # the router saw its node go
            state = ModelState.UNAVAILABLE.value
            h = AppHealth(ModelState.UNAVAILABLE, Health.DEGRADED, str(lifecycle.get("reason") or ""))
        if change is None:
            sync = Sync.FOREIGN
        elif change.action is Action.NOOP:
            sync = Sync.SYNCED
        else:
            sync = Sync.OUT_OF_SYNC
        m = by_name.get(name)
        rows.append({
            "model": name,
            "kind": _kind(cfg),
            "task": m.task if m else None,
            "desired": "absent" if change is None or change.after is None else "present",
            "live": app.status if app else "absent",
            "sync": sync.value,
            "pending": change.action.value if change and change.action is not Action.NOOP else None,
            "health": h.health.value,
            "state": state,
            "since": since,
            "replicas": f"{running}/{target}" if app else "0/0",
            "gpus": _gpus(cfg),
            "gpu_memory": m.gpu_memory if m else None,
            "node": m.node if m else None,  # the IP it is pinned to; None = wherever Ray put it
            "always_on": m.always_on if m else False,
            "swap_group": m.swap_group if m else None,
            "message": scrub(h.message, secrets),
            "adapters": _adapters(m, state, runtime or {}, secrets),
        })
    return rows


def _adapters(model: PlacedModel | None, base_state: str, runtime: Mapping[str, Mapping[str, Any]],
              secrets: set[str]) -> list[dict[str, Any]]:
    """A model's LoRA adapters, each with the state the router shows for it (its base's, or loading/failed
    while its base's vLLM lacks it), else its base's state."""
    if model is None:
        return []
    out = []
    for name, source in model.adapters.items():
        seen = runtime.get(name) or {}
        out.append({"name": name, "source": source, "state": seen.get("state") or base_state,
                    "reason": scrub(str(seen.get("reason") or ""), secrets)})
    return out


def _kind(app_config: Mapping[str, Any]) -> str:
    path = app_config.get("import_path")
    if path == ENGINE_IMPORT:
        return "engine"
    if path == SWAP_IMPORT:
        return "swap"
    return "router" if app_config else "foreign"


def _gpus(app_config: Mapping[str, Any]) -> str:
    args = app_config.get("args") or {}
    gpus = args.get("gpus") if isinstance(args, Mapping) else None
    if not gpus:
        return "cpu" if app_config.get("import_path") == ENGINE_IMPORT else "-"
    return ",".join(str(g) for g in gpus)


def document(plan: Plan, live: LiveState, placed: PlacedFleet | None = None,
             runtime: Mapping[str, Mapping[str, Any]] | None = None,
             downloads: Mapping[str, Mapping[str, Any]] | None = None, **sections: Any) -> dict[str, Any]:
    """The whole status document; ``sections`` (e.g. daemon=...) are added at the top level.
    ``downloads``: per model, a running pull's progress (reconciler.hub.download.read_progress)."""
    rows = model_rows(plan, live, placed, runtime)
    overall = worst([Health(r["health"]) for r in rows if r["sync"] != Sync.FOREIGN.value]) \
        if live.serve_running else Health.UNKNOWN
    return {
        "format_version": FORMAT_VERSION,
        "serve_running": live.serve_running,
        "in_sync": not plan.has_changes,
        "health": overall.value,
        "pending_changes": [{"model": c.model, "action": c.action.value, "reasons": list(c.reasons)}
                            for c in plan.changes if c.action is not Action.NOOP],
        "models": rows,
        "starting": [],  # the daemon fills it (with_starts): `fleetctl status` follows no starts
        **sections,
    } | with_downloads(rows, downloads or {})


def with_starts(doc: dict[str, Any], starts: list[dict[str, Any]]) -> dict[str, Any]:
    """The document with each start in progress on its model's row: since when, and what the
    engine is doing (the daemon follows starts across passes; reconciler.change.rollout)."""
    by_model = {s["model"]: s for s in starts}
    rows = []
    for row in doc.get("models") or []:
        s = by_model.get(row["model"])
        rows.append({**row, "starting": {"elapsed_s": s["elapsed_s"], "doing": s["detail"], "action": s["action"]}}
                    if s else row)
    return {**doc, "models": rows, "starting": starts}


def with_downloads(rows: list[dict[str, Any]], downloads: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``downloads`` section, and each model row's ``download`` (None when none runs for it)."""
    for r in rows:
        d = downloads.get(r["model"])
        r["download"] = None if d is None else {
            "state": d.get("state"), "done_bytes": d.get("done"), "total_bytes": d.get("total"),
            "file": d.get("file"), "files_done": d.get("files_done"), "files_total": d.get("files_total")}
    return {"downloads": {name: dict(d) for name, d in downloads.items()}}


def format_table(rows: list[dict[str, Any]]) -> str:
    cols: tuple[str, ...] = ("model", "state", "health", "sync", "replicas", "gpus")
    if any(r.get("swap_group") for r in rows):
        cols += ("swap_group",)
    if any(r.get("node") for r in rows):  # a fleet over several nodes: say where each model is
        cols += ("node",)
    table = [tuple(c.upper() for c in cols)]
    for r in rows:
        table.append(tuple(str(r.get(c) or "-") + (f" ({r['pending']})" if c == "sync" and r.get("pending") else "")
                           for c in cols))
        # each LoRA adapter under its base: a model name of its own, served by the base's engine
        table += [(f"  + {a['name']}", a["state"], *("" for _ in cols[2:])) for a in r.get("adapters") or []]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip() for t in table]
    for r in rows:
        if r["message"]:
            lines.append(f"{r['model']}: {r['message'].strip().splitlines()[-1][:300]}")
        if r.get("download"):
            lines.append(f"{r['model']}: {format_download(r['download'])}")
        lines += [f"{a['name']}: {a['reason'].strip().splitlines()[-1][:300]}" for a in r.get("adapters") or []
                  if a.get("reason")]
    return "\n".join(lines)


def format_download(d: Mapping[str, Any]) -> str:
    done, total = int(d.get("done_bytes") or 0), int(d.get("total_bytes") or 0)
    share = f"{100 * done / total:.0f}%" if total else "?"
    text = f"{d.get('state')} {share} ({format_size(done)} of {format_size(total)})"
    if d.get("state") == "downloading" and d.get("file"):
        text += f", file {int(d.get('files_done') or 0) + 1}/{d.get('files_total')}: {d['file']}"
    return text
