"""Every fleet the docs show validates, against the inventory it is written for, so the docs cannot drift:
the README's ```yaml blocks that are fleets (a top-level `models:` key), `examples/*/fleet.yaml` (each a
whole fleet), and `fleet.d/*.example` (each added to the default fleet, as renaming it does)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from reconciler.desired.pipeline import desired_state
from reconciler.fleetfiles import inventory

REPO = Path(__file__).resolve().parents[2]


def readme_fleets() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    out = []
    for m in re.finditer(r"^```yaml\n(.*?)^```$", text, re.S | re.M):
        block = m.group(1)
        data = YAML(typ="safe").load(block)
        if isinstance(data, dict) and "models" in data:
            out.append((f"README.md:{text.count(chr(10), 0, m.start()) + 1}", block))
    return out


EXAMPLES = sorted((REPO / "examples").glob("*/fleet.yaml"))
FLEET_D = sorted((REPO / "fleet.d").glob("*.example"))


@pytest.fixture(autouse=True)
def _declared_gpus_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file is checked against its own `inventory:`, also on a box whose NVML finds GPUs."""
    monkeypatch.setattr(inventory, "nvml_gpus", lambda: ())


def test_the_readme_shows_at_least_one_fleet() -> None:
    assert readme_fleets(), "no ```yaml block with a top-level models: key found in README.md"
    assert EXAMPLES and FLEET_D


@pytest.mark.parametrize(("where", "block"), readme_fleets(), ids=lambda v: v if v.startswith("README") else "")
def test_readme_fleet_validates(tmp_path: Path, where: str, block: str) -> None:
    (tmp_path / "fleet.yaml").write_text(block)
    placed = desired_state(tmp_path).placed  # raises SpecError with file:line on any problem
    assert placed.models, where


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_fleet_validates_as_the_whole_fleet(tmp_path: Path, example: Path) -> None:
    shutil.copy(example, tmp_path / "fleet.yaml")
    placed = desired_state(tmp_path).placed
    assert placed.inventory.source == "declared" and all(m.gpus for m in placed.models)


def test_3x24gb_example_places_as_its_comments_say(tmp_path: Path) -> None:
    shutil.copy(REPO / "examples" / "3x24gb" / "fleet.yaml", tmp_path / "fleet.yaml")
    placed = desired_state(tmp_path).placed
    where = {m.name: (m.gpus, m.gpu_memory, m.tensor_parallel, m.idle_timeout_s) for m in placed.models}
    assert where == {
        "qwen2.5-14b-instruct": ((0, 1), 0.9, 2, 600.0),
        "llama-3.1-8b-instruct": ((2,), 0.8, 1, 600.0),
        "bge-m3": ((2,), 0.15, 1, None),  # always on
    }


@pytest.mark.parametrize("example", FLEET_D, ids=lambda p: p.name)
def test_fleet_d_example_validates_beside_the_default_fleet(tmp_path: Path, example: Path) -> None:
    shutil.copy(REPO / "fleet.yaml", tmp_path / "fleet.yaml")
    (tmp_path / "fleet.d").mkdir()
    shutil.copy(example, tmp_path / "fleet.d" / example.name.removesuffix(".example"))
    placed = desired_state(tmp_path).placed
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= {m.name for m in placed.models}
    assert all(m.gpus for m in placed.models)  # the default fleet's models go onto the GPUs too
