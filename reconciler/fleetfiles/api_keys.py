"""Checks on `openai.api_keys` that span entries or sections, each a Problem at the entry's file:line.

The schema (reconciler.spec.ApiKey) checks one entry alone; here: an environment variable named by
two entries (which scope would its key get?) and a model pattern that matches no declared model (a
typo would silently lock a team out). Pure; `load_fleet` calls `problems` after the schema passed.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from reconciler.errors import Problem
from reconciler.fleetfiles.loader import Origins
from reconciler.fleetfiles.spec import Fleet


def problems(fleet: Fleet, origins: Origins) -> list[Problem]:
    found: list[Problem] = []
    first: dict[str, int] = {}
    declared = sorted(fleet.models)
    for i, key in enumerate(fleet.openai.api_key_entries()):
        where = ("openai", "api_keys", i)
        if key.env in first:
            found.append(Problem(origins.of(where), f"openai.api_keys[{i}]", (
                f"{key.env} is already named by openai.api_keys[{first[key.env]}]; give each key one entry "
                "(its models and rpm together)")))
        first.setdefault(key.env, i)
        for j, pattern in enumerate(key.models or []):
            if not any(fnmatchcase(name, pattern) for name in declared):
                found.append(Problem(origins.of((*where, "models", j)), f"openai.api_keys[{i}].models[{j}]", (
                    f"matches no model of this fleet ({', '.join(declared) or 'none declared'}); fix the name "
                    "or pattern (shell-style: * ? [abc]), or remove it")))  # not echoed: it may be a pasted key
    return found
