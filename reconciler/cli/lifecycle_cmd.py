"""`fleetctl load MODEL` / `fleetctl unload MODEL`: change a served model's runtime state now.

Like Ollama's preload and `ollama stop`: the fleet files and the Serve config stay as they are, so
`plan` shows no change and the daemon undoes nothing; the next request (or the idle rule) moves
the model on from there. The CLI joins the Ray cluster as a driver and calls the model's engine
replica (serve_app.engine: ``load()`` / ``unload()``) through a Serve handle.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from reconciler.desired.compile import ENGINE_DEPLOYMENT
from reconciler.fleetfiles.spec import ROUTER_APP


def _fail(message: str) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
    sys.exit(1)


def _call(address: str, model: str, method: str, timeout_s: float, **kwargs: Any) -> dict[str, Any]:
    """Join the cluster, check MODEL is a served fleet model, call its engine's METHOD."""
    import ray
    from ray import serve

    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    except ConnectionError as e:
        _fail(f"no Ray cluster at {address!r} ({e}); start the fleet with `fleetctl up`, or pass --address")
    try:
        apps = serve.status().applications
        models = sorted(n for n, a in apps.items() if n != ROUTER_APP and ENGINE_DEPLOYMENT in a.deployments)
        if model not in models:
            _fail(f"{model!r} is not a served model; served: {', '.join(models) or '(none)'}")
        handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model)
        try:
            return dict(getattr(handle, method).remote(**kwargs).result(timeout_s=timeout_s))
        except Exception as e:  # the engine's own reason, unwrapped from Ray's error
            cause = getattr(e, "cause", None) or e
            _fail(f"{method} {model}: {str(cause).strip() or type(cause).__name__}")
            raise AssertionError("unreachable") from e
    finally:
        ray.shutdown()


def _report(model: str, state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"model": model, **state}, indent=2))
        return
    line = f"{model}: {state['state']} since {time.strftime('%H:%M:%S', time.localtime(state['since']))}"
    if state["state"] == "awake" and state.get("load_seconds") is not None:
        line += f" (last load took {state['load_seconds']:.1f} s)"
    click.echo(line)


_address = click.option("--address", default="auto", show_default=True,
                        help="The Ray cluster (as for `ray.init`); `auto` finds the local one.")
_json = click.option("--json", "as_json", is_flag=True, help="Print the model's lifecycle state as JSON.")


@click.command("load")
@click.argument("model")
@_address
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="Seconds to wait for the load.")
@_json
def load_cmd(model: str, address: str, timeout_s: float, as_json: bool) -> None:
    """Load (or wake) MODEL now, before the first request needs it. The idle rule applies again from now."""
    _report(model, _call(address, model, "load", timeout_s), as_json)


@click.command("unload")
@click.argument("model")
@_address
@click.option("--force", is_flag=True, help="Unload even while requests are in flight (they are cut).")
@_json
def unload_cmd(model: str, address: str, force: bool, as_json: bool) -> None:
    """Unload MODEL now: its vLLM process stops and frees its memory; the next request loads it again.

    Refused for always_on models, and while requests are in flight unless --force.
    """
    _report(model, _call(address, model, "unload", 120.0, force=force), as_json)


COMMANDS: list[click.Command] = [load_cmd, unload_cmd]
