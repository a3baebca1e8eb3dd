"""Following what was sent: each start judged against live states as Serve reports them. No Ray.

The real-engine side (a second edit mid-start, an app removed by hand mid-start) is in
tests/daemon; these cases pin the verdicts themselves, one live state each.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from reconciler.change.plan import Action, Change
from reconciler.change.rollout import Phase, Rollouts, judge_rollout, rollout_for, start_bound
from reconciler.live.serve_state import AppLive, DeploymentLive, LiveState, Replica
from tests.test_diff import engine_app


def app(status: str, cfg: dict[str, Any], dep: str = "HEALTHY", ids: tuple[str, ...] = ("r2",),
        message: str = "") -> AppLive:
    reps = tuple(Replica(i, "RUNNING") for i in ids)
    return AppLive("a", status, config=copy.deepcopy(cfg),
                   deployments=(DeploymentLive("engine", dep, message, reps, len(ids)),))


def sent(action: Action = Action.RESTART, *, ago: float = 10.0, before: AppLive | None = None,
         cfg: dict[str, Any] | None = None):  # noqa: ANN201 - a Rollout
    r = rollout_for(Change(action, "a", None, cfg or engine_app("a")), before, "fp")
    return replace(r, sent_mono=r.sent_mono - ago)


CFG = engine_app("a")
OLD = app("RUNNING", CFG, ids=("r1",))
OTHER = engine_app("a", args={**CFG["args"], "engine_argv": ["--max-model-len", "99"]})


@pytest.mark.parametrize(("rollout", "now", "phase", "words"), [
    (lambda: sent(before=OLD), app("RUNNING", CFG), Phase.SETTLED, "healthy"),
    (lambda: sent(before=OLD), app("RUNNING", CFG, ids=("r1",)), Phase.STARTING, "old replicas still running"),
    (lambda: sent(Action.CREATE), app("DEPLOYING", CFG, "UPDATING"), Phase.STARTING, "deploying"),
    (lambda: sent(Action.CREATE, ago=0.5), None, Phase.STARTING, "not yet known"),
    (lambda: sent(Action.CREATE), None, Phase.GONE, "removed from Serve while it started"),
    (lambda: sent(Action.CREATE), app("DEPLOY_FAILED", CFG, "DEPLOY_FAILED", message="kv_cache_dtype nonsense"),
     Phase.FAILED, "kv_cache_dtype nonsense"),
    (lambda: sent(Action.CREATE, ago=0.5), app("DEPLOY_FAILED", CFG, "DEPLOY_FAILED"), Phase.STARTING, ""),
    (lambda: sent(Action.CREATE), app("DEPLOYING", CFG, "UPDATING", ids=(), message=(
        "Deployment 'engine' in application 'a' has 1 replicas that have taken more than 30s to be scheduled. "
        "This may be due to waiting for the cluster to auto-scale or for a runtime environment to be installed. "
        "Resources required for each replica: {\"CPU\": 1.0, \"fleet_gpu_0\": 0.5}, total resources available: "
        "{\"CPU\": 2.0}.")), Phase.UNSCHEDULABLE, "fleet_gpu_0"),
    (lambda: sent(Action.CREATE, ago=10_000), app("DEPLOYING", CFG, "UPDATING"), Phase.TIMED_OUT, "not healthy after"),
    (lambda: sent(Action.DELETE, cfg=CFG), None, Phase.SETTLED, "deleted"),
])
def test_a_start_is_judged_from_live(rollout: Any, now: AppLive | None, phase: Phase, words: str) -> None:
    v = judge_rollout(rollout(), now)  # made now: its "sent so long ago" counts from this moment
    assert v.phase is phase, v
    assert words in v.detail


def test_never_means_no_bound_and_otherwise_the_engines_bound_plus_a_margin() -> None:
    never = engine_app("a", args={**CFG["args"], "start_timeout_s": None})
    assert start_bound(Change(Action.CREATE, "a", None, never)) is None
    bounded = engine_app("a", args={**CFG["args"], "start_timeout_s": 600.0})
    assert start_bound(Change(Action.CREATE, "a", None, bounded)) == 720.0
    r = replace(rollout_for(Change(Action.CREATE, "a", None, never), None, "fp"), sent_mono=-1e9)
    assert judge_rollout(r, app("DEPLOYING", never, "UPDATING")).phase is Phase.STARTING


def test_a_field_serve_drops_is_not_taken_for_another_writer() -> None:
    # Serve shows, from the first look on, a config without one of our fields: that is Serve, not a
    # second writer. A config that changes after that first look is a second writer.
    dropped = copy.deepcopy(CFG)
    dropped["args"].pop("source")
    rs = Rollouts()
    rs.add([sent(Action.CREATE)])
    assert [v.phase for v in rs.observe(LiveState({"a": app("DEPLOYING", dropped, "UPDATING")}))] == [Phase.STARTING]
    assert [v.phase for v in rs.observe(LiveState({"a": app("DEPLOYING", OTHER, "UPDATING")}))] == [Phase.REPLACED]
    assert rs.pending() == []


def test_a_newer_config_replaces_the_start_in_progress_and_ended_starts_are_forgotten() -> None:
    rs = Rollouts()
    rs.add([sent(Action.CREATE)])
    rs.add([sent(Action.RESTART, cfg=OTHER, before=app("DEPLOYING", CFG, "UPDATING", ids=()))])
    assert rs.pending() == ["a"]
    assert [v.phase for v in rs.observe(LiveState({"a": app("DEPLOYING", OTHER, "UPDATING")}))] == [Phase.STARTING]
    assert [v.phase for v in rs.observe(LiveState({"a": app("RUNNING", OTHER)}))] == [Phase.SETTLED]
    assert rs.pending() == [] and rs.observe(LiveState({})) == []
