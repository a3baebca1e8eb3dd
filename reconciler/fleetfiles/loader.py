"""Read fleet.yaml + fleet.d/*.yaml (sorted) into one merged mapping, remembering where each value came from.

Only reading and merging happens here; the schema lives in spec.py. Every problem is collected as a
Problem with file:line:column so that `fleetctl validate` can list them all at once.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import DuplicateKeyError, RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.events import AliasEvent

from reconciler.errors import Location, Problem, SpecError, field_path

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


def fleet_root(path: Path) -> Path:
    """The folder holding a fleet's files, given that folder or one of its fleet files."""
    path = path.resolve()
    return path if path.is_dir() else path.parent


def fleet_files(path: Path, problems: list[Problem]) -> tuple[Path, list[Path]]:
    """The root folder and the files of a fleet: PATH/fleet.yaml (or PATH itself) then fleet.d/*.yaml by name.

    Every *.yaml / *.yml entry of fleet.d is listed, whatever it is (a folder, a dangling link, a FIFO), so that
    reading it can say what is wrong; hidden names (editor lock and swap files such as `.#x.yaml`) are skipped.
    """
    main = path / FLEET_FILE if path.is_dir() else path
    root = main.parent
    extra_dir = root / FLEET_DIR
    try:
        if not extra_dir.is_dir():
            return root, [main]
        with os.scandir(extra_dir) as entries:
            names = sorted(e.name for e in entries
                           if not e.name.startswith(".") and os.path.splitext(e.name)[1] in (".yaml", ".yml"))
    except OSError as e:
        problems.append(Problem(None, "", f"{FLEET_DIR}/ cannot be listed: {_os_reason(e)}"))
        return root, [main]
    return root, [main, *(extra_dir / n for n in names)]


def read_fleet(path: str | os.PathLike[str]) -> RawFleet:
    """Read and merge every fleet file; raise SpecError listing all problems.

    This is the boundary to the filesystem, the bytes and ruamel.yaml: whatever they raise becomes a Problem
    (with file:line:column where one exists), so no input can end in a traceback.
    """
    problems: list[Problem] = []
    root, files = fleet_files(Path(path), problems)
    if not os.path.lexists(files[0]):
        raise SpecError([Problem(None, "", f"{files[0]} not found; create it or pass the fleet's folder")])
    merged: dict[str, Any] = {}
    origins = Origins()
    names: list[str] = []
    for f in files:
        name = _display_name(f, root)
        names.append(name)
        doc = _read_one(f, name, problems)
        if doc is not None:
            try:
                _merge_file(doc, name, merged, origins, problems)
            except RecursionError:  # the composer bounds nesting; this is the last line of defence
                problems.append(Problem(Location(name, 1, 1), "", _TOO_DEEP))
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
    data = _read_bytes(f, name, problems)
    text = None if data is None else _decode(data, name, problems)
    if text is None:
        return None
    doc = _load_yaml(text, name, problems)
    if doc is _FAILED:
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


# --- bytes: the filesystem boundary -------------------------------------------------------------------------

def _read_bytes(f: Path, name: str, problems: list[Problem]) -> bytes | None:
    """The file's bytes, at most MAX_FILE_BYTES of them; None (and a Problem) for anything else.

    The size and kind are checked with stat before opening, so a 50 MB file is never read and a FIFO or a
    device (a link to /dev/zero) is never opened; the open is non-blocking and checked again with fstat in
    case the path was swapped in between, and the read stops after MAX_FILE_BYTES + 1 bytes whatever happens.
    """
    start = Location(name, 1, 1)
    try:
        wrong = _not_a_fleet_file(os.stat(f))
        if wrong:
            problems.append(Problem(start, "", wrong))
            return None
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            wrong = _not_a_fleet_file(os.fstat(fh.fileno()))
            if wrong:
                problems.append(Problem(start, "", wrong))
                return None
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        problems.append(Problem(start, "", _os_problem(f, e)))
        return None
    if len(data) > MAX_FILE_BYTES:  # it grew after the stat
        problems.append(Problem(start, "", _too_big(len(data))))
        return None
    return data


def _not_a_fleet_file(st: os.stat_result) -> str | None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "is a folder, not a file; fleet files are YAML files — rename or move the folder"
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        return f"is {kind}, not a regular file; a fleet file must be a plain YAML file — replace or delete it"
    if st.st_size > MAX_FILE_BYTES:
        return _too_big(st.st_size)
    return None


def _too_big(size: int) -> str:
    return (f"file is {size / 1e6:.1f} MB; fleet files are limited to {MAX_FILE_BYTES // 1024} KiB"
            " — is this the right file?")


def _os_problem(f: Path, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        try:
            target = os.readlink(f)
        except OSError:
            return "disappeared while the fleet was being read (deleted or renamed?); run the command again"
        return f"is a symbolic link to {target}, which does not exist; fix the link or delete it"
    if e.errno == errno.ELOOP:
        return "is a symbolic link loop (too many levels of links); fix the link or delete it"
    return f"cannot be read: {_os_reason(e)}"


def _os_reason(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; make it readable by the user running fleetctl (e.g. chmod a+r)"
    return f"{e.strerror or e}; check it and run the command again"


# --- text: the decoding boundary ----------------------------------------------------------------------------

_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)
# What YAML 1.2 allows in a stream (ruamel's Reader.NON_PRINTABLE): tab, newlines and printable Unicode.
_NON_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_CONTROL_NAMES = {0x07: "BEL", 0x08: "backspace", 0x0b: "vertical tab", 0x0c: "form feed", 0x1b: "ESC",
                  0x7f: "DEL"}


def _decode(data: bytes, name: str, problems: list[Problem]) -> str | None:
    """UTF-8 text with only the characters YAML allows; a Problem at the first bad byte or character otherwise."""
    start = Location(name, 1, 1)
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            problems.append(Problem(start, "", (
                f"the file is saved as {encoding} (it starts with a {encoding} byte-order mark); save it as UTF-8")))
            return None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        column = len(data[line_start:e.start].decode("utf-8", "replace")) + 1
        problems.append(Problem(Location(name, data.count(b"\n", 0, e.start) + 1, column), "", (
            f"byte 0x{data[e.start]:02x} (byte offset {e.start}) is not UTF-8; save the file as UTF-8")))
        return None
    bad = _NON_PRINTABLE.search(text)
    if bad:
        i = bad.start()
        where = Location(name, text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1)
        problems.append(Problem(where, "", _bad_character(bad.group())))
        return None
    return text


def _bad_character(ch: str) -> str:
    code = ord(ch)
    if code == 0:
        return ("NUL byte: a fleet file is text — if it was saved as UTF-16, save it as UTF-8; otherwise delete "
                "the byte")
    label = f"U+{code:04X}" + (f" ({_CONTROL_NAMES[code]})" if code in _CONTROL_NAMES else "")
    return (f"control character {label} is not allowed in YAML; delete it (pasted terminal colour codes "
            "and bells are invisible in most editors)")


# --- YAML: the ruamel.yaml boundary -------------------------------------------------------------------------

MAX_DEPTH = 40  # a fleet file nests about 6 deep; deeper input only risks a RecursionError
MAX_NODES = 20_000  # values in one file: 100 models take ~2,000; ruamel builds ~10,000 a second on a small box
_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep; a fleet file needs only a few levels"
_FAILED = object()
_CORE = "tag:yaml.org,2002:"
_CORE_TAGS = {"!", *(_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq"))}


class _Refused(MarkedYAMLError):
    """A YAML feature fleet files do not allow, or a value ruamel could not build, at its position."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(problem=message, problem_mark=mark)


class _FleetComposer(Composer):
    """ruamel's composer, refusing anchors, aliases, custom tags, deep nesting and huge files before anything
    is built.

    Aliases are what make a "billion laughs" file: ruamel shares the aliased node, but every walk over the
    result (record_positions, _plain, pydantic) expands it exponentially. Fleet files have no need for them.
    """

    nesting = 0
    nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES:,} values in one file; fleet files are written by hand — is this "
                           "the right file?", event.start_mark)
        if isinstance(event, AliasEvent):
            raise _Refused(f"alias *{event.anchor}: {_NO_ANCHORS}", event.start_mark)
        if event.anchor is not None:
            raise _Refused(f"anchor &{event.anchor}: {_NO_ANCHORS}", event.start_mark)
        tag = getattr(event, "tag", None)
        if tag is not None and str(tag) not in _CORE_TAGS:
            shown = str(tag).replace(_CORE, "!!", 1)
            raise _Refused(f"tag {shown} is not allowed in a fleet file; remove it (quote a value to make it a string)",
                           event.start_mark)
        self.nesting += 1
        try:
            if self.nesting > MAX_DEPTH:
                raise _Refused(_TOO_DEEP, event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.nesting -= 1


_NO_ANCHORS = ("anchors (&) and aliases (*) are not allowed in fleet files; write the value out "
               "(settings shared by all models go under defaults:)")


class _FleetConstructor(RoundTripConstructor):
    """ruamel's round-trip constructor; a value it cannot build (`!!int xx`, a 5,000-digit number, the date
    2024-13-01) becomes an error at that value instead of a bare ValueError or KeyError."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (MarkedYAMLError, RecursionError):
            raise
        except Exception as e:  # ruamel's constructors raise whatever int(), date() or a dict lookup raises
            kind = str(node.tag).replace(_CORE, "")
            value = node.value if isinstance(node.value, str) else "this value"
            reason = f" ({_one_line(str(e), 80)})" if isinstance(e, ValueError) else ""
            raise _Refused(f"cannot read {_one_line(value, 40)!r} as {kind}{reason}; quote it if it is meant as "
                           "a string", node.start_mark) from e


def _load_yaml(text: str, name: str, problems: list[Problem]) -> Any:
    """ruamel's document, or _FAILED after adding exactly one Problem for whatever ruamel raised."""
    start = Location(name, 1, 1)
    yaml = YAML(typ="rt")
    yaml.Composer = _FleetComposer
    yaml.Constructor = _FleetConstructor
    try:
        return yaml.load(text)
    except DuplicateKeyError as e:
        key = (e.problem or "").split('"')[1] if '"' in (e.problem or "") else "a key"
        problems.append(Problem(_at(e.problem_mark, name) or start, "",
                                f"duplicate key {key!r} in one mapping; keep one"))
    except _Refused as e:
        problems.append(Problem(_at(e.problem_mark, name) or start, "", e.problem))
    except MarkedYAMLError as e:
        loc = _at(e.problem_mark, name) or _at(e.context_mark, name) or start
        what = e.problem or e.context or str(e)
        if e.context and what.startswith("but "):  # "expected a single document …, but found another document"
            what = f"{e.context}, {what}"
        problems.append(Problem(loc, "", f"YAML syntax error: {_one_line(what, 200)}"))
    except RecursionError:
        problems.append(Problem(start, "", _TOO_DEEP))
    except Exception as e:  # ReaderError and whatever else ruamel raises: this is the boundary, nothing passes
        problems.append(Problem(start, "", f"the YAML reader failed: {type(e).__name__}: {_one_line(str(e), 200)}"
                                           "; simplify the part of the file edited last"))
    return _FAILED


def _at(mark: Any, name: str) -> Location | None:
    return Location(name, mark.line + 1, mark.column + 1) if mark is not None else None


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


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
