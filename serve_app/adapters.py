"""LoRA adapters in an engine's running vLLM: load the ones its user_config names, unload the others.

vLLM started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (compile adds both for a model
with adapters) serves ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and
``/v1/unload_lora_adapter {"lora_name"}``; a loaded adapter is a model name of that server, so the router
sends an adapter's requests to its base's engine under the adapter's own name. A new vLLM process has no
adapter, so the engine syncs after every start of its child, after a wake (an edit may have come while it
slept), and on every reconfigure (adding or removing one is an in-place change).

An adapter that fails to load never takes its base down: the failure is logged, shown in the engine's
``state()`` (``adapters: {name: "loaded" | why not}``) and tried again at the next sync. A source resolves
as a model's does (serve_app.model_source): an absolute path, pkg://, or hf:// from the Hub cache
(`fleetctl pull` fetches adapters with their base; a missing one is downloaded here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import httpx

from serve_app import model_source
from serve_app import source as sources

logger = logging.getLogger("ray.serve")

LOADED = "loaded"
LOAD_TIMEOUT_S = 120.0  # reading an adapter's weights; generous for a large one on a busy box


def local_path(source: str) -> str:
    """The folder vLLM loads an adapter from (blocking: an hf:// adapter not in the cache is downloaded)."""
    hub = sources.hub(source)
    if hub is not None:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(hub.repo, revision=hub.revision))
    return str(model_source.local_path(source))


class Adapters:
    """What one engine's vLLM should hold (``wanted``), what it holds (``loaded``), and each one's outcome."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.wanted: dict[str, str] = {}  # name → source, from the user_config
        self.loaded: dict[str, str] = {}  # name → the source it was loaded from, in the current vLLM process
        self.outcome: dict[str, str] = {}  # name → LOADED or why it is not

    def want(self, adapters: Mapping[str, str] | None) -> None:
        self.wanted = dict(adapters or {})
        self.outcome = {name: why for name, why in self.outcome.items() if name in self.wanted}

    async def sync(self, client: httpx.AsyncClient, url: str, fresh: bool = False) -> None:
        """Unload what is loaded but not wanted (or from another source), then load what is missing.
        ``fresh``: a vLLM process that just started (it holds nothing). Never raises for one adapter."""
        if fresh:
            self.loaded = {}
        for name, source in list(self.loaded.items()):
            if self.wanted.get(name) != source:
                await self._unload(client, url, name)
        for name, source in self.wanted.items():
            if name not in self.loaded:
                await self._load(client, url, name, source)

    async def _load(self, client: httpx.AsyncClient, url: str, name: str, source: str) -> None:
        try:
            path = await asyncio.to_thread(local_path, source)
            response = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                                         timeout=LOAD_TIMEOUT_S)
        except (httpx.HTTPError, OSError, ValueError) as e:  # SourceError is a ValueError; the Hub's errors OSError
            self._failed(name, source, f"{type(e).__name__}: {e}")
            return
        if response.status_code != 200:
            self._failed(name, source, f"vLLM answered {response.status_code}: {response.text[:300]}")
            return
        self.loaded[name] = source
        self.outcome[name] = LOADED
        logger.info("adapter %s loaded into %s's vLLM from %s", name, self.model, source)

    def _failed(self, name: str, source: str, why: str) -> None:
        self.outcome[name] = f"loading adapter {name!r} from {source} failed: {why}"
        logger.warning("%s (model %s); tried again at its next reconfigure or start", self.outcome[name], self.model)

    async def _unload(self, client: httpx.AsyncClient, url: str, name: str) -> None:
        try:
            response = await client.post(url + "/v1/unload_lora_adapter", json={"lora_name": name},
                                         timeout=LOAD_TIMEOUT_S)
        except httpx.HTTPError as e:
            logger.warning("unloading adapter %s from %s's vLLM failed: %r", name, self.model, e)
            return  # still loaded: the next sync tries again
        if response.status_code not in (200, 404):  # 404: vLLM no longer has it, which is what we want
            logger.warning("unloading adapter %s from %s's vLLM: %d %s", name, self.model, response.status_code,
                           response.text[:300])
            return
        del self.loaded[name]
        logger.info("adapter %s unloaded from %s's vLLM", name, self.model)

    def state(self) -> dict[str, dict[str, str]]:
        """For the engine's ``state()``: each wanted adapter's outcome (absent when the model has none)."""
        if not self.wanted:
            return {}
        return {"adapters": {name: self.outcome.get(name, "not loaded yet") for name in sorted(self.wanted)}}
