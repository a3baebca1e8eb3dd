"""The idle rule and activity tracking of serve_app.lifecycle, as tables (no Ray, no vLLM)."""

from __future__ import annotations

import pytest

from serve_app.contract import ModelState
from serve_app.lifecycle import (
    BUSY_GAUGES,
    Activity,
    Rules,
    Step,
    counter_total,
    host_ram_short,
    next_step,
    poll_interval,
)

IDLE_5S = Rules(idle_timeout_s=5.0, unload_after_s=60.0)


@pytest.mark.parametrize(("state", "rules", "idle_s", "in_flight", "can_sleep", "step"), [
    (ModelState.AWAKE, IDLE_5S, 4.9, 0, False, Step.NONE),           # not idle long enough
    (ModelState.AWAKE, IDLE_5S, 5.0, 0, False, Step.UNLOAD),         # CPU: straight to unloaded
    (ModelState.AWAKE, IDLE_5S, 5.0, 0, True, Step.SLEEP),           # GPU: to sleep first
    (ModelState.AWAKE, IDLE_5S, 500.0, 1, True, Step.NONE),          # a request in flight holds it
    (ModelState.ASLEEP, IDLE_5S, 64.9, 0, True, Step.NONE),
    (ModelState.ASLEEP, IDLE_5S, 65.0, 0, True, Step.UNLOAD),        # idle_timeout + unload_after
    (ModelState.ASLEEP, Rules(5.0, None), 1e9, 0, True, Step.NONE),  # unload_after: never
    (ModelState.ASLEEP, IDLE_5S, 10.0, 1, True, Step.WAKE),          # a request waits in the sleeping vLLM
    (ModelState.AWAKE, Rules(None, 60.0), 1e9, 0, True, Step.NONE),  # idle_timeout: never
    (ModelState.AWAKE, Rules(5.0, 60.0, always_on=True), 1e9, 0, True, Step.NONE),
    (ModelState.ASLEEP, Rules(5.0, 60.0, always_on=True), 0.0, 0, True, Step.WAKE),    # always_on turned on
    (ModelState.UNLOADED, Rules(5.0, 60.0, always_on=True), 0.0, 0, False, Step.LOAD),
    (ModelState.UNLOADED, IDLE_5S, 1e9, 0, False, Step.NONE),        # the next request loads it, not the rule
    (ModelState.FAILED, IDLE_5S, 1e9, 0, False, Step.NONE),
    (ModelState.LOADING, IDLE_5S, 1e9, 0, False, Step.NONE),
])
def test_idle_rule(state: ModelState, rules: Rules, idle_s: float, in_flight: int, can_sleep: bool, step: Step) -> None:
    assert next_step(state, rules, idle_s, in_flight, can_sleep) is step


def test_an_asleep_model_unloads_when_host_ram_is_short() -> None:
    never = Rules(5.0, None)  # unload_after: never, yet RAM short wins
    assert next_step(ModelState.ASLEEP, never, 6.0, 0, True, ram_short=True) is Step.UNLOAD
    assert next_step(ModelState.ASLEEP, never, 6.0, 1, True, ram_short=True) is Step.WAKE  # a waiting request first
    assert next_step(ModelState.AWAKE, IDLE_5S, 1.0, 0, True, ram_short=True) is Step.NONE  # awake ones are not touched
    assert host_ram_short(available=1 * 2**30, total=24 * 2**30)
    assert not host_ram_short(available=8 * 2**30, total=24 * 2**30)


def test_always_on_never_leaves_awake() -> None:
    rules = Rules(idle_timeout_s=0.0, unload_after_s=0.0, always_on=True)
    for idle_s in (0.0, 1.0, 1e12):
        assert next_step(ModelState.AWAKE, rules, idle_s, 0, True) is Step.NONE
        assert next_step(ModelState.AWAKE, rules, idle_s, 0, False) is Step.NONE


def test_rules_from_user_config() -> None:
    from serve_app.contract import EngineUserConfig

    parsed = EngineUserConfig.parse({"idle_timeout_s": 900, "unload_after_s": None, "always_on": False})
    assert Rules.from_user_config(parsed) == Rules(900.0, None, False)
    assert Rules.from_user_config(EngineUserConfig.parse({})) == Rules(None, None, False)


def test_poll_interval_follows_the_timeout() -> None:
    assert poll_interval(ModelState.AWAKE, Rules(5.0)) == 1.0
    assert poll_interval(ModelState.AWAKE, Rules(900.0)) == 5.0
    assert poll_interval(ModelState.AWAKE, Rules(None)) == 5.0
    assert poll_interval(ModelState.ASLEEP, Rules(900.0)) == 0.25


METRICS = """\
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.7e9
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 5.0
http_requests_total_other 100.0
vllm:num_requests_running{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 2.0
"""


def test_counter_total_sums_only_the_activity_counters() -> None:
    assert counter_total(METRICS) == 10.0


def test_requests_in_the_engine_are_running_plus_waiting() -> None:
    assert counter_total(METRICS, BUSY_GAUGES) == 3.0  # not the per-reason breakdown of the waiting ones


def test_activity_sees_requests_between_two_looks() -> None:
    activity = Activity(last_at=0.0)
    activity.observe(0, 10.0, now=1.0)  # first look: a baseline, not activity
    assert activity.last_at == 0.0
    activity.observe(0, 10.0, now=2.0)
    assert activity.last_at == 0.0
    activity.observe(0, 11.0, now=3.0)  # one came and went
    assert activity.last_at == 3.0
    activity.observe(2, 11.0, now=4.0)  # busy now
    assert (activity.last_at, activity.in_flight) == (4.0, 2)
    activity.touch(now=5.0)
    assert activity.last_at == 5.0
    activity.restart(now=6.0)  # a new child counts from zero again: no false activity
    activity.observe(0, 0.0, now=7.0)
    assert activity.last_at == 6.0


def test_every_model_state_has_a_health() -> None:
    from reconciler.live.health import STATE_HEALTH

    for state in ModelState:  # the lifecycle's states are the fleet's one vocabulary (contract.ModelState)
        assert STATE_HEALTH[state] is not None


def test_a_long_load_error_keeps_what_failed_and_vllms_last_words() -> None:
    from serve_app.engine import brief

    message = "loading 'm' failed: vLLM exited with code 1; its log:\n" + "x" * 5000 + "\nValueError: no config.json"
    short = brief(message, limit=500)
    assert len(short) <= 500
    assert short.startswith("loading 'm' failed: vLLM exited with code 1")
    assert short.endswith("ValueError: no config.json")
    assert brief("short") == "short"


@pytest.mark.parametrize(("load_timeout_s", "last_load_s", "bound"), [
    (600.0, None, 600.0),      # never loaded here: the configured bound
    (600.0, 60.0, 600.0),      # loads well within it
    (600.0, 700.0, 1080.0),    # its own loads take longer: 1.5 x 700 + 30, not a 503 on every cold request
])
def test_router_hold_bound_reflects_the_measured_load(load_timeout_s: float, last_load_s: float | None,
                                                      bound: float) -> None:
    from serve_app.router import hold_bound

    assert hold_bound(load_timeout_s, last_load_s) == bound
