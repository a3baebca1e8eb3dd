"""LoRA adapters from the fleet file to the Serve config and the plan: LoRA flags as constructor args (a
restart when the first adapter arrives), the adapters in the engine's user_config and as model names of
their own in the router's (in place), and what `plan` says. No Ray: compile and plan are pure."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from reconciler.change import render
from reconciler.change.plan import Action, make_plan
from reconciler.desired.pipeline import desired_state
from serve_app.contract import EngineUserConfig, RouterModel, RouterUserConfig
from tests.test_plan_render import live_of


def adapter(root: Path, name: str, r: int = 8) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text(json.dumps({"r": r, "base_model_name_or_path": "tiny",
                                                                 "peft_type": "LORA"}))


def fleet(root: Path, adapters: dict[str, str], engine: str = "") -> dict[str, Any]:
    """The compiled config of a one-model CPU fleet whose model carries ``adapters``."""
    (root / "tiny").mkdir(exist_ok=True)
    lines = "".join(f"      {name}: {src}\n" for name, src in adapters.items())
    (root / "fleet.yaml").write_text(
        "models:\n  tiny:\n    source: ./tiny\n" + engine + (f"    adapters:\n{lines}" if adapters else ""))
    return copy.deepcopy(desired_state(root).config)


def app(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in config["applications"] if a["name"] == name)


def user_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(app(config, name)["deployments"][0]["user_config"])


def test_a_model_with_adapters_gets_lora_flags_env_and_its_adapter_list(tmp_path: Path) -> None:
    adapter(tmp_path / "ad", "sql")
    plain = fleet(tmp_path, {})
    lora = fleet(tmp_path, {"sql-helper": "./ad/sql"})
    args, before = app(lora, "tiny")["args"], app(plain, "tiny")["args"]
    added = [a for a in args["engine_argv"] if a not in before["engine_argv"]]
    assert added == ["--enable-lora", "--max-lora-rank", "16"]  # vLLM's default, the bound validation checked
    assert args["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in before["env"]
    # the adapter's path is absolute (the engine runs elsewhere than the fleet's folder)
    assert user_config(lora, "tiny")["adapters"] == {"sql-helper": str((tmp_path / "ad" / "sql").resolve())}
    assert "adapters" not in user_config(plain, "tiny")  # absent without adapters: configs stay as they were
    assert EngineUserConfig.parse(user_config(lora, "tiny")).wire() == user_config(lora, "tiny")


def test_the_model_s_own_max_lora_rank_is_the_bound(tmp_path: Path) -> None:
    adapter(tmp_path / "ad", "big", r=32)
    config = fleet(tmp_path, {"big": "./ad/big"}, engine="    engine: {max_lora_rank: 32}\n")
    argv = app(config, "tiny")["args"]["engine_argv"]
    assert argv.count("--max-lora-rank") == 1 and argv[argv.index("--max-lora-rank") + 1] == "32"


def test_the_router_lists_each_adapter_as_a_model_of_its_own_with_its_parent(tmp_path: Path) -> None:
    adapter(tmp_path / "ad", "sql")
    adapter(tmp_path / "ad", "poem")
    router = RouterUserConfig.parse(user_config(fleet(tmp_path, {"sql": "./ad/sql", "poem": "./ad/poem"}), "router"))
    assert list(router.models) == ["tiny", "poem", "sql"]
    assert router.models["sql"] == RouterModel(task="generate", parent="tiny")
    assert router.models["sql"].engine("sql") == "tiny" and router.models["tiny"].engine("tiny") == "tiny"
    assert "parent" not in router.models["tiny"].wire()


def plan_between(tmp_path: Path, before: dict[str, str], after: dict[str, str]) -> Any:
    live = fleet(tmp_path, before)
    return make_plan(fleet(tmp_path, after), live_of(live))


def test_adding_an_adapter_to_a_model_that_has_one_is_in_place(tmp_path: Path) -> None:
    adapter(tmp_path / "ad", "sql")
    adapter(tmp_path / "ad", "poem")
    plan = plan_between(tmp_path, {"sql": "./ad/sql"}, {"sql": "./ad/sql", "poem": "./ad/poem"})
    tiny, router = plan.change_for("tiny"), plan.change_for("router")
    assert tiny is not None and router is not None
    assert (tiny.action, router.action) == (Action.UPDATE, Action.UPDATE)
    assert tiny.reasons == ("adapter added poem (in place: loaded into the running vLLM, no restart)",)
    text = render.format_text(plan)
    assert "~ tiny  will be updated in place" in text
    assert "why: adapter added poem (in place" in text


def test_removing_one_of_two_adapters_is_in_place(tmp_path: Path) -> None:
    adapter(tmp_path / "ad", "sql")
    adapter(tmp_path / "ad", "poem")
    plan = plan_between(tmp_path, {"sql": "./ad/sql", "poem": "./ad/poem"}, {"sql": "./ad/sql"})
    tiny = plan.change_for("tiny")
    assert tiny is not None and tiny.action is Action.UPDATE
    assert tiny.reasons == ("adapter removed poem (in place: unloaded from the running vLLM, no restart)",)


def test_the_first_adapter_restarts_the_engine_and_the_plan_says_why(tmp_path: Path) -> None:
    adapter(tmp_path / "ad", "sql")
    plan = plan_between(tmp_path, {}, {"sql": "./ad/sql"})
    tiny = plan.change_for("tiny")
    assert tiny is not None and tiny.action is Action.RESTART
    assert tiny.reasons[0].startswith("its first adapter turns LoRA on (--enable-lora), which vLLM takes only at start")
    assert "adapter added sql (loaded once the engine is up)" in tiny.reasons
    # the router only learns a model name: in place
    router = plan.change_for("router")
    assert router is not None and router.action is Action.UPDATE


def test_status_lists_each_adapter_under_its_base(tmp_path: Path) -> None:
    from reconciler.loop import status

    adapter(tmp_path / "ad", "sql")
    config = fleet(tmp_path, {"sql-helper": "./ad/sql"})
    state = desired_state(tmp_path)
    plan = make_plan(config, live_of(config))
    runtime = {"tiny": {"state": "awake"}, "sql-helper": {"state": "failed", "reason": "vLLM answered 400: bad"}}
    rows = status.model_rows(plan, live_of(config), state.placed, runtime)
    tiny = next(r for r in rows if r["model"] == "tiny")
    assert [(a["name"], a["state"]) for a in tiny["adapters"]] == [("sql-helper", "failed")]
    lines = status.format_table(rows).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("tiny "))
    assert lines[at + 1].split() == ["+", "sql-helper", "failed"]
    assert "sql-helper: vLLM answered 400: bad" in lines


def test_apply_fetches_the_hub_adapters_an_edit_adds_and_a_restarted_model_s(tmp_path: Path) -> None:
    from reconciler.hub.download import plan_sources

    adapter(tmp_path / "ad", "sql")
    live = fleet(tmp_path, {"sql": "./ad/sql"})
    config = fleet(tmp_path, {"sql": "./ad/sql", "poem": "hf://org/poem-lora"})
    placed = desired_state(tmp_path).placed
    assert [s[:2] for s in plan_sources(make_plan(config, live_of(live)), placed)] == \
        [("tiny/poem", "hf://org/poem-lora")]  # added in place: only it; the local one is not the Hub's
    without = fleet(tmp_path, {})
    assert [s[:2] for s in plan_sources(make_plan(config, live_of(without)), placed)] == \
        [("tiny/poem", "hf://org/poem-lora")]  # restarted (its first adapters): its hf:// adapters
