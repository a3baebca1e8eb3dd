"""API keys scoped to models, with a rate limit: the fleet file's entries, their errors, what compile
and plan make of them, and the policy the router applies (serve_app.keys). No Ray; the router itself
is exercised in tests/test_ingress_keys.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.change import render
from reconciler.change.plan import make_plan, plan_to_dict
from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from serve_app import keys
from serve_app.keys import Caller, KeyRing, RateLimiter, Scope
from tests.test_plan_render import live_of

MODELS = """\
models:
  tiny-chat: {source: hf://org/tiny-chat}
  tiny-coder: {source: hf://org/tiny-coder}
  minilm: {source: hf://org/minilm, task: embed}
"""


def router_user_config(tmp_path: Path, openai: str) -> dict:  # type: ignore[type-arg]
    (tmp_path / "fleet.yaml").write_text(openai + MODELS)
    [router] = [a for a in desired_state(tmp_path).config["applications"] if a["name"] == "router"]
    return dict(router["deployments"][0]["user_config"])


def errors(tmp_path: Path, openai: str) -> list[str]:
    (tmp_path / "fleet.yaml").write_text(openai + MODELS)
    with pytest.raises(SpecError) as caught:
        desired_state(tmp_path)
    return [str(p) for p in caught.value.problems]


# ---- the fleet file ----


def test_bare_names_compile_as_before_and_scoped_entries_add_their_scope(tmp_path: Path) -> None:
    bare = router_user_config(tmp_path, "openai:\n  api_keys: [FLEET_API_KEY]\n")
    assert bare["api_key_envs"] == ["FLEET_API_KEY"] and "key_scopes" not in bare
    scoped = router_user_config(tmp_path, (
        "openai:\n  api_keys:\n    - FLEET_API_KEY\n"
        "    - {env: TEAM_A_KEY, models: [tiny-*], rpm: 30}\n"
        "    - {env: TEAM_B_KEY, models: [minilm]}\n"
        "    - {env: TEAM_C_KEY, rpm: 5}\n"))
    assert scoped["api_key_envs"] == ["FLEET_API_KEY", "TEAM_A_KEY", "TEAM_B_KEY", "TEAM_C_KEY"]
    assert scoped["key_scopes"] == {"TEAM_A_KEY": {"models": ["tiny-*"], "rpm": 30},
                                    "TEAM_B_KEY": {"models": ["minilm"]}, "TEAM_C_KEY": {"rpm": 5}}


BAD = [
    ("    - {env: TEAM_A_KEY, models: [tiny-*], rpm: 0}\n",
     "fleet.yaml:3:48: openai.api_keys[0].rpm: Input should be greater than or equal to 1 (got 0)"),
    ("    - {env: TEAM_A_KEY, rpm: -5}\n",
     "fleet.yaml:3:30: openai.api_keys[0].rpm: Input should be greater than or equal to 1 (got -5)"),
    ("    - {env: TEAM_A_KEY, rpm: 1.5}\n",
     "fleet.yaml:3:30: openai.api_keys[0].rpm: Input should be a valid integer (got 1.5)"),
    ("    - {env: TEAM_A_KEY, models: []}\n",
     "fleet.yaml:3:33: openai.api_keys[0].models: an empty list lets the key use no model; list model names or "
     "patterns (e.g. [qwen2.5-*]), or leave models out for every model"),
    ("    - {env: TEAM_A_KEY, modles: [tiny-*]}\n",
     "fleet.yaml:3:25: openai.api_keys[0].modles: unknown key 'modles'; did you mean 'models'?"),
    ("    - {models: [tiny-*]}\n",
     "fleet.yaml:3:7: openai.api_keys[0].env: is required; add env: to openai.api_keys[0]"),
    ("    - {env: TEAM_A_KEY, models: [tiny-*, qwen*]}\n",
     "fleet.yaml:3:42: openai.api_keys[0].models[1]: matches no model of this fleet (minilm, tiny-chat, "
     "tiny-coder); fix the name or pattern (shell-style: * ? [abc]), or remove it"),
    ("    - TEAM_A_KEY\n    - {env: TEAM_A_KEY, rpm: 5}\n",
     "fleet.yaml:4:7: openai.api_keys[1]: TEAM_A_KEY is already named by openai.api_keys[0]; give each key one "
     "entry (its models and rpm together)"),
]


@pytest.mark.parametrize(("entries", "expected"), BAD, ids=[e for e, _ in BAD])
def test_bad_key_entries_are_errors_at_file_line_and_field(tmp_path: Path, entries: str, expected: str) -> None:
    assert errors(tmp_path, "openai:\n  api_keys:\n" + entries) == [expected]


@pytest.mark.parametrize("where", ["{env: sk-live-0123456789abcdef}", "{env: TEAM_A_KEY, models: [sk-live-0123456789]}",
                                   "{env: TEAM_A_KEY, models: ['sk live 0123456789']}"])
def test_a_key_pasted_into_an_entry_is_never_echoed(tmp_path: Path, where: str) -> None:
    [problem] = errors(tmp_path, f"openai:\n  api_keys:\n    - {where}\n")
    assert "sk-live" not in problem and "sk live" not in problem and "openai.api_keys[0]" in problem


def test_the_plan_shows_a_key_by_its_variable_and_scope_never_its_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_A_KEY", "team-a-secret-value-123")
    (tmp_path / "fleet.yaml").write_text("openai:\n  api_keys: [TEAM_A_KEY]\n" + MODELS)
    before = desired_state(tmp_path).config
    (tmp_path / "fleet.yaml").write_text(
        "openai:\n  api_keys: [{env: TEAM_A_KEY, models: [tiny-*], rpm: 30}]\n" + MODELS)
    plan = make_plan(desired_state(tmp_path).config, live_of(before))
    text = render.format_text(plan)
    as_json = json.dumps(plan_to_dict(plan))
    [change] = [c for c in plan.changes if c.action.value != "noop"]
    assert change.model == "router" and change.action.value == "update"  # in place: no router restart
    assert "TEAM_A_KEY" in text and "tiny-*" in text and "30" in text
    assert "team-a-secret-value-123" not in text + as_json


# ---- the policy (serve_app.keys) ----


def test_patterns_are_shell_globs_on_whole_names() -> None:
    scope = Scope(models=("tiny-*", "minilm"))
    assert [m for m in ("tiny-chat", "tiny-coder", "minilm", "minilm-2", "my-tiny-chat") if scope.allows(m)] == [
        "tiny-chat", "tiny-coder", "minilm"]
    assert Scope(models=("tiny-c[ho]*",)).visible({"tiny-chat": 1, "tiny-coder": 2, "tiny-x": 3}) == {
        "tiny-chat": 1, "tiny-coder": 2}
    assert not Scope(models=("Tiny-*",)).allows("tiny-chat")  # model names are case-sensitive
    assert keys.EVERY_MODEL.allows("anything")


def test_the_keyring_names_the_caller_by_variable_and_hides_keys() -> None:
    ring = KeyRing.of({"ADMIN_KEY": "admin-secret", "TEAM_A_KEY": "team-a-secret"},
                      {"TEAM_A_KEY": {"models": ["tiny-*"], "rpm": 2}})
    assert ring.caller("Bearer admin-secret") == Caller("ADMIN_KEY", keys.EVERY_MODEL)
    assert ring.caller("bearer team-a-secret") == Caller("TEAM_A_KEY", Scope(("tiny-*",), 2))
    assert [ring.caller(h) for h in (None, "", "Bearer", "Bearer wrong", "Basic admin-secret")] == [None] * 5
    assert "secret" not in repr(ring) and "secret" not in str(ring.caller("Bearer team-a-secret"))


def test_no_key_asked_lets_anyone_in_and_keys_asked_but_unset_let_nobody_in() -> None:
    assert KeyRing().caller(None) is keys.ANYONE
    unset = KeyRing.from_config({"api_key_envs": ["FLEET_UNSET_KEY"]}, environ={})
    assert unset.caller("Bearer anything") is None and unset.caller(None) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_is_a_sliding_minute_per_key() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    team_a, team_b = Caller("TEAM_A_KEY", Scope(rpm=3)), Caller("TEAM_B_KEY", Scope(rpm=3))
    admitted = []
    for t in (0.0, 10.0, 20.0, 30.0, 59.9, 60.0, 61.0, 70.0, 71.0):
        clock.now = 1000.0 + t
        admitted.append(limiter.admit(team_a) is None)
    # 3 in the first minute; at 60 s the request of 0 s left the window, at 70 s the one of 10 s
    assert admitted == [True, True, True, False, False, True, False, True, False]
    clock.now = 1071.0
    assert limiter.admit(team_a) == pytest.approx(9.0)  # the request of 20 s leaves at 80 s
    assert limiter.admit(team_b) is None  # each key has its own window
    assert all(limiter.admit(Caller("ADMIN_KEY")) is None for _ in range(1000))  # no rpm: no limit


def test_a_lowered_limit_waits_until_the_window_holds_fewer() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    for i in range(5):
        clock.now = 1000.0 + i
        assert limiter.admit(Caller("K", Scope(rpm=5))) is None
    assert limiter.admit(Caller("K", Scope(rpm=2))) == pytest.approx(60.0 + 3 - 4)  # until 4 of 5 have left


def test_denials_have_openai_s_shape_and_retry_after() -> None:
    models = {"tiny-chat": {}, "tiny-coder": {}, "minilm": {}}
    caller = Caller("TEAM_A_KEY", Scope(("tiny-*",), 1))
    limiter = RateLimiter(Clock())
    forbidden = keys.admit(caller, "minilm", models, limiter)
    assert forbidden is not None and forbidden.status == 403 and forbidden.headers() == {}
    assert forbidden.openai_error() == {"error": {
        "message": "This API key may not use the model `minilm`. Models it may use: tiny-chat, tiny-coder.",
        "type": "invalid_request_error", "code": "model_not_allowed"}}
    assert keys.admit(caller, "tiny-chat", models, limiter) is None
    limited = keys.admit(caller, "tiny-coder", models, limiter)
    assert limited is not None and limited.status == 429 and limited.headers() == {"retry-after": "60"}
    assert limited.openai_error()["error"]["code"] == "rate_limit_exceeded"
    assert "TEAM_A_KEY" not in forbidden.message + limited.message
