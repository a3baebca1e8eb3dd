"""The model source grammar, parsed in one place: what a fleet file's ``source:`` may say.

- ``hf://org/name[@revision]``  a Hugging Face Hub repository (``Hub``)
- ``pkg://package/path``        a file or folder inside an installed Python package (``Package``)
- ``/abs``, ``./rel``, ``../rel``, ``~/x``  a local path (``Local``; relative to the fleet's folder)

The fleet files' validation (reconciler), the size estimate, the downloader and the engine's
model_source all read a source through ``parse``; none of them matches the strings itself. Part of
the contract: pure, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HUB = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_PACKAGE = re.compile(r"^pkg://(?P<package>[A-Za-z_]\w*)/(?P<path>.+)$")
_LOCAL_PREFIXES = ("/", "./", "../", "~/")
_FORMS = "hf://org/name[@revision], pkg://package/path, or a local path (/abs or ./relative)"


class SourceError(ValueError):
    """The source string is malformed or points at nothing."""


@dataclass(frozen=True)
class Hub:
    repo: str
    revision: str | None = None


@dataclass(frozen=True)
class Package:
    package: str
    path: str


@dataclass(frozen=True)
class Local:
    path: str  # as written: absolute, ~, or relative to the fleet's folder


Source = Hub | Package | Local


def parse(text: str) -> Source:
    """The source ``text`` names; SourceError says which form it fails and what to write instead."""
    if m := _HUB.match(text):
        return Hub(m["repo"], m["revision"])
    if m := _PACKAGE.match(text):
        return Package(m["package"], m["path"])
    if text.startswith(_LOCAL_PREFIXES):
        return Local(text)
    if text.startswith("hf://"):
        raise SourceError(f"{text!r}: expected hf://org/name[@revision]")
    if text.startswith("pkg://"):
        raise SourceError(f"{text!r}: expected pkg://<import_package>/<path inside it>")
    if "://" in text:
        raise SourceError(f"unsupported source scheme {text.split('://', 1)[0]!r}; use {_FORMS}")
    if re.match(r"^[\w.-]+/[\w.-]+$", text):
        raise SourceError(f"{text!r} is ambiguous; write hf://{text} for the Hugging Face Hub "
                          f"or ./{text} for a local folder")
    raise SourceError(f"{text!r} is not a source; use {_FORMS}")


def hub(text: str) -> Hub | None:
    """The Hub repository ``text`` names, or None for any other source (or none)."""
    try:
        parsed = parse(text)
    except SourceError:
        return None
    return parsed if isinstance(parsed, Hub) else None
