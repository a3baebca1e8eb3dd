"""Which vLLM tool-call parser a model needs, known from its name. Pure: no I/O.

vLLM answers a request that carries `tools` only when started with `--enable-auto-tool-choice
--tool-call-parser <name>`, and the parser must match the model family's tool-call format. Chat
UIs send tools unasked (OpenWebUI's built-in tools), so a model whose family is known gets its
parser; the fleet file's `tool_parser:` overrides (`none` turns tool calls off). A model with no
parser still chats: the router tells OpenWebUI not to send it tools.
"""

from __future__ import annotations

import re

NONE = "none"
# (pattern on the lowercased source, parser); the first match wins, so specific before general.
FAMILIES: tuple[tuple[str, str], ...] = (
    (r"qwen3-?coder", "qwen3_coder"),
    (r"qwen2\.5|qwen3|qwq|hermes-[23]", "hermes"),
    (r"llama-?4", "llama4_pythonic"),
    (r"llama-?3\.[123]", "llama3_json"),
    (r"mistral|mixtral|ministral|codestral|devstral", "mistral"),
    (r"granite-?4", "granite4"),
    (r"granite-?3", "granite"),
    (r"gpt-oss", "openai"),
    (r"deepseek-v3\.1", "deepseek_v31"),
    (r"deepseek-v3", "deepseek_v3"),
    (r"phi-?4-mini", "phi4_mini_json"),
    (r"internlm", "internlm"),
    (r"kimi-k2", "kimi_k2"),
    (r"glm-?4\.5", "glm45"),
)


def tool_parser(source: str, task: str, explicit: str | None) -> str | None:
    """The parser for this model: the fleet file's choice, else its family's, else None."""
    if task != "generate":
        return None
    if explicit is not None:
        return None if explicit == NONE else explicit
    name = source.lower()
    return next((parser for pattern, parser in FAMILIES if re.search(pattern, name)), None)
