"""An API key's scope and rate on Ollama's routes (/api/*), answered in Ollama's error shape.

serve_app.keys decides; this reads the model an Ollama request names and words the denial as Ollama
does (``{"error": "..."}``, with Retry-After on a 429). Requests that reach an engine count against
the key's rpm; /api/show (answered from the fleet's list) only needs the model in scope. Whatever
is malformed passes through: serve_app.ollama answers it as it always did.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from serve_app import keys, ollama

ENGINE_PATHS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"})


async def ollama_denial(request: Request, caller: keys.Caller | None, models: Mapping[str, Any],
                        limiter: keys.RateLimiter) -> Response | None:
    """Ollama's 403 or 429 for this request, or None to let serve_app.ollama answer it."""
    if caller is None or request.method != "POST":
        return None  # no key: ollama.handle answers 401; GETs list only the models in scope
    try:
        body = json.loads(await request.body() or b"{}")  # Starlette keeps the body for ollama.handle
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    model = ollama.fleet_model(str(body.get("model") or body.get("name") or ""), dict(models))
    if model is None:
        return None  # unknown: ollama.handle's 404 lists the models in scope
    path = request.url.path.rstrip("/")
    denial = keys.outside_scope(caller, model, models) or (
        keys.over_rate(caller, limiter) if path in ENGINE_PATHS else None)
    if denial is None:
        return None
    response = ollama.ollama_error(denial.status, denial.message)
    response.headers.update(denial.headers())
    return response
