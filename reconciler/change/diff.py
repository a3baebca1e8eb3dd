"""Pair desired Serve apps with live ones, then say per app what Ray Serve 2.60 will do.

Pure functions over plain config dicts; no I/O, no printing.

Pairing comes first (desired only = create, live only = delete or foreign, both = compare);
only paired apps are compared field by field. Each changed field is classified by the effect
Serve gives it, read from Serve's own source (ray/serve/_private):

- deploy_utils.get_app_code_version hashes an app's import_path, runtime_env, args,
  autoscaling_policy, and its deployments' autoscaling policies, request_router_config and
  deployment_actors. A new hash makes application_state.apply_app_config rebuild the app,
  every deployment gets the new code_version, and DeploymentVersion.requires_actor_restart
  replaces every replica of the app.
- With the same code version, a deployment's ray_actor_options, placement_group_* options,
  max_replicas_per_node and gang_scheduling_config are in requires_actor_restart: new
  replicas for that deployment only.
- Everything else in DeploymentConfig is LightWeight (num_replicas, max_queued_requests, ...),
  NeedsReconfigure (health checks, graceful_shutdown_timeout_s, ...) or NeedsActorReconfigure
  (user_config, max_ongoing_requests, autoscaling_config, logging_config, ...): the running
  replica is kept. The app's route_prefix is in the reconfigure hash too: kept.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.contract import FLEET_IMPORT_PREFIX

# Values Serve's ServeApplicationSchema fills in when a field is left out, so that a side
# which omits one of these compares equal to a side which spells out the default.
APP_DEFAULTS: dict[str, Any] = {
    "route_prefix": "/",
    "runtime_env": {},
    "args": {},
    "logging_config": None,
    "external_scaler_enabled": False,
    "autoscaling_policy": None,
}
# Deprecated per-app fields Serve accepts and ignores; never a reason to change anything.
APP_IGNORED = frozenset({"host", "port"})


class Action(str, enum.Enum):
    """What happens to one app: the verdict of the diff, and the action of the plan's Change."""

    CREATE = "create"
    UPDATE = "update"  # in place: no replica restarts
    RESTART = "restart"
    DELETE = "delete"
    NOOP = "noop"

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self]


_SYMBOLS = {Action.CREATE: "+", Action.UPDATE: "~", Action.RESTART: "-/+", Action.DELETE: "-", Action.NOOP: " "}


class Effect(str, enum.Enum):
    """What one changed field makes Serve do to the running replicas."""

    SCALE = "scale"  # LightWeight: target state only; running replicas kept
    RECONFIGURE = "reconfigure"  # NeedsReconfigure / NeedsActorReconfigure: replica kept
    RESTART_DEPLOYMENT = "restart_deployment"  # new actor for that deployment's replicas
    REBUILD_APP = "rebuild_app"  # new code version: every replica of the app replaced

    @property
    def restarts(self) -> bool:
        return self in (Effect.RESTART_DEPLOYMENT, Effect.REBUILD_APP)


# The app-level fields that make up Serve's code version (deploy_utils.get_app_code_version).
_CODE_VERSION_APP_FIELDS = frozenset({"import_path", "runtime_env", "args", "autoscaling_policy"})
# Deployment fields that also go into the code version.
_CODE_VERSION_DEPLOYMENT_FIELDS = frozenset({"request_router_config", "deployment_actors"})
# Deployment fields in DeploymentVersion.requires_actor_restart.
_ACTOR_RESTART_FIELDS = frozenset({
    "ray_actor_options",
    "placement_group_bundles",
    "placement_group_strategy",
    "placement_group_bundle_label_selector",
    "placement_group_fallback_strategy",
    "max_replicas_per_node",
    "gang_scheduling_config",
})
# DeploymentConfig fields with update_type LightWeight.
_SCALE_FIELDS = frozenset({"num_replicas", "max_queued_requests", "rolling_update_percentage",
                           "max_surge_percent"})
# NeedsReconfigure + NeedsActorReconfigure fields of DeploymentConfig.
_RECONFIGURE_FIELDS = frozenset({
    "max_ongoing_requests", "backpressure_config", "user_config", "graceful_shutdown_timeout_s",
    "graceful_shutdown_wait_loop_s", "health_check_period_s", "health_check_timeout_s",
    "autoscaling_config", "logging_config", "max_constructor_retry_count",
})


@dataclass(frozen=True)
class FieldChange:
    """One leaf that differs: a dotted path, its live and desired values, and Serve's effect."""

    path: str
    before: Any
    after: Any
    effect: Effect


@dataclass(frozen=True)
class AppDiff:
    """The verdict for one app name."""

    name: str
    action: Action
    fields: tuple[FieldChange, ...] = ()
    foreign: bool = False

    @property
    def restart_fields(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.fields if f.effect.restarts)


@dataclass(frozen=True)
class Pair:
    """Desired and live config of one app name; either side may be missing."""

    name: str
    desired: Mapping[str, Any] | None
    live: Mapping[str, Any] | None
    live_present: bool  # the app exists live, even if Serve shows no config for it


def is_fleet_owned(app: Mapping[str, Any] | None) -> bool:
    """An app belongs to the fleet when its import_path is one of serve_app's."""
    return bool(app) and str(app.get("import_path", "")).startswith(FLEET_IMPORT_PREFIX)


def pair(desired_apps: Iterable[Mapping[str, Any]],
         live_apps: Mapping[str, Mapping[str, Any] | None]) -> list[Pair]:
    """Match apps by name; desired order first, then live-only apps sorted by name."""
    desired = {a["name"]: a for a in desired_apps}
    pairs = [Pair(n, d, live_apps.get(n), n in live_apps) for n, d in desired.items()]
    pairs += [Pair(n, None, live_apps[n], True) for n in sorted(live_apps) if n not in desired]
    return pairs


def normalize_app(app: Mapping[str, Any]) -> dict[str, Any]:
    """A comparable form: Serve's defaults filled in, deployments keyed by name."""
    out: dict[str, Any] = {k: _plain(v) for k, v in app.items() if k not in APP_IGNORED}
    for key, default in APP_DEFAULTS.items():
        out.setdefault(key, default)
    # Serve treats a null runtime_env / args like an empty one.
    for key in ("runtime_env", "args"):
        if out[key] is None:
            out[key] = {}
    out["deployments"] = {d["name"]: _normalize_deployment(d) for d in app.get("deployments") or []}
    return out


def _plain(value: Any) -> Any:
    """Nested Mappings as dicts (the walker only descends into dicts)."""
    if type(value) is dict:
        return value  # JSON data: nested values are plain dicts and lists already
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _normalize_deployment(dep: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _plain(v) for k, v in dep.items() if k != "name"}
    # An empty ray_actor_options is what Serve stores when none are given.
    if out.get("ray_actor_options") == {}:
        del out["ray_actor_options"]
    return out


def diff_app(desired: Mapping[str, Any], live: Mapping[str, Any]) -> AppDiff:
    """Compare one paired app; its action is the strongest effect among the changed fields."""
    changes = tuple(_classify(path, b, a) for path, b, a in _app_diffs(normalize_app(live),
                                                                       normalize_app(desired)))
    if not changes:
        action = Action.NOOP
    elif any(c.effect.restarts for c in changes):
        action = Action.RESTART
    else:
        action = Action.UPDATE
    return AppDiff(str(desired["name"]), action, changes)


def diff_pairs(pairs: Iterable[Pair]) -> list[AppDiff]:
    """One AppDiff per pair. Live-only apps the fleet does not own are marked foreign."""
    out = []
    for p in pairs:
        if p.desired is None:
            out.append(AppDiff(p.name, Action.DELETE, foreign=not is_fleet_owned(p.live)))
        elif not p.live_present:
            out.append(AppDiff(p.name, Action.CREATE))
        elif p.live is None:
            # Live under this name but with no declarative config (deployed with serve.run):
            # a PUT takes it over and builds it from our config.
            out.append(AppDiff(p.name, Action.RESTART, (
                FieldChange("import_path", None, p.desired.get("import_path"), Effect.REBUILD_APP),)))
        else:
            out.append(diff_app(p.desired, p.live))
    return out


def _app_diffs(before: Mapping[str, Any], after: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """App-level leaves, then per deployment: a deployment on one side only is one change."""
    yield from _leaf_diffs({k: v for k, v in before.items() if k != "deployments"},
                           {k: v for k, v in after.items() if k != "deployments"})
    deps_before, deps_after = before["deployments"], after["deployments"]
    for name in sorted(set(deps_before) | set(deps_after)):
        path = f"deployments.{name}"
        if name not in deps_before or name not in deps_after:
            yield path, deps_before.get(name), deps_after.get(name)
        else:
            yield from _leaf_diffs(deps_before[name], deps_after[name], path)


def _leaf_diffs(before: Any, after: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (path, before, after) for every differing leaf; dicts are walked, lists are leaves."""
    # Plain dict checks, not Mapping: configs are JSON data, and ABC checks dominate the cost
    # of planning a few hundred apps.
    if type(before) is dict or type(after) is dict:
        # A dict that is unset on one side is walked as empty, so paths name the leaves.
        before = _as_mapping(before)
        after = _as_mapping(after)
    if type(before) is dict and type(after) is dict:
        if before == after and _same_types(before, after):
            return
        for key in sorted(before.keys() | after.keys(), key=str):
            sub = f"{path}.{key}" if path else str(key)
            yield from _leaf_diffs(before.get(key, _MISSING), after.get(key, _MISSING), sub)
    elif not _equal(before, after):
        yield path, _unmissing(before), _unmissing(after)


def _same_types(a: Any, b: Any) -> bool:
    """== says 1 == True; Serve's hash (json.dumps) does not. Only bools need a second look."""
    if type(a) is dict:
        return all(_same_types(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return all(_same_types(x, y) for x, y in zip(a, b, strict=True))
    return (type(a) is bool) == (type(b) is bool)


def _as_mapping(value: Any) -> Any:
    return {} if value is _MISSING else value


class _Missing:
    def __repr__(self) -> str:
        return "<unset>"


_MISSING = _Missing()


def _unmissing(value: Any) -> Any:
    return None if value is _MISSING else value


def _equal(a: Any, b: Any) -> bool:
    # bool is an int in Python; True must not equal 1.0 here, while 1 == 1.0 must hold
    # because Serve's pydantic models turn ints into floats for float fields.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _classify(path: str, before: Any, after: Any) -> FieldChange:
    return FieldChange(path, before, after, effect_of(path))


def effect_of(path: str) -> Effect:
    """What Serve 2.60 does when the field at this dotted path changes."""
    parts = path.split(".")
    top = parts[0]
    if top in _CODE_VERSION_APP_FIELDS:
        return Effect.REBUILD_APP
    if top != "deployments":
        return Effect.RECONFIGURE  # route_prefix, logging_config, external_scaler_enabled
    if len(parts) < 3:
        # A deployment appears or disappears: Serve only overrides deployments the code
        # builds, so this is a change in the app's code.
        return Effect.REBUILD_APP
    field = parts[2]
    if field in _CODE_VERSION_DEPLOYMENT_FIELDS:
        return Effect.REBUILD_APP
    if field == "autoscaling_config" and len(parts) > 3 and parts[3] == "policy":
        return Effect.REBUILD_APP
    if field in _ACTOR_RESTART_FIELDS:
        return Effect.RESTART_DEPLOYMENT
    if field in _SCALE_FIELDS:
        return Effect.SCALE
    if field in _RECONFIGURE_FIELDS:
        return Effect.RECONFIGURE
    # A field this table does not know: assume the worst so the plan never under-promises.
    return Effect.RESTART_DEPLOYMENT


def why(change: FieldChange) -> str:
    """One sentence that explains a field's effect, for the plan's reasons."""
    return {
        Effect.REBUILD_APP: f"{change.path} is part of the app's code version: Serve rebuilds "
                            "the app and replaces its replicas",
        Effect.RESTART_DEPLOYMENT: f"{change.path} changes the replica actor's options: Serve "
                                   "starts new replicas",
        Effect.RECONFIGURE: f"{change.path} is reconfigured on the running replica",
        Effect.SCALE: f"{change.path} only changes the target replica count",
    }[change.effect]


def global_changes(desired_config: Mapping[str, Any], live_globals: Mapping[str, Any]) -> list[str]:
    """Instance-wide options that differ. A running Serve ignores a new proxy_location (the
    dashboard only logs a warning), so it can only be reported. The fleet's config always says
    ``Disabled`` (the router serves the OpenAI port itself) and never carries http_options, so a
    difference means this Serve was started by something else."""
    if not live_globals:  # no Serve running yet: the first PUT starts it with ours
        return []
    want, have = desired_config.get("proxy_location"), live_globals.get("proxy_location")
    return ["proxy_location"] if want is not None and have is not None and not _equal(want, have) else []
