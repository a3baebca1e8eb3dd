"""Render a Plan as text (Terraform-like) or as versioned JSON. Reads only the Plan.

`format_*` functions return strings; the CLI decides where they go and whether colour is on
(only on a TTY). Both show env values as fingerprints (reconciler.fleetfiles.redact), never the values.
"""

from __future__ import annotations

import json
from typing import Any

from reconciler.change.diff import Effect
from reconciler.change.plan import Action, Change, Download, Plan, plan_to_dict
from reconciler.fleetfiles.redact import redact_at
from reconciler.fleetfiles.units import format_size

NO_CHANGES = "No changes. The live fleet matches the files."

_COLOURS = {Action.CREATE: "green", Action.UPDATE: "yellow", Action.RESTART: "magenta",
            Action.DELETE: "red", Action.NOOP: "white"}
_HEADLINES = {
    Action.CREATE: "will be created",
    Action.UPDATE: "will be updated in place (its replicas keep running)",
    Action.RESTART: "will be restarted (new replicas, the engine starts again)",
    Action.DELETE: "will be deleted",
}
_EFFECT_NOTES = {Effect.REBUILD_APP: "forces restart", Effect.RESTART_DEPLOYMENT: "forces restart",
                 Effect.RECONFIGURE: "in place", Effect.SCALE: "in place, scale"}


def summary_line(plan: Plan) -> str:
    """e.g. "1 to create, 1 to update in place, 1 to restart, 0 to delete"."""
    return (f"{plan.count(Action.CREATE)} to create, {plan.count(Action.UPDATE)} to update in place, "
            f"{plan.count(Action.RESTART)} to restart, {plan.count(Action.DELETE)} to delete")


def format_text(plan: Plan, *, color: bool = False) -> str:
    lines: list[str] = []
    changed = [c for c in plan.changes if c.action is not Action.NOOP]
    if changed:
        lines += ["Fleet plan: symbols are  + create  ~ update in place  -/+ restart  - delete", ""]
        for c in changed:
            lines += _format_change(c, color)
            lines.append("")
    lines += _format_foreign(plan)
    lines += [_style(f"Warning: {w}", "yellow", color) for w in plan.warnings]
    if plan.warnings:
        lines.append("")
    if changed:
        lines.append(_style(f"Plan: {summary_line(plan)}.", "white", color, bold=True))
    else:
        lines.append(_style(NO_CHANGES, "green", color, bold=True))
    return "\n".join(lines) + "\n"


def _format_change(c: Change, color: bool) -> list[str]:
    colour = _COLOURS[c.action]
    head = f"{c.action.symbol:>3} {c.model}"
    if c.always_on:
        head += " (always on)"
    lines = [_style(head, colour, color, bold=True) + f"  {_HEADLINES[c.action]}"]
    for f in c.fields:
        note = _EFFECT_NOTES[f.effect]
        before, after = redact_at(f.path, f.before), redact_at(f.path, f.after)
        lines.append(f"      {f.path}: {_value(before)} → {_value(after)}  # {note}")
    for r in c.reasons:
        lines.append(f"      why: {r}")
    if c.action is Action.RESTART:
        lines.append(f"      cost: {format_downtime(c.downtime_s)}")
    if c.download is not None:
        lines.append(f"      download: {format_download(c.download)}")
    return lines


def format_download(d: Download) -> str:
    if d.missing is None:
        return f"size unknown ({d.note})" if d.note else "size unknown"
    if d.missing == 0:
        return "already downloaded" + (f" ({format_size(d.total)} in the cache)" if d.total else "") \
            + (f"; {d.note}" if d.note else "")
    if d.missing == d.total:
        return f"{format_size(d.missing)} from the Hub before it starts"
    return (f"{format_size(d.missing)} from the Hub before it starts "
            f"({format_size((d.total or 0) - d.missing)} of {format_size(d.total or 0)} already in the cache)")


def format_downtime(seconds: float | None) -> str:
    if seconds is None:
        return "expected downtime unknown (the model has not started on this fleet yet)"
    return f"expected downtime ~{seconds:.0f} s (its last start on this fleet)"


def _format_foreign(plan: Plan) -> list[str]:
    if not plan.foreign:
        return []
    lines = [f"Apps the fleet does not own (fleet setting foreign_apps: {plan.foreign_apps}):"]
    for f in plan.foreign:
        origin = f"import_path {f.import_path}" if f.import_path else "no REST config"
        lines.append(f"    {f.name} ({origin}): {f.note}")
    return lines + [""]


def _value(v: Any) -> str:
    if v is None:
        return "(unset)"
    return json.dumps(v, sort_keys=True, default=str)


def _style(text: str, colour: str, color: bool, *, bold: bool = False) -> str:
    if not color:
        return text
    import click  # only needed on a terminal

    return click.style(text, fg=colour, bold=bold)


def format_json(plan: Plan) -> str:
    """The versioned machine form: {"format_version": "1", ...}, every env value a fingerprint."""
    return json.dumps(plan_to_dict(plan, redact=True), indent=2, sort_keys=False, default=str) + "\n"
