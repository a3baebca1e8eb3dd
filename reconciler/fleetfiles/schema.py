"""The JSON Schema of fleet files, generated from the pydantic spec (checked in as schemas/fleet.schema.json)."""

from __future__ import annotations

import json

from reconciler.fleetfiles.spec import Fleet


def fleet_schema() -> dict[str, object]:
    schema = Fleet.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def fleet_schema_text() -> str:
    return json.dumps(fleet_schema(), indent=2, sort_keys=True) + "\n"
