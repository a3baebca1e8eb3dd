"""What a starting engine is doing, read from vLLM's own log through Ray's dashboard.

Each engine replica writes vLLM's output to ``contract.engine_log_name(model, replica_pid)`` in
its node's Ray log folder, so the dashboard's log API (``/api/v0/logs/file``) serves it from any
node. `phase()` turns the last lines into a few words for the progress line of apply and status.
"""

from __future__ import annotations

import re
import time

import httpx

from reconciler.live.serve_state import AppLive
from serve_app.contract import engine_log_name

# (pattern, words), roughly in the order vLLM goes through them; a line takes the first pattern it
# matches (so the specific ones come first), and the last line with a phase gives the phase.
PHASES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.IGNORECASE), w) for p, w in (
    (r"preparing|convert(ing)? .*gguf|gguf", "preparing the weights"),
    (r"fetching \d+ files|downloading|\.safetensors:\s+\d+%", "downloading weights"),
    (r"non-default args|initializing a v\d llm engine|automatically detected platform", "initialising the engine"),
    (r"loading (model )?weights took|model loading took", "weights loaded"),
    (r"starting to load model|loading weights|loading safetensors", "loading weights"),
    (r"torch\.compile takes|dynamo bytecode transform|compiling a graph|start compil", "compiling (torch.compile)"),
    (r"kv cache|# (cpu|gpu) blocks|available kv cache memory", "allocating the KV cache"),
    (r"capturing cuda graph|graph capturing", "capturing CUDA graphs"),
    (r"warming up|memory profiling|kernel warmup took|warmup (took|done)", "warming up"),
    (r"starting vllm api server|started server process|waiting for application startup", "starting the HTTP server"),
    (r"application startup complete", "ready"),
))
# Asking the dashboard for a log costs an RPC to the node; once per model per this many seconds.
MIN_INTERVAL_S = 3.0


def phase(text: str) -> str:
    """The last phase the log shows, or "starting Python (imports)" before vLLM printed anything."""
    found = ""
    for line in text.splitlines():
        if " WARNING " in line:  # e.g. "Enforce eager set, disabling torch.compile ... warmup": not a phase
            continue
        for pattern, words in PHASES:
            if pattern.search(line):
                found = words
                break
    return found or ("starting Python (imports)" if text.strip() else "")


class Reader:
    """Reads the engines' logs through one dashboard client, at most every MIN_INTERVAL_S per model."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client
        self._cache: dict[str, tuple[float, str]] = {}

    def phase(self, model: str, app: AppLive) -> str:
        at, words = self._cache.get(model, (0.0, ""))
        if time.monotonic() - at < MIN_INTERVAL_S:
            return words
        words = phase(self.tail(model, app))
        self._cache[model] = (time.monotonic(), words)
        return words

    def tail(self, model: str, app: AppLive, lines: int = 60) -> str:
        """The last lines of the newest replica's vLLM log ("" when it cannot be read)."""
        replicas = [r for d in app.deployments for r in d.replicas if r.pid and r.node_id]
        if not replicas:
            return ""
        r = replicas[-1]
        try:
            resp = self._client.get("/api/v0/logs/file", params={
                "node_id": r.node_id, "filename": engine_log_name(model, int(r.pid or 0)), "lines": lines},
                timeout=5.0)
        except httpx.HTTPError:
            return ""
        return resp.text if resp.status_code == 200 else ""
