"""The README's command table and `fleetctl --help` say the same thing: each row's synopsis is the one
click builds from the command's arguments and options, and every command has a row."""

from __future__ import annotations

import re
from pathlib import Path

import click

from reconciler.cli.fleetctl import main

REPO = Path(__file__).resolve().parents[2]


def synopsis(name: str, cmd: click.Command) -> str:
    """`fleetctl NAME ARGS [OPTIONS]` as the README's table writes it, from the click definition."""
    parts = [f"fleetctl {name}"]
    for p in cmd.params:
        if isinstance(p, click.Argument):
            meta = (p.metavar or p.name or "").upper()
            meta = f"{meta}..." if p.nargs == -1 else meta
            parts.append(meta if p.required else f"[{meta}]")
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden and p.name != "help":
            flag = min(p.opts, key=len) if p.opts[0].startswith("--") is False else p.opts[0]
            if p.secondary_opts:  # --daemon/--no-daemon: the one that changes the default
                flag = p.secondary_opts[0] if p.default else p.opts[0]
            value = "" if p.is_flag else f" {p.metavar or p.type.name.upper()}"
            parts.append(f"[{flag}{value}]")
    return " ".join(parts)


def readme_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    table = text[text.index("| command | what it does | exit codes |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        for cell in re.findall(r"`(fleetctl [^`]+)`", line.split("|")[1]):
            rows[cell.split()[1]] = cell
    return rows


def test_every_command_has_a_row_with_its_exact_synopsis() -> None:
    rows = readme_rows()
    ctx = click.Context(main)
    expected = {name: synopsis(name, main.get_command(ctx, name)) for name in main.list_commands(ctx)}
    assert rows == expected


def test_the_exit_codes_in_the_table_are_in_the_help() -> None:
    text = (REPO / "README.md").read_text()
    table = text[text.index("| command | what it does | exit codes |"):].split("\n\n")[0]
    codes = {c for line in table.splitlines()[2:] for c in re.findall(r"\b(\d+)\b", line.split("|")[3])}
    helped = set(re.findall(r"\b(\d+)\b", (main.help or "").split("Exit codes:")[1]))
    assert codes <= helped, f"exit codes in the README table but not in `fleetctl --help`: {codes - helped}"
