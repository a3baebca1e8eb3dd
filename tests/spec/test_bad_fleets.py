"""Every bad fleet gets exit 1 and, for each problem, one line naming file:line:column, field and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli.fleetctl import main

from .cases import CASES, Case


def write_fleet(root: Path, files: dict[str, str | bytes], model_dirs: dict[str, dict[str, str]] | None = None
                ) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    for folder, contents in (model_dirs or {}).items():
        for name, text in contents.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_text(text)
    return root


def test_there_are_at_least_25_bad_fleets() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_fleet_is_rejected_with_file_line_and_message(case: Case, tmp_path: Path) -> None:
    write_fleet(tmp_path, case.files, case.model_dirs)
    result = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert result.exit_code == 1, result.output
    lines = [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == case.errors


@pytest.mark.parametrize("case", CASES[:5], ids=[c.id for c in CASES[:5]])
def test_json_output_lists_the_same_errors(case: Case, tmp_path: Path) -> None:
    import json

    write_fleet(tmp_path, case.files, case.model_dirs)
    result = CliRunner().invoke(main, ["validate", "--json", str(tmp_path)])
    assert result.exit_code == 1
    errors = json.loads(result.stdout)["errors"]
    rendered = [f"{e['file']}:{e['line']}:{e['column']}: " + (f"{e['field']}: " if e["field"] else "") + e["message"]
                for e in errors]
    assert rendered == case.errors
