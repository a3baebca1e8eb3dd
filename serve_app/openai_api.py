"""The OpenAI routes the router answers itself (not relayed): ``GET /v1/models``.

Each model with its task, always-on, swap group, live state (the engine's lifecycle state for a
running app) and the hints OpenWebUI reads. The relay reaches the routes as ``request.app.state.relay``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serve_app.contract import ModelEntry, ModelState
from serve_app.relay import Relay


def error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    """An OpenAI-style error response (for FastAPI routes)."""
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)



def _model_state(app_state: str, message: str, lifecycle: dict[str, Any] | None) -> dict[str, Any]:
    """A running app shows its model's lifecycle state and since when; others the app's own state
    (with the reason when it is unavailable: its node is gone)."""
    if app_state == ModelState.UNAVAILABLE.value:
        return {"state": app_state, "since": None, "reason": message}
    if app_state != "ready" or lifecycle is None:
        return {"state": app_state, "since": None}
    out = {"state": lifecycle["state"], "since": lifecycle["since"]}
    if lifecycle.get("reason"):
        out["reason"] = lifecycle["reason"]
    return out



def _adapter_state(base: dict[str, Any], lifecycle: dict[str, Any] | None, adapter: str) -> dict[str, Any]:
    """A LoRA adapter is as loaded as its parent, except while its parent's awake vLLM lacks it: loading
    (not synced yet), or failed with the engine's reason (serve_app.adapters)."""
    outcome = ((lifecycle or {}).get("adapters") or {}).get(adapter)
    if base["state"] != ModelState.AWAKE.value or outcome in (None, "loaded"):
        return base
    if outcome == "not loaded yet":
        return {**base, "state": ModelState.LOADING.value}
    return {**base, "state": ModelState.FAILED.value, "reason": outcome}


def _chat_first(item: tuple[str, dict[str, Any]]) -> tuple[bool, str]:
    # Chat UIs (OpenWebUI among them) preselect the first model listed: never an embedding model.
    return (item[1].get("task") == "embed", item[0])


def _ui_hints(spec: dict[str, Any]) -> dict[str, Any]:
    """Fields OpenWebUI reads from a listed model (other clients ignore them).

    ``hidden`` keeps an embedding model out of its chat model picker (RAG still uses it by name);
    ``builtin_tools: false`` stops it from sending its built-in tools to a model whose engine has
    no tool-call parser: vLLM refuses any request with tools then ("auto" tool choice requires
    --enable-auto-tool-choice), so the chat failed on its first message.
    """
    meta: dict[str, Any] = {}
    if spec.get("task") == "embed":
        meta["hidden"] = True
    elif not spec.get("tool_parser"):
        meta["capabilities"] = {"builtin_tools": False}
    return {"info": {"meta": meta}} if meta else {}


async def list_models(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    settings = relay.settings
    caller = settings.keyring.caller(request.headers.get("authorization"))
    if caller is None:
        return error(401, "Invalid or missing API key.", "invalid_request_error", "invalid_api_key")
    models = caller.scope.visible(settings.models)  # a scoped key sees only its models
    # the engine application behind each name: a LoRA adapter's is its parent's
    engines = {name: str(spec.get("parent") or name) for name, spec in models.items()}
    states = await relay.app_states()
    running = sorted({e for e in engines.values() if states.get(e, ("absent", ""))[0] == "ready"})
    lifecycles = await relay.lifecycles(running) if relay.lifecycles and running else {}
    data = []
    for name, spec in sorted(models.items(), key=_chat_first):
        engine = engines[name]
        state = _model_state(*states.get(engine, ("absent", "")), lifecycles.get(engine))
        if spec.get("parent"):
            state = _adapter_state(state, lifecycles.get(engine), name)
        data.append(ModelEntry(id=name, parent=spec.get("parent") or None, task=spec.get("task", "generate"),
                               always_on=bool(spec.get("always_on", False)), swap_group=spec.get("swap_group") or None,
                               **state, **_ui_hints(spec)).wire())
    return JSONResponse({"object": "list", "data": data})


def add_routes(api: FastAPI) -> None:
    api.add_api_route("/v1/models", list_models, methods=["GET"])
