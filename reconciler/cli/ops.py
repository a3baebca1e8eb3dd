"""`fleetctl plan / apply / status / up / down`: parse arguments, call the stages, print.

The work is the stages': the plan comes from reconciler.change.plan, text from
reconciler.change.render, changes to Serve from reconciler.loop.reconcile, the local Ray head
`up` starts and `down` stops from reconciler.live.local_head. The one choice made here is which
fleet a command about a running fleet means when its files are invalid (``resolve_fleet``: the
last good copy, else the head `up` recorded). Exit codes: 0 success (plan: no changes), 1 error,
2 changes (plan --detailed-exitcode). Errors print as one `error: ...` line each on stderr.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from reconciler import state_files
from reconciler.change import capacity, last_good, render
from reconciler.change.plan import Action, Plan, PlanFormatError, make_plan, plan_from_dict, plan_to_dict
from reconciler.desired.pipeline import DesiredState, desired_state
from reconciler.errors import Problem, SpecError
from reconciler.fleetfiles.loader import fleet_root
from reconciler.hub import download
from reconciler.live import local_head
from reconciler.live import serve_state as live_mod
from reconciler.live.cluster import HeadError
from reconciler.loop import status as status_mod
from reconciler.loop.reconcile import Approve, Outcome, Result, plan_for, reconcile

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"  # ray.dashboard_url's default (reconciler.fleetfiles.spec)
PLAN_FILE_KIND = "vllm-fleet-plan"


@dataclass(frozen=True)
class Desired:
    """What the files say, with the settings plan/apply need."""

    config: dict[str, Any]
    dashboard_url: str
    foreign_apps: str
    path: Path
    placed: Any  # reconciler.desired.placement.PlacedFleet
    state: DesiredState


def load_desired(path: Path) -> Desired:
    """Fleet files -> desired Serve config (raises SpecError with every problem)."""
    state = desired_state(path)
    return Desired(config=state.config, dashboard_url=state.placed.ray.dashboard_url,
                   foreign_apps=state.placed.settings.foreign_apps, path=path.resolve(), placed=state.placed,
                   state=state)


def fail(message: str) -> NoReturn:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
    sys.exit(EXIT_ERROR)


def fail_spec(e: SpecError) -> NoReturn:
    fail_problems(e.problems, "the live fleet is unchanged")


def fail_problems(problems: Sequence[Problem], tail: str) -> NoReturn:
    _echo_problems(problems, tail)
    sys.exit(EXIT_ERROR)


def _echo_problems(problems: Sequence[Problem], tail: str) -> None:
    for p in problems:
        click.echo(click.style("error: ", fg="red", bold=True) + str(p), err=True)
    n = len(problems)
    click.echo(f"{n} error{'s' if n != 1 else ''}; {tail}.", err=True)


def _desired_or_exit(path: Path) -> Desired:
    try:
        return load_desired(path)
    except SpecError as e:
        fail_spec(e)


def _live_or_exit(dashboard_url: str, problems: Sequence[Problem] = ()) -> live_mod.LiveState:
    try:
        return live_mod.read_live_state(dashboard_url)
    except live_mod.LiveStateError as e:
        if problems:
            _echo_problems(problems, "and no live fleet could be read")
        fail(str(e))


def _color() -> bool:
    return sys.stdout.isatty()


def _progress(line: str) -> None:
    click.echo(line, err=True)


# ---- plan ---------------------------------------------------------------------------------

@click.command("plan")
@click.argument("path", default=".", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as versioned JSON.")
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 0 when nothing would change, 2 when something would, 1 on error.")
@click.option("-out", "--out", "out_file", type=click.Path(path_type=Path),
              help="Save the plan to FILE; `fleetctl apply FILE` applies exactly it.")
def plan_cmd(path: Path, as_json: bool, detailed_exitcode: bool, out_file: Path | None) -> None:
    """Show what apply would change on the live Ray Serve, and why."""
    desired = _desired_or_exit(path)
    live = _live_or_exit(desired.dashboard_url)
    plan = download.annotate(plan_for(desired.state, live), desired.placed)
    click.echo(render.format_json(plan) if as_json else render.format_text(plan, color=_color()), nl=False)
    problems = capacity.check(plan, desired.state, live_mod.read_cluster_resources(desired.dashboard_url))
    if problems:
        fail_problems(problems, "the Ray cluster cannot hold this fleet; apply would refuse it")
    if out_file is not None:
        save_plan(plan, desired, out_file)
        if not as_json:
            click.echo(f"Saved the plan to {out_file}; `fleetctl apply {out_file}` applies exactly it.")
    if detailed_exitcode and plan.has_changes:
        sys.exit(EXIT_CHANGES)


def save_plan(plan: Plan, desired: Desired, out_file: Path) -> None:
    data = plan_to_dict(plan, redact=True)  # no env value on disk; apply gets them back from the files
    data["kind"] = PLAN_FILE_KIND
    data["fleet"] = {"path": str(desired.path), "dashboard_url": desired.dashboard_url}
    out_file.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_saved_plan(path: Path) -> tuple[Plan, Mapping[str, Any]] | None:
    """(plan, its fleet section) when PATH is a saved plan file; None when it is fleet files."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(data, dict) or data.get("kind") != PLAN_FILE_KIND:
        return None
    try:
        return plan_from_dict(data), data.get("fleet") or {}
    except PlanFormatError as e:
        fail(f"{path}: {e}")


# ---- apply --------------------------------------------------------------------------------

@click.command("apply")
@click.argument("target", default=".", type=click.Path(path_type=Path))
@click.option("--auto-approve", is_flag=True, help="Apply without asking.")
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="Seconds to wait for the changed models (default: their start bound + 2 min).")
@click.option("--lock-wait", type=float, default=10.0, show_default=True,
              help="Seconds to wait for another apply to finish before giving up.")
def apply_cmd(target: Path, auto_approve: bool, timeout_s: float | None, lock_wait: float) -> None:
    """Make the live Serve match the fleet files (or apply a saved plan exactly)."""
    saved = read_saved_plan(target)
    path = target if saved is None else Path(saved[1].get("path") or ".")
    desired = _desired_or_exit(path)
    outcome = reconcile(path, desired=desired.state, saved_plan=saved[0] if saved else None,
                        approve=_approver(auto_approve), report=_progress, timeout_s=timeout_s,
                        lock_wait_s=lock_wait)
    finish(outcome)


def _approver(auto_approve: bool) -> Approve:
    """Show the plan, then ask (or not). Called by reconcile only when there are changes."""
    def approve(plan: Plan) -> bool:
        click.echo(render.format_text(plan, color=_color()), nl=False)
        return auto_approve or _confirm()
    return approve


def finish(outcome: Outcome, *, hint: str = "") -> None:
    """Print a reconcile outcome for people and exit with the code scripts expect."""
    r = outcome.result
    if r is Result.SYNCED and outcome.plan is not None:
        click.echo(render.format_text(outcome.plan, color=_color()), nl=False)
        return
    if r is Result.APPLIED and outcome.plan is not None and outcome.applied is not None:
        click.echo(click.style("Apply complete: ", fg="green", bold=True)
                   + f"{_done_line(outcome.plan)} in {outcome.applied.seconds:.1f} s.")
        return
    if r is Result.SPEC_ERROR:
        fail_problems(outcome.problems, "the live fleet is unchanged")
    if r is Result.CAPACITY:
        if outcome.plan is not None:
            click.echo(render.format_text(outcome.plan, color=_color()), nl=False)
        fail_problems(outcome.problems, "the Ray cluster cannot hold this fleet; nothing was changed")
    if r is Result.FAILED:
        fail(f"{outcome.message}\nThe other apps were left as Serve has them; fix the model and apply again."
             + (f"\n{hint}" if hint else ""))
    fail(outcome.message + (f"\n{hint}" if hint else ""))


def _confirm() -> bool:
    if not sys.stdin.isatty():
        fail("apply needs an answer but standard input is not a terminal; pass --auto-approve")
    return click.confirm("Apply these changes?", default=False)


def _done_line(plan: Plan) -> str:
    return (f"{plan.count(Action.CREATE)} created, {plan.count(Action.UPDATE)} updated in place, "
            f"{plan.count(Action.RESTART)} restarted, {plan.count(Action.DELETE)} deleted")


# ---- status -------------------------------------------------------------------------------


@click.command("status")
@click.argument("path", default=".", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (with the files' errors under file_errors).")
def status_cmd(path: Path, as_json: bool) -> None:
    """Models: desired vs live, state, health, sync, replicas, GPUs, and Serve's reason when one is stuck.

    Works whatever the fleet files say: when they are invalid, their errors (file:line) come first,
    the live fleet is shown against the last good files (or as it runs), and the exit code is 1.
    """
    target = resolve_fleet(path)
    live = _live_or_exit(target.dashboard_url, target.problems)
    if target.desired is not None:
        plan = plan_for(target.desired, live)
        doc = status_mod.document(plan, live, target.desired.placed,
                                  runtime=live_mod.read_model_states(target.desired.placed.openai),
                                  downloads=download.read_progress(target.dashboard_url))
    else:
        plan = make_plan({"applications": [a.config for a in live.apps.values() if a.config]}, live)
        doc = status_mod.document(plan, live)
    doc["file_errors"] = [p.as_dict() for p in target.problems]
    doc["desired_from"] = target.source
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        sys.exit(EXIT_ERROR if target.problems else EXIT_OK)
    if target.problems:
        _echo_problems(target.problems, f"the live fleet below runs unchanged ({target.source})")
    click.echo(status_mod.format_table(doc["models"]))
    if plan.has_changes:
        click.echo(f"\nOut of sync: {render.summary_line(plan)}. `fleetctl plan` shows the details.")
    if target.problems:
        sys.exit(EXIT_ERROR)


@dataclass(frozen=True)
class Target:
    """Which live fleet a command about it means, whether or not its files are valid."""

    dashboard_url: str
    desired: DesiredState | None  # from the files, or from their last good copy
    problems: tuple[Problem, ...]  # the files' errors; () when valid
    source: str  # where `desired` came from, in words


def resolve_fleet(path: Path) -> Target:
    """The files' desired state; when they are invalid, the last good copy the daemon kept and the
    head `up` recorded for this folder (reconciler.change.last_good, reconciler.live.local_head)."""
    try:
        state = desired_state(path)
        return Target(state.placed.ray.dashboard_url, state, (), "the fleet files")
    except SpecError as e:
        problems = tuple(e.problems)
    root = fleet_root(path)
    kept = last_good.desired(root)
    if kept is not None:
        state, copy = kept
        return Target(state.placed.ray.dashboard_url, state, problems, f"the last good files: {copy.describe()}")
    recorded = local_head.for_fleet(root)
    dashboard = recorded[0].head.dashboard_url if recorded else DEFAULT_DASHBOARD
    return Target(dashboard, None, problems, f"no valid version of the files known; Serve at {dashboard} as it runs")


def _elapsed(t0: float) -> str:
    return f"{time.monotonic() - t0:.0f} s"


# ---- up / down ----------------------------------------------------------------------------
# `up` records the head it started (reconciler.live.local_head) so that `down` stops exactly that head
# and nothing else on the box, whatever the fleet files say.


@click.command("up")
@click.argument("path", default=".", type=click.Path(path_type=Path))
@click.option("--timeout", "timeout_s", type=float, default=None, help="Seconds to wait for the models.")
@click.option("--daemon/--no-daemon", "with_daemon", default=True, show_default=True,
              help="Also start `fleetctl daemon` in the background: it applies every edit of the files "
                   "and heals drift, and serves the status page.")
def up_cmd(path: Path, timeout_s: float | None, with_daemon: bool) -> None:
    """Start a local Ray head if none answers, prepare the models, apply, print the endpoint.

    \b
    Then use the endpoint it prints with any OpenAI client, e.g.
      curl localhost:8000/v1/models
    `fleetctl down` stops everything `up` started.
    """
    desired = _desired_or_exit(path)
    # A first `up` converts a GGUF model (~40 s on a small box) and starts a Ray head (~20 s, mostly
    # its processes starting and registering): side by side, not one after the other.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        prepared = pool.submit(prepare_models, desired)
        try:
            live_mod.read_live_state(desired.dashboard_url)
            _progress(f"Ray answers at {desired.dashboard_url}; using it")
        except live_mod.AuthError as e:
            fail(str(e))
        except live_mod.LiveStateError:
            start_local_head(desired)
        prepared.result()
    outcome = reconcile(path, desired=desired.state, approve=_approver(True), report=_progress,
                        timeout_s=timeout_s, lock_command="up")
    if not outcome.result.ok:
        finish(outcome, hint="`fleetctl status` shows the fleet; `fleetctl down` stops what up started.")
    finish(outcome)
    if with_daemon:
        from reconciler.cli import daemon_cmd

        daemon_cmd.stop_background(desired.dashboard_url, _progress)  # a second `up` replaces it
        url = daemon_cmd.start_background(path, desired.dashboard_url, state_files.state_dir(), _progress)
        if url:
            click.echo(click.style("Status page: ", fg="green", bold=True) + url
                       + " (the daemon applies every edit of the fleet files)")
    openai = desired.placed.openai
    host = "127.0.0.1" if openai.host in ("0.0.0.0", "::") else openai.host
    click.echo(click.style("OpenAI endpoint: ", fg="green", bold=True) + f"http://{host}:{openai.port}/v1")


def start_local_head(desired: Desired) -> None:
    fleet = desired.path if desired.path.is_dir() else desired.path.parent
    try:
        local_head.start_for_fleet(desired.dashboard_url, desired.config, fleet, _progress)
    except HeadError as e:
        fail(str(e))


def prepare_models(desired: Desired) -> None:
    """Convert GGUF models before Serve starts the engines (hf:// ones are downloaded by reconcile)."""
    from serve_app import model_source

    models = [m for m in desired.placed.models if not download.is_hub_source(m.source)]
    for i, m in enumerate(models, 1):
        t0 = time.monotonic()
        _progress(f"[{i}/{len(models)}] preparing {m.name} ({m.source}) ...")
        try:
            model_source.prepare(m.source)
        except Exception as e:  # any failure here is the model's, and the user must see it
            fail(f"{m.name}: cannot prepare {m.source}: {e}")
        _progress(f"[{i}/{len(models)}] {m.name} ready ({_elapsed(t0)})")


@click.command("down")
@click.argument("path", default=".", type=click.Path(path_type=Path))
def down_cmd(path: Path) -> None:
    """Stop what `fleetctl up` started: every daemon watching the fleet, its apps, its Ray head, every engine.

    Works whatever the fleet files say: with invalid files it stops the head `up` recorded for
    this folder (and says which files it could not read).
    """
    from reconciler.cli import daemon_cmd

    target = resolve_fleet(path)
    if target.problems:
        _echo_problems(target.problems, f"stopping what `fleetctl up` recorded ({target.dashboard_url})")
    root = fleet_root(path)
    if daemon_cmd.stop_background(target.dashboard_url, _progress):  # first: it would re-create the apps
        _progress("stopped the fleet daemon")
    for pid in daemon_cmd.stop_watching(root, _progress):
        _progress(f"stopped the fleet daemon pid {pid} (it watched {root})")
    rec = local_head.load(target.dashboard_url)
    if rec is None:
        fail(f"`fleetctl up` started no Ray head for {target.dashboard_url}; nothing to stop "
             "(a Ray that up did not start is left alone)")
    t0 = time.monotonic()
    left = local_head.stop(target.dashboard_url, rec, _progress)
    if left:
        fail(f"processes still running after down: {sorted(left)}")
    click.echo(f"Stopped the Ray head and every engine in {_elapsed(t0)}.")


COMMANDS: list[click.Command] = [plan_cmd, apply_cmd, status_cmd, up_cmd, down_cmd]
