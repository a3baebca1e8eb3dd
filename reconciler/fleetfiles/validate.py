"""Fleet files → a validated Fleet spec, or a SpecError listing every problem with file:line and field.

`load_fleet` is the one entry point the CLI, the daemon and tests use to read a fleet.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from reconciler.errors import Problem, SpecError, field_path
from reconciler.fleetfiles import adapters, api_keys
from reconciler.fleetfiles.loader import Origins, read_fleet
from reconciler.fleetfiles.spec import Fleet


@dataclass(frozen=True)
class LoadedFleet:
    """A valid fleet, with where each field was written (for placement errors) and the fleet's folder."""

    spec: Fleet
    origins: Origins
    root: Path
    files: tuple[str, ...]


def load_fleet(path: str | os.PathLike[str] = ".") -> LoadedFleet:
    raw = read_fleet(path)
    try:
        spec = Fleet.model_validate(raw.data)
    except ValidationError as e:
        raise SpecError([_problem(err, raw.origins, raw.data) for err in e.errors()]) from None
    if problems := api_keys.problems(spec, raw.origins) + adapters.problems(spec, raw.origins, raw.root):
        raise SpecError(problems)
    return LoadedFleet(spec, raw.origins, raw.root, tuple(raw.files))


def _problem(err: Any, origins: Origins, data: dict[str, Any]) -> Problem:
    loc = _clean_loc(err["loc"], data)
    kind = err["type"]
    if kind == "extra_forbidden":
        return Problem(origins.of(loc, key=True), field_path(loc), _unknown_key(loc))
    if kind == "missing":
        return Problem(origins.of(loc, key=True), field_path(loc),
                       f"is required; add {loc[-1]}: to {field_path(loc[:-1]) or 'the top level'}")
    on_key = "[key]" in err["loc"]  # a mapping key itself is wrong (e.g. a model name)
    return Problem(origins.of(loc, key=on_key), field_path(loc), _message(err))


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[str | int, ...]:
    """Drop pydantic's union-branch markers ('str', 'list[...]', 'function-after[...]') from a location.

    A part that names a key (or index) present in the data is the user's, even when it looks like a marker
    (a model `str`, a top-level key `ray[`)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        elif isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "dict", "list"}):
            continue
        else:
            node = None
        out.append(part)
    return tuple(out)


# Fields whose values may be secrets: a wrong value there is described, never echoed.
SECRET_FIELDS = frozenset({"env", "api_keys", "token_env", "engine"})
# ... except an API key entry's scope, which names models and a rate, never a key.
KEY_SCOPE_FIELDS = frozenset({"models", "rpm"})


def _message(err: Any) -> str:
    msg: str = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    got = err.get("input")
    if err["type"] not in ("value_error",) and not isinstance(got, dict | list) and got is not None:
        names = [p for p in err["loc"] if isinstance(p, str)]
        if SECRET_FIELDS.isdisjoint(names) or ("api_keys" in names and names[-1] in KEY_SCOPE_FIELDS):
            msg = f"{msg} (got {got!r})"
        else:
            msg = f"{msg} (the value is not shown: this field may hold a secret)"
    return msg


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    key = str(loc[-1])
    allowed = _allowed_keys(loc[:-1])
    hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if hint:
        return f"unknown key {key!r}; did you mean {hint[0]!r}?"
    return f"unknown key {key!r}; allowed here: {', '.join(sorted(allowed))}"


def _allowed_keys(parent: tuple[str | int, ...]) -> list[str]:
    """Field names of the schema model found at `parent` (walks Fleet's annotations)."""
    node: Any = Fleet
    for part in parent:
        node = _child_type(node, part)
        if node is None:
            return []
    node = _unwrap(node)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _child_type(node: Any, part: str | int) -> Any:
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        f = node.model_fields.get(str(part))
        return f.annotation if f else None
    args = typing.get_args(node)
    origin = typing.get_origin(node)
    if origin is dict:
        return args[1]
    if origin is list:
        return args[0]
    return None


def _unwrap(tp: Any) -> Any:
    """Optional[X] / Annotated[X, ...] → X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) != 1:  # e.g. a bare name or a mapping: the mapping's keys are the ones to list
                models = [a for a in map(_unwrap, rest) if isinstance(a, type) and issubclass(a, BaseModel)]
                return models[0] if len(models) == 1 else tp
            tp = rest[0]
        else:
            return tp
