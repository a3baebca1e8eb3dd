"""LoRA adapters in the fleet file (`adapters:` under a model): what validates and the file:line errors.
Adapter folders here hold only peft's adapter_config.json, which is all validation reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.errors import SpecError
from reconciler.fleetfiles.validate import load_fleet


def adapter(root: Path, name: str, *, r: int = 8, base: str = "Qwen/Qwen2.5-0.5B-Instruct") -> None:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text(json.dumps({"r": r, "base_model_name_or_path": base,
                                                                 "peft_type": "LORA"}))


def errors(root: Path, fleet: str) -> list[str]:
    (root / "fleet.yaml").write_text(fleet)
    try:
        load_fleet(root)
    except SpecError as e:
        return [str(p) for p in e.problems]
    return []


FLEET = """\
models:
  qwen:
    source: hf://Qwen/Qwen2.5-0.5B-Instruct
{engine}    adapters:
      sql-helper: ./adapters/{adapter}
"""


def test_a_fitting_adapter_for_its_base_validates(tmp_path: Path) -> None:
    adapter(tmp_path / "adapters", "sql")
    assert errors(tmp_path, FLEET.format(engine="", adapter="sql")) == []
    # a base recorded as a local copy's path is recognised by its last part
    adapter(tmp_path / "adapters", "sql2", base="/data/models/qwen2.5-0.5b-instruct")
    assert errors(tmp_path, FLEET.format(engine="", adapter="sql2")) == []


def test_a_rank_over_the_base_s_max_lora_rank_is_an_error_until_raised(tmp_path: Path) -> None:
    adapter(tmp_path / "adapters", "big", r=32)
    assert errors(tmp_path, FLEET.format(engine="", adapter="big")) == [
        "fleet.yaml:5:19: models.qwen.adapters.sql-helper: the adapter's rank is 32, over qwen's max_lora_rank 16; "
        "set engine: {max_lora_rank: 32} on qwen (more memory per adapter slot) or use an adapter of a smaller rank"]
    assert errors(tmp_path, FLEET.format(engine="    engine: {max_lora_rank: 32}\n", adapter="big")) == []


def test_an_adapter_made_for_another_base_is_an_error(tmp_path: Path) -> None:
    adapter(tmp_path / "adapters", "llama", base="meta-llama/Llama-3.1-8B-Instruct")
    assert errors(tmp_path, FLEET.format(engine="", adapter="llama")) == [
        "fleet.yaml:5:19: models.qwen.adapters.sql-helper: the adapter was made for "
        "'meta-llama/Llama-3.1-8B-Instruct' (its adapter_config.json), not for qwen "
        "(hf://Qwen/Qwen2.5-0.5B-Instruct); put it under the model it was trained on"]


def test_a_folder_without_adapter_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "adapters" / "empty").mkdir(parents=True)
    [problem] = errors(tmp_path, FLEET.format(engine="", adapter="empty"))
    assert problem.startswith("fleet.yaml:5:19: models.qwen.adapters.sql-helper: no adapter_config.json there")


@pytest.mark.parametrize("taken", ["qwen", "other"])
def test_an_adapter_name_is_a_model_name_and_may_not_repeat_one(tmp_path: Path, taken: str) -> None:
    adapter(tmp_path / "adapters", "sql")
    fleet = (f"models:\n  qwen:\n    source: hf://Qwen/Qwen2.5-0.5B-Instruct\n    adapters:\n"
             f"      {taken}: ./adapters/sql\n  other:\n    source: hf://Qwen/Qwen2.5-0.5B-Instruct\n")
    [problem] = errors(tmp_path, fleet)
    assert problem.startswith(f"fleet.yaml:5:7: models.qwen.adapters.{taken}: '{taken}' is already a model's name")


def test_adapters_on_an_embedding_model_are_an_error(tmp_path: Path) -> None:
    adapter(tmp_path / "adapters", "sql")
    fleet = FLEET.format(engine="    task: embed\n", adapter="sql")
    [problem] = errors(tmp_path, fleet)
    assert problem.startswith("fleet.yaml:5:5: models.qwen.adapters: qwen is an embedding model (task: embed)"), problem
