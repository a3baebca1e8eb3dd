"""Read fleet.yaml + fleet.d/*.yaml (sorted) into one merged mapping, remembering where each value came from.

Only reading and merging happens here; the schema lives in spec.py. Every problem is collected as a
Problem with file:line:column so that `fleetctl validate` can list them all at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError

from .errors import Location, Problem, SpecError, field_path

MAX_FILE_BYTES = 1024 * 1024  # a fleet file is hand-written; anything bigger is a mistake
FLEET_FILE = "fleet.yaml"
FLEET_DIR = "fleet.d"

Path_ = tuple[str | int, ...]


@dataclass
class Origins:
    """Where each field path was written: the key's position and the value's position."""

    keys: dict[Path_, Location] = field(default_factory=dict)
    values: dict[Path_, Location] = field(default_factory=dict)

    def of(self, path: Path_, *, key: bool = False) -> Location | None:
        """The location of `path`, or of its nearest written ancestor (e.g. for a missing field)."""
        table = self.keys if key else self.values
        for end in range(len(path), -1, -1):
            loc = table.get(path[:end]) or self.keys.get(path[:end])
            if loc:
                return loc
        return None


@dataclass
class RawFleet:
    """The merged plain data of all fleet files, before the schema is applied."""

    data: dict[str, Any]
    origins: Origins
    files: list[str]
    root: Path  # the folder holding fleet.yaml; relative model paths are relative to it


def fleet_files(path: Path) -> tuple[Path, list[Path]]:
    """The root folder and the files of a fleet: PATH/fleet.yaml (or PATH itself) then fleet.d/*.yaml sorted."""
    main = path / FLEET_FILE if path.is_dir() else path
    root = main.parent
    extra_dir = root / FLEET_DIR
    extra = sorted(
        (p for p in extra_dir.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()),
        key=lambda p: p.name,
    ) if extra_dir.is_dir() else []
    return root, [main, *extra]


def read_fleet(path: str | os.PathLike[str]) -> RawFleet:
    """Read and merge every fleet file; raise SpecError listing all problems."""
    root, files = fleet_files(Path(path))
    if not files[0].is_file():
        raise SpecError([Problem(None, "", f"{files[0]} not found; create it or pass the fleet's folder")])
    merged: dict[str, Any] = {}
    origins = Origins()
    problems: list[Problem] = []
    names: list[str] = []
    for f in files:
        name = _display_name(f, root)
        names.append(name)
        doc = _read_one(f, name, problems)
        if doc is not None:
            _merge_file(doc, name, merged, origins, problems)
    if problems:
        raise SpecError(problems)
    return RawFleet(merged, origins, names, root)


def _display_name(f: Path, root: Path) -> str:
    try:
        return str(f.relative_to(root))
    except ValueError:
        return str(f)


def _read_one(f: Path, name: str, problems: list[Problem]) -> CommentedMap | None:
    start = Location(name, 1, 1)
    size = f.stat().st_size
    if size > MAX_FILE_BYTES:
        problems.append(Problem(start, "", (
            f"file is {size / 1e6:.1f} MB; fleet files are limited to {MAX_FILE_BYTES // 1024} KiB"
            " — is this the right file?")))
        return None
    text = f.read_text(encoding="utf-8", errors="replace")
    yaml = YAML(typ="rt")
    try:
        doc = yaml.load(text)
    except DuplicateKeyError as e:
        mark = e.problem_mark
        key = (e.problem or "").split('"')[1] if '"' in (e.problem or "") else "a key"
        problems.append(Problem(Location(name, mark.line + 1, mark.column + 1), "",
                                f"duplicate key {key!r} in one mapping; keep one"))
        return None
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = Location(name, mark.line + 1, mark.column + 1) if mark else start
        problems.append(Problem(loc, "", f"YAML syntax error: {e.problem or e.context}"))
        return None
    if doc is None:
        problems.append(Problem(start, "", (
            "file is empty; a fleet file is a mapping such as `models: {...}` — add content or delete the file")))
        return None
    if not isinstance(doc, CommentedMap):
        problems.append(Problem(start, "", (
            f"the top level must be a mapping (keys such as models:, defaults:), not a {_kind(doc)}")))
        return None
    return doc


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _merge_file(doc: CommentedMap, name: str, merged: dict[str, Any], origins: Origins,
                problems: list[Problem]) -> None:
    """Merge one file into the whole; a value (or a model) set in two places is an error naming both."""
    here = Origins()
    record_positions(doc, name, (), here)
    _merge_map(merged, _plain(doc), (), here, origins, problems)
    for path, loc in here.keys.items():
        origins.keys.setdefault(path, loc)
    for path, loc in here.values.items():
        origins.values.setdefault(path, loc)


def _merge_map(into: dict[str, Any], new: dict[str, Any], prefix: Path_, here: Origins, origins: Origins,
               problems: list[Problem]) -> None:
    for key, value in new.items():
        path = (*prefix, key)
        is_model = len(path) == 2 and path[0] == "models"
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict) and not is_model:
            _merge_map(into[key], value, path, here, origins, problems)
        else:
            what = f"model {key!r}" if is_model else repr(field_path(path))
            problems.append(Problem(here.keys[path], field_path(path), (
                f"{what} is defined twice: here and at {origins.keys[path]}; keep one definition")))


def _plain(value: Any) -> Any:
    """ruamel's commented containers → plain dicts/lists (the schema wants plain data)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def record_positions(doc: Any, name: str, prefix: Path_, origins: Origins) -> None:
    """Record positions of everything under a model (list items included), for precise error lines."""
    if isinstance(doc, CommentedMap):
        for key in doc:
            kline, kcol = doc.lc.key(key)
            vline, vcol = doc.lc.value(key)
            path = (*prefix, str(key))
            origins.keys.setdefault(path, Location(name, kline + 1, kcol + 1))
            origins.values.setdefault(path, Location(name, vline + 1, vcol + 1))
            record_positions(doc[key], name, path, origins)
    elif isinstance(doc, CommentedSeq):
        for i in range(len(doc)):
            line, col = doc.lc.item(i)
            path = (*prefix, i)
            origins.keys.setdefault(path, Location(name, line + 1, col + 1))
            origins.values.setdefault(path, Location(name, line + 1, col + 1))
            record_positions(doc[i], name, path, origins)
