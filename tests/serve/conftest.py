"""One shared two-model fleet on real Ray Serve + vLLM (CPU) for the tests in this folder.

Each vLLM start costs about a minute on this box, so the fleet is started once for the folder (and
stopped with its head when the folder is done, so it takes no CPU from the tests after it):
a tiny random Llama (generate) and all-MiniLM-L6-v2 (embed) behind the router.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from openai import OpenAI

from reconciler.live.cluster import Head, free_port, gpu_resources, start_head, stop_head
from tests.fixtures import serve_api

GEN, EMB = "tiny-chat", "minilm"
# Not a secret: a key that only this test cluster's router accepts.
TEST_API_KEY_ENV = "FLEET_TEST_API_KEY"
TEST_API_KEY = "fleet-test-key"


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A Ray head of our own (free ports, short temp dir), stopped with everything it ran."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    head = start_head(
        num_cpus=8,
        resources=gpu_resources(0),
        object_store_bytes=256 * 1024**2,
        env={TEST_API_KEY_ENV: TEST_API_KEY, "FLEET_LOG_DIR": str(logs)},
    )
    try:
        yield head
    finally:
        stop_head(head)


@pytest.fixture(scope="package")
def dashboard(ray_head: Head) -> str:
    """Base URL of the dashboard (Serve's REST API lives there)."""
    return ray_head.dashboard_url


@pytest.fixture(scope="package")
def serve_http_port() -> int:
    """The port the fleet's OpenAI endpoint (the router's own HTTP servers) binds."""
    return free_port()


@pytest.fixture(scope="package")
def serve_put(dashboard: str):  # type: ignore[no-untyped-def]
    """``serve_put(apps)``: PUT a full config with these applications, as apply does."""

    def put(apps: list[dict]) -> None:  # type: ignore[type-arg]
        serve_api.serve_put(dashboard, serve_api.serve_config(apps))

    return put


@pytest.fixture(scope="package")
def api_key() -> str:
    """The key the router accepts once TEST_API_KEY_ENV is in its api_key_envs."""
    return TEST_API_KEY


@dataclass
class Fleet:
    """The running test fleet and how to reach it."""

    dashboard: str
    base_url: str  # the router's OpenAI base, …/v1
    port: int  # the OpenAI endpoint's port
    root: Path  # where the fleet file is written
    models: dict[str, dict[str, Any]]  # the fleet's models: section
    put: Callable[[list[dict[str, Any]]], None]

    def client(self, api_key: str = "unused", **kw: Any) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=api_key, **{"max_retries": 0, "timeout": 120.0, **kw})

    def apply(self, **fleet_kw: Any) -> None:
        """Compile the current models (with openai settings ``fleet_kw``) and PUT them, as apply does."""
        self.put(serve_api.compile_apps(self.root, self.models, port=self.port, **fleet_kw))


@pytest.fixture(scope="package")
def fleet(
    dashboard: str, serve_http_port: int, serve_put: Callable[..., None], tiny_llama_path: Path, minilm_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    models: dict[str, dict[str, Any]] = {
        # a long context, so an abandoned 1000-token stream is still generating when the abort lands
        # idle_timeout never: tests that follow its vLLM process by pid must not see it unloaded when idle
        GEN: {"source": str(tiny_llama_path), "task": "generate", "idle_timeout": "never",
              "engine": {"max_model_len": 1024}},
        EMB: {"source": str(minilm_path), "task": "embed", "always_on": True, "engine": {"max_model_len": 256}},
    }
    root = tmp_path_factory.mktemp("serve-fleet")
    fleet = Fleet(dashboard, f"http://127.0.0.1:{serve_http_port}/v1", serve_http_port, root, models, serve_put)
    fleet.apply()
    serve_api.wait_running(dashboard, ["router", GEN, EMB])
    yield fleet


@pytest.fixture(scope="package")
def ray_driver(ray_head: Any) -> Iterator[None]:
    """This test process joined to the test cluster, to ask engines for their info()."""
    import ray

    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    yield
    ray.shutdown()


class Answered(NamedTuple):
    """What a client of a generation checks, never the text (the tiny Llama's is gibberish, maybe
    empty): why the answer ended and how many tokens the engine generated."""

    finish_reason: str | None
    completion_tokens: int | None


ASK_TOKENS = 4
# What ask() gets whenever the engine answered: ignore_eos makes it generate exactly ASK_TOKENS.
ANSWERED = Answered("length", ASK_TOKENS)


def ask(client: OpenAI, model: str, *, chat: bool, stream: bool, text: str = "hi") -> Answered:
    """One generation of ASK_TOKENS tokens (chat or completions, streamed or not): its Answered.

    A refusal raises (openai.APIStatusError); an answer without choices, finish_reason or usage
    (an empty body, a stream cut short) gives None fields, so ``== ANSWERED`` fails.
    """
    kw: dict[str, Any] = {"model": model, "max_tokens": ASK_TOKENS, "extra_body": {"ignore_eos": True}}
    if chat:
        kw["messages"] = [{"role": "user", "content": text}]
    else:
        kw["prompt"] = text
    create = client.chat.completions.create if chat else client.completions.create
    if not stream:
        reply = create(**kw)
        return Answered(reply.choices[0].finish_reason if reply.choices else None,
                        reply.usage.completion_tokens if reply.usage else None)
    finish, tokens = None, None
    for chunk in create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return Answered(finish, tokens)


def engine_info(model: str) -> dict[str, Any]:
    """The engine replica's info(): url, replica_pid, guard_pid, log_path, ... (needs ray_driver)."""
    from ray import serve

    return dict(serve.get_app_handle(model).info.remote().result(timeout_s=60))


