"""Compile: engine args become argv elements; nothing ever goes through a shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from reconciler.desired.compile import engine_argv
from reconciler.desired.pipeline import desired_state

from .test_bad_fleets import write_fleet


def test_shell_metacharacters_survive_as_one_argv_element(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": (
        'models:\n  m:\n    source: hf://o/m\n    engine:\n'
        '      chat_template: "; rm -rf /"\n      served_model_alias: "$(id) `x` | y"\n')})
    [app] = [a for a in desired_state(tmp_path).config["applications"] if a["name"] == "m"]
    argv = app["args"]["engine_argv"]
    assert argv[argv.index("--chat-template") + 1] == "; rm -rf /"
    assert argv[argv.index("--served-model-alias") + 1] == "$(id) `x` | y"
    # and a process given that argv receives each value whole, untouched
    echoed = subprocess.run([sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *argv],
                            capture_output=True, text=True, check=True).stdout
    assert "; rm -rf /" in __import__("json").loads(echoed)


def test_engine_argv_forms() -> None:
    assert engine_argv({"enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 2048,
                        "allowed_origins": ["a", "b"], "override_generation_config": {"temperature": 0.5}}) == [
        "--allowed-origins", "a", "b",
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--max-model-len", "2048",
        "--override-generation-config", '{"temperature": 0.5}',
    ]


def test_reordering_engine_args_changes_nothing(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    write_fleet(a, {"fleet.yaml": "models:\n  m: {source: hf://o/m, engine: {dtype: float32, seed: 1}}\n"})
    write_fleet(b, {"fleet.yaml": "models:\n  m: {source: hf://o/m, engine: {seed: 1, dtype: float32}}\n"})
    assert desired_state(a).config == desired_state(b).config


def test_the_router_serves_the_openai_port_itself(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": (
        "openai:\n  host: 0.0.0.0\n  port: 9100\n  workers: 3\nmodels:\n  m:\n    source: hf://o/m\n")})
    config = desired_state(tmp_path).config
    # Serve's HTTP proxy is off, so nothing else takes the port the router replicas bind
    assert config["proxy_location"] == "Disabled" and "http_options" not in config
    [router] = [a for a in config["applications"] if a["name"] == "router"]
    assert router["args"] == {"host": "0.0.0.0", "port": 9100}  # a new port restarts the router on it
    assert router["deployments"][0]["num_replicas"] == 3  # processes sharing the port
