"""Probes of a fleet's OpenAI endpoint that the lifecycle benchmarks share (lifecycle.py, its GPU
half lifecycle_gpu.py, swap_bench.py): time to a streamed chat's first token, each model's state.

Its own module so the benchmarks import it, not each other (lifecycle.py dispatches to the other two).
"""

from __future__ import annotations

import time

import httpx
from relay import MODEL_NAME

BOUND_S = 900.0  # the longest any one wait of a benchmark may take (a cold vLLM start on a busy box)


def first_token_s(base_url: str, t0: float, model: str = MODEL_NAME, drain: bool = False) -> float:
    """Send a streamed chat; seconds from ``t0`` to its first content chunk. ``drain``: read the
    stream to its end before returning, so the engine is idle for the next measurement."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=BOUND_S) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: {r.status_code} {r.read()[-500:]!r}")
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                elapsed = time.monotonic() - t0
                if drain:
                    for _ in lines:
                        pass
                return elapsed
    raise RuntimeError(f"{model}: the stream ended without a token")


def model_states(base_url: str) -> dict[str, str]:
    """Each model's lifecycle state as the endpoint's /v1/models lists it."""
    data = httpx.get(base_url + "/v1/models", timeout=30).json()["data"]
    return {m["id"]: str(m.get("state")) for m in data}
