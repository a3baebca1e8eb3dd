"""An engine's adapter sync (serve_app.adapters) against a stand-in for vLLM's runtime LoRA endpoints:
what it loads and unloads on an edit, after a new vLLM process, and what a failed load leaves."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from serve_app.adapters import LOADED, Adapters


class FakeVllm:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter as 0.32 answers them (400 for a name loaded
    twice, 404 for unloading one it lacks); refuses paths listed in ``broken``."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}
        self.calls: list[str] = []
        self.broken: set[str] = set()

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        name = body["lora_name"]
        if request.url.path == "/v1/load_lora_adapter":
            self.calls.append(f"load {name}")
            if name in self.held:
                message = f"The lora adapter '{name}' has already been loaded."
                return httpx.Response(400, json={"error": {"message": message}})
            if body["lora_path"] in self.broken:
                return httpx.Response(400, json={"error": {"message": "No adapter found"}})
            self.held[name] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        self.calls.append(f"unload {name}")
        if self.held.pop(name, None) is None:
            return httpx.Response(404, json={"error": {"message": f"The lora adapter '{name}' cannot be found."}})
        return httpx.Response(200, text="Success")


def run(adapters: Adapters, vllm: FakeVllm, fresh: bool = False) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(vllm.handle)) as client:
            await adapters.sync(client, "http://vllm", fresh=fresh)
    asyncio.run(go())


def folders(tmp_path: Path, *names: str) -> dict[str, str]:
    for name in names:
        (tmp_path / name).mkdir()
    return {name: str(tmp_path / name) for name in names}


def test_an_edit_loads_the_new_adapter_and_unloads_the_removed_one(tmp_path: Path) -> None:
    paths = folders(tmp_path, "sql", "poem")
    vllm, adapters = FakeVllm(), Adapters("tiny")
    adapters.want({"sql": paths["sql"]})
    run(adapters, vllm)
    adapters.want({"sql": paths["sql"], "poem": paths["poem"]})
    run(adapters, vllm)
    assert vllm.calls == ["load sql", "load poem"]  # sql is not loaded twice
    adapters.want({"poem": paths["poem"]})
    run(adapters, vllm)
    assert vllm.held == {"poem": paths["poem"]}
    assert adapters.state() == {"adapters": {"poem": LOADED}}


def test_a_new_vllm_process_gets_every_adapter_again(tmp_path: Path) -> None:
    paths = folders(tmp_path, "sql")
    adapters = Adapters("tiny")
    adapters.want(paths)
    run(adapters, FakeVllm())
    restarted = FakeVllm()
    run(adapters, restarted, fresh=True)
    assert restarted.held == paths


def test_a_failed_adapter_is_reported_never_raised_and_tried_again(tmp_path: Path) -> None:
    paths = folders(tmp_path, "sql")
    vllm, adapters = FakeVllm(), Adapters("tiny")
    vllm.broken = {paths["sql"]}
    adapters.want({**paths, "gone": str(tmp_path / "missing")})
    run(adapters, vllm)
    state = adapters.state()["adapters"]
    assert state["sql"].startswith(f"loading adapter 'sql' from {paths['sql']} failed: vLLM answered 400")
    assert "no such file or folder" in state["gone"]
    vllm.broken = set()
    run(adapters, vllm)
    assert adapters.state()["adapters"]["sql"] == LOADED
