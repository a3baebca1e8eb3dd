"""The plan: what apply will change on the live Serve, as plain frozen data.

`make_plan(desired_config, live_state, foreign_apps=...)` pairs and diffs (reconciler.change.diff) and
records one Change per app with its action and the reasons; it does no I/O. A plan carries
fingerprints of the desired config and of the live configs, so a saved plan can be refused
when either moved since, and the exact body apply will PUT. Reasons explain; they never decide.
Renderers (reconciler.change.render) read only this; `plan_to_dict` / `plan_from_dict` are the
versioned JSON form used by `plan --json` and by saved plan files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from reconciler.change import diff
from reconciler.change.diff import Action
from reconciler.fleetfiles import redact as redact_mod
from reconciler.live.serve_state import LiveState
from serve_app.contract import LORA_FLAG

FORMAT_VERSION = "1"
FOREIGN_KEEP = "keep"
FOREIGN_DELETE = "delete"


@dataclass(frozen=True)
class Download:
    """What apply fetches from the Hub before it touches Serve for one model: its files' total and
    the bytes not yet in the cache. ``note`` says why the size is unknown (then ``missing`` is None)."""

    source: str
    total: int | None
    missing: int | None
    note: str = ""


@dataclass(frozen=True)
class Change:
    """One app (a model, or the router): what happens to it and why."""

    action: Action
    model: str
    before: Mapping[str, Any] | None  # live deployed_app_config
    after: Mapping[str, Any] | None  # desired app config
    reasons: tuple[str, ...] = ()
    fields: tuple[diff.FieldChange, ...] = ()
    always_on: bool = False
    # For a restart: how long the model was down last time it started on this fleet (its measured
    # start time), None when it never started here. A cost, for the reader; it decides nothing.
    downtime_s: float | None = None
    # For a created or restarted hf:// model: what apply downloads first (reconciler.hub.download fills it).
    download: Download | None = None

    @property
    def restart_fields(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.fields if f.effect.restarts)


@dataclass(frozen=True)
class Foreign:
    """A live app the fleet does not own, and what this plan does with it."""

    name: str
    import_path: str | None
    disposition: str  # "keep" or "delete"
    note: str = ""


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]  # every app, no-ops included, in desired order then live-only
    foreign: tuple[Foreign, ...]
    foreign_apps: str
    put_config: Mapping[str, Any]  # the exact body apply PUTs
    desired_fingerprint: str
    live_fingerprint: str
    warnings: tuple[str, ...] = ()

    @property
    def has_changes(self) -> bool:
        return any(c.action is not Action.NOOP for c in self.changes)

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action is action)

    def change_for(self, model: str) -> Change | None:
        return next((c for c in self.changes if c.model == model), None)


def make_plan(desired_config: Mapping[str, Any], live: LiveState, *,
              foreign_apps: str = FOREIGN_KEEP, start_times: Mapping[str, float] | None = None,
              disabled: Collection[str] = ()) -> Plan:
    """Decide, purely, what apply will do. ``start_times``: each model's last measured start (s);
    ``disabled``: models declared with enabled: false (their deletion says so)."""
    if foreign_apps not in (FOREIGN_KEEP, FOREIGN_DELETE):
        raise ValueError(f"foreign_apps must be keep or delete, not {foreign_apps!r}")
    live_configs = live.configs()
    pairs = diff.pair(desired_config.get("applications") or [], live_configs)
    changes: list[Change] = []
    foreign: list[Foreign] = []
    kept: list[Mapping[str, Any]] = []
    for p, d in zip(pairs, diff.diff_pairs(pairs), strict=True):
        if d.foreign:
            f = _foreign(p, foreign_apps)
            foreign.append(f)
            if f.disposition == FOREIGN_KEEP:
                if p.live is not None:
                    kept.append(p.live)
                continue
            if p.live is None:
                continue  # a PUT cannot remove a serve.run app; the note says so
        changes.append(_change(p, d, (start_times or {}).get(p.name), p.name in disabled))
    # Shared, not copied: plans are read-only data, and copying 200 apps costs more than planning.
    put_config = {**desired_config,
                  "applications": [*(desired_config.get("applications") or []), *kept]}
    return Plan(
        changes=tuple(changes),
        foreign=tuple(foreign),
        foreign_apps=foreign_apps,
        put_config=put_config,
        desired_fingerprint=fingerprint_desired(desired_config),
        live_fingerprint=fingerprint_live(live),
        warnings=tuple(_global_warnings(desired_config, live)),
    )


def _change(p: diff.Pair, d: diff.AppDiff, start_s: float | None, disabled: bool = False) -> Change:
    action = d.action
    reasons = ("disabled in the fleet files (enabled: false)",) if disabled and action is Action.DELETE \
        else _reasons(action, d)
    return Change(action=action, model=p.name, before=p.live, after=p.desired,
                  reasons=reasons, fields=d.fields,
                  always_on=is_always_on(p.desired or p.live),
                  downtime_s=start_s if action is Action.RESTART else None)


def _reasons(action: Action, d: diff.AppDiff) -> tuple[str, ...]:
    if action is Action.CREATE:
        return ("new in the fleet files",)
    if action is Action.DELETE:
        return (("not the fleet's app, and the fleet setting foreign_apps is delete",) if d.foreign
                else ("no longer in the fleet files",))
    if action is Action.RESTART:
        # Only the fields that force the restart explain it; the rest ride along (adapters are named).
        return tuple(dict.fromkeys([*_lora_switch(d), *(diff.why(f) for f in d.fields if f.effect.restarts),
                                    *_adapter_reasons(d, after_restart=True)]))
    # an adapter's own sentence stands for its field's generic one
    return tuple(dict.fromkeys([*_adapter_reasons(d), *(diff.why(f) for f in d.fields
                                                        if not f.path.startswith(_ADAPTERS))]))


# An engine's adapters ride in its user_config (contract.EngineUserConfig.adapters): one field per adapter.
_ADAPTERS = "deployments.engine.user_config.adapters."


def _adapter_reasons(d: diff.AppDiff, after_restart: bool = False) -> list[str]:
    """One reason per adapter added, removed or moved to another source: all in place (vLLM's runtime loading)."""
    out = []
    for f in d.fields:
        if not f.path.startswith(_ADAPTERS):
            continue
        name = f.path.removeprefix(_ADAPTERS)
        if f.before is None:
            out.append(f"adapter added {name}" + (" (loaded once the engine is up)" if after_restart else
                                                  " (in place: loaded into the running vLLM, no restart)"))
        elif f.after is None:
            out.append(f"adapter removed {name}" + ("" if after_restart else
                                                    " (in place: unloaded from the running vLLM, no restart)"))
        else:
            out.append(f"adapter {name} changed source" + ("" if after_restart else
                                                           " (in place: loaded again from its new source)"))
    return out


def _lora_switch(d: diff.AppDiff) -> list[str]:
    """Why adding the first adapter (or removing the last) restarts: vLLM turns LoRA on only at start."""
    for f in d.fields:
        if f.path == "args.engine_argv":
            had, has = LORA_FLAG in (f.before or []), LORA_FLAG in (f.after or [])
            if has and not had:
                return [f"its first adapter turns LoRA on ({LORA_FLAG}), which vLLM takes only at start; "
                        "later adapters load in place"]
            if had and not has:
                return [f"its last adapter is gone, which turns LoRA off ({LORA_FLAG}) at a restart"]
    return []


def _foreign(p: diff.Pair, foreign_apps: str) -> Foreign:
    import_path = p.live.get("import_path") if p.live else None
    if p.live is None:
        return Foreign(p.name, None, FOREIGN_KEEP,
                       "deployed with serve.run, not through the REST API: a PUT leaves it alone")
    if foreign_apps == FOREIGN_KEEP:
        return Foreign(p.name, import_path, FOREIGN_KEEP,
                       "kept as it is (fleet setting foreign_apps: keep); apply re-sends its config")
    return Foreign(p.name, import_path, FOREIGN_DELETE, "deleted (fleet setting foreign_apps: delete)")


def _global_warnings(desired_config: Mapping[str, Any], live: LiveState) -> list[str]:
    return [f"{path} differs from the running Serve, which ignores changes to it; "
            "restart Serve (fleetctl down, then up) to change it"
            for path in diff.global_changes(desired_config, live.globals)]


def is_always_on(app: Mapping[str, Any] | None) -> bool:
    if not app:
        return False
    return any(((dep.get("user_config") or {}).get("always_on") is True)
               for dep in app.get("deployments") or [] if isinstance(dep.get("user_config"), Mapping))


# ---- fingerprints -------------------------------------------------------------------------

def _canonical(value: Any) -> Any:
    """Integral floats become ints, so 1 and 1.0 (Serve's pydantic turns one into the other)
    fingerprint the same."""
    t = type(value)
    if t is float and value.is_integer():
        return int(value)
    if t is dict:
        return {str(k): _canonical(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [_canonical(v) for v in value]
    return value


def _digest(value: Any) -> str:
    text = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def fingerprint_desired(desired_config: Mapping[str, Any]) -> str:
    return _digest(desired_config)


def app_fingerprint(app_config: Mapping[str, Any]) -> str:
    """One app's config, normalised as the diff sees it: equal when Serve would change nothing."""
    return _digest(diff.normalize_app(app_config))


def fingerprint_live(live: LiveState) -> str:
    """Only the configs count: a status moving from DEPLOYING to RUNNING does not stale a plan."""
    return _digest({name: diff.normalize_app(c) if c is not None else None
                    for name, c in sorted(live.configs().items())})


# ---- the versioned JSON form --------------------------------------------------------------

def plan_to_dict(plan: Plan, *, redact: bool = False) -> dict[str, Any]:
    """The versioned JSON form. ``redact=True`` for anything a person or a log sees (`plan --json`): every
    env value becomes its fingerprint (reconciler.fleetfiles.redact), as in saved plan files: apply gives a saved
    plan its values back from the fleet files (``with_values_of``), checking every fingerprint."""
    shown = redact_mod.redact_config if redact else _same
    return {
        "format_version": FORMAT_VERSION,
        "summary": {a.value: plan.count(a) for a in Action if a is not Action.NOOP},
        "has_changes": plan.has_changes,
        "foreign_apps": plan.foreign_apps,
        "changes": [_change_to_dict(c, redact) for c in plan.changes],
        "foreign": [{"name": f.name, "import_path": f.import_path, "disposition": f.disposition,
                     "note": f.note} for f in plan.foreign],
        "warnings": list(plan.warnings),
        "fingerprints": {"desired": plan.desired_fingerprint, "live": plan.live_fingerprint},
        "put_config": shown(plan.put_config),
    }


def _same(value: Any) -> Any:
    return value


def _change_to_dict(c: Change, redact: bool = False) -> dict[str, Any]:
    shown = redact_mod.redact_config if redact else _same
    at = redact_mod.redact_at if redact else _same_at
    return {
        "model": c.model,
        "action": c.action.value,
        "always_on": c.always_on,
        "reasons": list(c.reasons),
        "restart_fields": list(c.restart_fields),
        "fields": [{"path": f.path, "before": at(f.path, f.before), "after": at(f.path, f.after),
                    "effect": f.effect.value} for f in c.fields],
        "expected_downtime_s": c.downtime_s,
        "download": ({"source": c.download.source, "total_bytes": c.download.total,
                      "missing_bytes": c.download.missing, "note": c.download.note} if c.download else None),
        "before": shown(c.before),
        "after": shown(c.after),
    }


def _same_at(_path: str, value: Any) -> Any:
    return value


class PlanFormatError(ValueError):
    """A saved plan this version cannot read."""


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    if data.get("format_version") != FORMAT_VERSION:
        raise PlanFormatError(f"saved plan has format_version {data.get('format_version')!r}; "
                              f"this fleetctl reads {FORMAT_VERSION!r}")
    try:
        return Plan(
            changes=tuple(_change_from_dict(c) for c in data["changes"]),
            foreign=tuple(Foreign(f["name"], f.get("import_path"), f["disposition"], f.get("note", ""))
                          for f in data.get("foreign", [])),
            foreign_apps=data["foreign_apps"],
            put_config=data["put_config"],
            desired_fingerprint=data["fingerprints"]["desired"],
            live_fingerprint=data["fingerprints"]["live"],
            warnings=tuple(data.get("warnings", [])),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PlanFormatError(f"saved plan is incomplete or damaged: {e!r}") from e


def _change_from_dict(c: Mapping[str, Any]) -> Change:
    return Change(
        action=Action(c["action"]), model=c["model"], before=c.get("before"), after=c.get("after"),
        reasons=tuple(c.get("reasons", [])),
        fields=tuple(diff.FieldChange(f["path"], f.get("before"), f.get("after"), diff.Effect(f["effect"]))
                     for f in c.get("fields", [])),
        always_on=bool(c.get("always_on", False)),
        downtime_s=c.get("expected_downtime_s"),
        download=(Download(d["source"], d.get("total_bytes"), d.get("missing_bytes"), d.get("note", ""))
                  if isinstance(d := c.get("download"), Mapping) else None),
    )


def with_values_of(saved: Plan, fresh: Plan) -> Plan:
    """A plan saved with ``plan_to_dict(plan, redact=True)`` (no env value on disk), given back the values
    of ``fresh``: the plan made now from the same files and the same live Serve (the caller has checked
    both fingerprints). Every fingerprint in the saved plan must match the fresh value it stands for,
    else PlanFormatError; what is applied is still exactly the saved plan."""
    mismatch = PlanFormatError("the saved plan's env fingerprints do not match the fleet files; "
                               "run `fleetctl plan -out FILE` again")
    if redact_mod.redact_config(fresh.put_config) != _json(saved.put_config):
        raise mismatch
    changes = []
    for c in saved.changes:
        f = fresh.change_for(c.model)
        if f is None or _json(_change_to_dict(f, True)) != _json(_change_to_dict(c)):
            raise mismatch
        changes.append(replace(c, before=f.before, after=f.after, fields=f.fields))
    return replace(saved, put_config=fresh.put_config, changes=tuple(changes))


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
