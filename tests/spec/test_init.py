"""`fleetctl init DIR`: a new fleet repository that validates; a folder with files is refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from reconciler.fleetfiles.schema import fleet_schema_text


def init(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", "init", str(target)], capture_output=True, text=True)


def test_init_makes_a_fleet_repository_that_validates(tmp_path: Path) -> None:
    target = tmp_path / "my-fleet"
    r = init(target)
    assert r.returncode == 0, r.stderr
    assert (target / "fleet.yaml").read_text().splitlines()[0] == \
        "# yaml-language-server: $schema=./schemas/fleet.schema.json"
    assert (target / "schemas" / "fleet.schema.json").read_text() == fleet_schema_text()
    assert (target / "fleet.d").is_dir() and (target / ".gitignore").is_file()
    assert len((target / "README.md").read_text().splitlines()) == 3
    if shutil.which("git"):
        assert (target / ".git").is_dir() and "a git repository" in r.stdout
    v = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(target)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr


def test_init_refuses_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    r = init(tmp_path)
    assert r.returncode == 1
    assert f"error: {tmp_path} is not empty" in r.stderr and "nothing was written" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
