"""`fleetctl`: the command line. Parses arguments, calls the stages, prints; no logic of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from reconciler.desired.pipeline import desired_state
from reconciler.desired.placement import PlacedFleet
from reconciler.errors import SpecError
from reconciler.fleetfiles.units import format_size

SCHEMA_PATH = Path("schemas") / "fleet.schema.json"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vllm-fleet")
def main() -> None:
    """vLLM Fleet: a fleet of vLLM models on Ray Serve, described in fleet.yaml.

    \b
    Typical flow:
      fleetctl validate      check fleet.yaml + fleet.d/*.yaml (CI-friendly)
      fleetctl up            start Ray if needed, apply the fleet, print the endpoint
      fleetctl plan          what an edit would change on the live fleet
      fleetctl apply         make exactly that change (downloading new hf:// models first)
      fleetctl pull [MODEL]  download hf:// models ahead of time, with progress
      fleetctl status        models, health, replicas, GPUs
      fleetctl daemon        apply every edit, heal drift, serve a status page (up starts it)
      fleetctl load MODEL    load a model now; `fleetctl unload MODEL` frees it (files unchanged)

    Exit codes: 0 success, 1 error (invalid files, Serve unreachable, failed apply),
    2 changes pending (plan --detailed-exitcode), 3 not enough disk space (pull),
    130 interrupted (Ctrl-C).
    """


@main.command()
@click.argument("path", default=".", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON for machines.")
def validate(path: Path, as_json: bool) -> None:
    """Check the fleet files at PATH (a folder with fleet.yaml, or a fleet file).

    Reads fleet.yaml and fleet.d/*.yaml, applies the schema, and places every model on the GPUs
    (NVML's, else the fleet's declared inventory, else the CPU). Lists every error with
    file:line:column and field. Exit 0 when valid, 1 when not.
    """
    try:
        state = desired_state(path)
    except SpecError as e:
        _print_problems(e, as_json)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"valid": True, "errors": [], "files": list(state.loaded.files),
                               "inventory": state.placed.inventory.source,
                               "disabled": list(state.placed.disabled),
                               "swap_groups": {g: {"awake": sg.awake, "queue_timeout_s": sg.queue_timeout}
                                               for g, sg in state.placed.swap_groups.items()},
                               "notes": list(state.placed.notes),
                               "models": [_model_json(state.placed, i) for i in range(len(state.placed.models))]},
                              indent=2))
        return
    click.echo(click.style("Valid: ", fg="green", bold=True) + _summary(state.placed, state.loaded.files))
    click.echo(format_placement(state.placed))
    for note in state.placed.notes:  # how swap groups fit: what is declared, what is needed at once
        click.echo(note)
    if state.placed.disabled:
        click.echo(f"Not served (enabled: false): {', '.join(state.placed.disabled)}")


def _print_problems(e: SpecError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"valid": False, "errors": [p.as_dict() for p in e.problems]}, indent=2))
        return
    for p in e.problems:
        click.echo(click.style("error: ", fg="red", bold=True) + str(p), err=True)
    n = len(e.problems)
    click.echo(f"{n} error{'s' if n != 1 else ''}; the live fleet is unchanged.", err=True)


def _summary(placed: PlacedFleet, files: tuple[str, ...]) -> str:
    n = len(placed.models)
    where = {"nvml": "GPUs found by NVML", "declared": "the declared GPU inventory",
             "cpu": "no GPUs: models run on the CPU"}[placed.inventory.source]
    return f"{n} model{'s' if n != 1 else ''} in {', '.join(files)} ({where})"


def format_placement(placed: PlacedFleet) -> str:
    grouped = any(m.swap_group for m in placed.models)
    rows = [("MODEL", "TASK", "GPUS", "SHARE", "TP", "WEIGHTS", "ALWAYS ON", "PLACED", *(["SWAP GROUP"] * grouped))]
    for m in placed.models:
        rows.append((m.name, m.task, ",".join(map(str, m.gpus)) or "cpu",
                     f"{m.gpu_memory:g}" if m.gpu_memory is not None else "-", str(m.tensor_parallel),
                     format_size(m.weights_bytes) if m.weights_bytes else "?", "yes" if m.always_on else "",
                     m.placed_by, *([m.swap_group or ""] * grouped)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _model_json(placed: PlacedFleet, i: int) -> dict[str, object]:
    m = placed.models[i]
    return {"name": m.name, "task": m.task, "source": m.source, "gpus": list(m.gpus), "node": m.node,
            "gpu_memory": m.gpu_memory, "tensor_parallel": m.tensor_parallel, "always_on": m.always_on,
            "idle_timeout_s": m.idle_timeout_s, "replicas": m.replicas, "weights_bytes": m.weights_bytes,
            "placed_by": m.placed_by, "swap_group": m.swap_group,
            "ray_reserved": list(m.reserved) or None}


@main.command()
@click.option("--output", "-o", type=click.Path(path_type=Path), default=SCHEMA_PATH, show_default=True,
              help="Where to write the JSON Schema; '-' for standard output.")
def schema(output: Path) -> None:
    """Write the JSON Schema of fleet files (editors use it via the modeline in fleet.yaml)."""
    from reconciler.fleetfiles.schema import fleet_schema_text

    text = fleet_schema_text()
    if str(output) == "-":
        click.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    click.echo(f"wrote {output}")


def _register_ops() -> None:
    """The other commands live in modules of their own. A broken import fails loudly here: a CLI
    silently missing plan/apply would be worse than a traceback naming the broken module."""
    from reconciler.cli.daemon_cmd import daemon_cmd
    from reconciler.cli.init_cmd import init_cmd
    from reconciler.cli.lifecycle_cmd import COMMANDS as LIFECYCLE_COMMANDS
    from reconciler.cli.ops import COMMANDS
    from reconciler.cli.pull_cmd import pull_cmd

    for cmd in [*COMMANDS, daemon_cmd, pull_cmd, *LIFECYCLE_COMMANDS, init_cmd]:
        main.add_command(cmd)


_register_ops()
