"""Errors a person can act on: each names the file, line, column and field, and says what to do.

    FleetError            base of everything the reconciler raises on purpose
    ├── SpecError         the fleet files are wrong (permanent: fix the files; never retried)
    │                     carries every Problem found, not only the first
    └── (live/apply errors live beside the code that talks to Serve)
"""

from __future__ import annotations

from dataclasses import dataclass


class FleetError(Exception):
    """Base class for errors the reconciler raises on purpose."""


@dataclass(frozen=True)
class Location:
    """Where in the fleet files a value sits (1-based line and column)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the fleet files."""

    location: Location | None
    field: str  # dotted path, e.g. "models.llama.gpus[0]"; "" for the file itself
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        what = f"{self.field}: " if self.field else ""
        return f"{where}{what}{self.message}"

    def as_dict(self) -> dict[str, object]:
        loc = self.location
        return {
            "file": loc.file if loc else None,
            "line": loc.line if loc else None,
            "column": loc.column if loc else None,
            "field": self.field,
            "message": self.message,
        }


class SpecError(FleetError):
    """The fleet files are invalid. Holds every problem found, sorted by file and line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=_problem_order)
        super().__init__("\n".join(str(p) for p in self.problems))


def _problem_order(p: Problem) -> tuple[str, int, int, str]:
    loc = p.location
    return (loc.file, loc.line, loc.column, p.field) if loc else ("", 0, 0, p.field)


def field_path(loc: tuple[object, ...]) -> str:
    """('models', 'a', 'gpus', 0) -> 'models.a.gpus[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
