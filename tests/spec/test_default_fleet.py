"""The shipped fleet files: the default fleet validates on a CPU-only box; the schema is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from reconciler.fleetfiles.schema import fleet_schema_text

REPO = Path(__file__).resolve().parents[2]


def test_validate_default_fleet_exits_0_on_this_cpu_box() -> None:
    result = subprocess.run([sys.executable, "-m", "reconciler", "validate", "--json"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True
    assert {m["name"]: (m["task"], m["always_on"]) for m in report["models"]} == {
        "smollm2-135m-instruct": ("generate", False),
        "all-minilm-l6-v2": ("embed", True),
    }


def test_committed_schema_is_current() -> None:
    committed = (REPO / "schemas" / "fleet.schema.json").read_text()
    assert committed == fleet_schema_text(), "schemas/fleet.schema.json is stale: run `fleetctl schema`"


def test_fleet_yaml_points_editors_at_the_schema() -> None:
    first = (REPO / "fleet.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=./schemas/fleet.schema.json"


def test_schema_accepts_the_default_fleet_and_rejects_an_unknown_key() -> None:
    import jsonschema
    from ruamel.yaml import YAML

    schema = json.loads((REPO / "schemas" / "fleet.schema.json").read_text())
    fleet = YAML(typ="safe").load((REPO / "fleet.yaml").read_text())
    jsonschema.validate(fleet, schema)
    fleet["models"]["smollm2-135m-instruct"]["gpu_memroy"] = 0.5
    try:
        jsonschema.validate(fleet, schema)
    except jsonschema.ValidationError as e:
        assert "gpu_memroy" in e.message
    else:
        raise AssertionError("the schema accepted an unknown key")
