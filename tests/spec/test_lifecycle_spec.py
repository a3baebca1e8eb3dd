"""Lifecycle fields of the spec: what idle models do, how they compile, and what `enabled: false` means."""

from __future__ import annotations

from pathlib import Path

from reconciler.change import diff
from reconciler.desired.pipeline import desired_state

from .test_bad_fleets import write_fleet
from .test_placement import GPU3


def _apps(tmp_path: Path, text: str) -> dict[str, dict]:  # type: ignore[type-arg]
    write_fleet(tmp_path, {"fleet.yaml": text})
    return {a["name"]: a for a in desired_state(tmp_path).config["applications"]}


def test_gpu_models_sleep_first_unless_told_not_to(tmp_path: Path) -> None:
    apps = _apps(tmp_path, GPU3 + (
        "defaults: {idle_timeout: 10m, unload_after: 2h}\n"
        "models:\n"
        "  a: {source: hf://o/a, gpus: [0], gpu_memory: 0.5}\n"
        "  b: {source: hf://o/b, gpus: [1], gpu_memory: 0.5, sleep: false, unload_after: never}\n"))
    a, b = apps["a"], apps["b"]
    assert "--enable-sleep-mode" in a["args"]["engine_argv"]
    assert a["args"]["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert a["deployments"][0]["user_config"] == {"idle_timeout_s": 600.0, "unload_after_s": 7200.0,
                                                  "always_on": False}
    assert "--enable-sleep-mode" not in b["args"]["engine_argv"]
    assert "VLLM_SERVER_DEV_MODE" not in b["args"]["env"]
    assert b["deployments"][0]["user_config"]["unload_after_s"] is None


def test_cpu_models_have_no_sleep_mode(tmp_path: Path) -> None:
    app = _apps(tmp_path, "models:\n  m: {source: hf://o/m, sleep: true}\n")["m"]
    assert "--enable-sleep-mode" not in app["args"]["engine_argv"]
    assert "VLLM_SERVER_DEV_MODE" not in app["args"]["env"]
    assert app["deployments"][0]["user_config"] == {"idle_timeout_s": 900.0, "unload_after_s": 3600.0,
                                                    "always_on": False}


def test_lifecycle_timeouts_change_in_place(tmp_path: Path) -> None:
    before = _apps(tmp_path, "models:\n  m: {source: hf://o/m}\n")["m"]
    after = _apps(tmp_path, "models:\n  m: {source: hf://o/m, idle_timeout: 5s, unload_after: 1m}\n")["m"]
    d = diff.diff_app(after, before)
    assert d.action is diff.Action.UPDATE
    assert {f.path for f in d.fields} == {"deployments.engine.user_config.idle_timeout_s",
                                          "deployments.engine.user_config.unload_after_s"}


def test_disabled_model_is_validated_but_not_served(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": GPU3 + (
        "models:\n"
        "  a: {source: hf://o/a, gpus: [0], gpu_memory: 0.9}\n"
        "  b: {source: hf://o/b, gpus: [0], gpu_memory: 0.9, enabled: false}\n")})
    state = desired_state(tmp_path)
    assert [m.name for m in state.placed.models] == ["a"]  # b's share is not reserved: no overbooking
    assert state.placed.disabled == ("b",)
    assert {a["name"] for a in state.config["applications"]} == {"router", "a"}
    router = next(a for a in state.config["applications"] if a["name"] == "router")
    assert set(router["deployments"][0]["user_config"]["models"]) == {"a"}


def test_plan_shows_a_disabled_model_going_and_coming_back(tmp_path: Path) -> None:
    from reconciler.change.plan import Action, make_plan
    from tests.test_plan_render import live_of

    served = desired_state(tmp_path_with(tmp_path / "on", "")).config
    disabled_state = desired_state(tmp_path_with(tmp_path / "off", ", enabled: false"))
    going = make_plan(disabled_state.config, live_of(served), disabled=disabled_state.placed.disabled)
    change = going.change_for("b")
    assert change is not None and change.action is Action.DELETE
    assert change.reasons == ("disabled in the fleet files (enabled: false)",)
    coming = make_plan(served, live_of(disabled_state.config)).change_for("b")
    assert coming is not None and coming.action is Action.CREATE


def tmp_path_with(root: Path, b_extra: str) -> Path:
    write_fleet(root, {"fleet.yaml": f"models:\n  a: {{source: hf://o/a}}\n  b: {{source: hf://o/b{b_extra}}}\n"})
    return root
