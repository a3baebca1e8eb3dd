"""The fleet's OpenAI endpoint: one Serve deployment (``router``) whose replicas serve HTTP themselves.

Each router replica runs its own HTTP server (uvicorn with uvloop and httptools, in a thread of
its own) on the fleet's OpenAI port, bound with SO_REUSEPORT: ``openai.workers`` replicas on a
node are that many processes sharing the port, and the kernel spreads connections over them.
Serve's own HTTP proxy is off (``proxy_location: Disabled``), so no request crosses a Ray actor
call: bytes go client → router process → the engine's vLLM server and back. It is still a Serve
app, so the reconciler starts, updates and stops it with the fleet like any other.

Inside a replica, one file per concern:
- ``serve_app.ingress``: the HTTP server (``Server``, on ``listen_socket``) and ``Ingress`` (raw ASGI),
  which answers the relay routes itself and hands the rest to the ASGI app it is given.
- ``serve_app.relay``: ``Relay`` (in the server's loop) knows every engine replica's URL
  (``serve_app.endpoints``) and sends each request to the one of its model with the fewest in flight.
- ``serve_app.openai_api`` (``/v1/models``) and ``serve_app.ollama_api`` (Ollama's ``/api/``): the
  FastAPI routes of ``web_app``, which reach the relay through ``request.app.state.relay``.
- here, ``Router`` (the Serve deployment, in Serve's loop) does what needs Serve: finding a model's
  engine and waiting, bounded by ``load_timeout_s``, while it starts (``endpoint()`` on its
  handle, which also wakes it), the applications' states, and refreshing the URL registry.

Errors have OpenAI's shape ``{"error": {"message", "type", "code"}}``: unknown model → 404,
engine unavailable → 503 with the reason, missing/wrong API key → 401. A model its engine unloaded
or put to sleep is brought back by the engine's ``endpoint()``, which the relay reaches when it
knows no URL or the known ones refuse; /v1/models shows each model's lifecycle state from the
engine's ``state()``. Only the OpenAI paths below are relayed: vLLM's dev endpoints (/sleep,
/wake_up) never are. The model list, API-key env names and load timeout are ``user_config``
(docs/contracts.md): ``reconfigure`` swaps them in place. Host and port are the app's ``args``:
changing them restarts the router on the new port. The same port answers Ollama's API under
/api/ (serve_app/ollama.py translates it onto the same engines, through the relay).
import_path ``serve_app.router:app``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve_app import endpoints, ingress, metrics, observe_api, ollama_api, openai_api
from serve_app.contract import (
    ENGINE_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    SERVE_APP_STATE,
    SWAP_APP,
    SWAP_DEPLOYMENT,
    ModelState,
    missing_node,
    node_gone_message,
    node_resource,
)
from serve_app.relay import Relay, Unavailable, settings_from

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
STATUS_POLL_S = 1.0
STATUS_CACHE_S = 2.0
REGISTRY_REFRESH_S = 2.0
LIFECYCLE_TIMEOUT_S = 5.0
# A model whose own measured load takes longer than load_timeout_s is still waited for: a fixed bound
# below its real start time would answer every cold request with a 503. Bound: 1.5 x its last load + 30 s.
HOLD_FACTOR, HOLD_MARGIN_S = 1.5, 30.0


def hold_bound(load_timeout_s: float, last_load_s: float | None) -> float:
    """Seconds the router holds a request for a model coming up: load_timeout_s, or longer when the
    model's last measured load (the engine's own) says it needs longer."""
    if last_load_s is None:
        return load_timeout_s
    return max(load_timeout_s, HOLD_FACTOR * last_load_s + HOLD_MARGIN_S)
# Application status → the model's live state as /v1/models shows it (the fleet's one vocabulary).
LIVE_STATE = {status: state.value for status, state in SERVE_APP_STATE.items()}


def web_app(relay: Relay, recorder: metrics.Recorder | None = None, metrics_dir: Any = None) -> FastAPI:
    """What the ingress does not relay: OpenAI's /v1/models, Ollama's API over the same relay, and
    the endpoint's /metrics and /fleet/lifecycle (serve_app.observe_api)."""
    api = FastAPI(title="vLLM Fleet", docs_url=None, redoc_url=None, openapi_url=None)
    api.state.relay = relay
    api.state.recorder = recorder or metrics.Recorder()
    api.state.metrics_dir = metrics_dir
    openai_api.add_routes(api)
    ollama_api.add_routes(api)
    observe_api.add_routes(api)
    return api


def _reason(exc: BaseException) -> str:
    # Serve wraps the engine's exception (RayTaskError); its `cause` has the readable message.
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip()[-2000:] or type(cause).__name__



def _live_state(app: Any) -> tuple[str, str]:
    """A Serve application's state word and message; "unavailable" while its node is gone."""
    status = str(getattr(app.status, "value", app.status))
    if status != "RUNNING":
        for dep in (getattr(app, "deployments", None) or {}).values():
            node = missing_node(str(getattr(dep, "message", "") or ""))
            if node:
                return ModelState.UNAVAILABLE.value, node_gone_message(node)
    return LIVE_STATE.get(status, "unknown"), app.message



# ---- the Serve deployment ----


@serve.deployment(name=ROUTER_DEPLOYMENT)
class Router:
    """The fleet ingress: an HTTP server per replica; Serve-side discovery for the relay."""

    async def __init__(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        self._loop = asyncio.get_running_loop()  # Serve's loop for this replica's methods
        self._settings = settings_from({})
        self._handles: dict[str, DeploymentHandle] = {}
        self._status: tuple[float, dict[str, tuple[str, str]]] = (0.0, {})
        self._replica = serve.get_replica_context().replica_id.unique_id
        relay = Relay(self._settings, self._bridge(self._discover), self._bridge(self._app_states),
                      self._bridge(self._lifecycles), await asyncio.to_thread(endpoints.engine_token),
                      admit=self._bridge(self._enter), leave=self._leave)
        recorder, folder = metrics.Recorder(), await asyncio.to_thread(metrics.metrics_dir, port)
        self._server = ingress.Server(ingress.listen_socket(host, port), relay, web_app(relay, recorder, folder),
                                      recorder, folder)
        await asyncio.to_thread(self._server.wait_started, 30.0)
        self._refresher = asyncio.ensure_future(self._refresh_registry())
        logger.info("fleet ingress listening on %s:%d (pid %d)", host, port, os.getpid())

    def _bridge(self, fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Awaitable[T]]:
        """``fn`` runs in Serve's loop; the wrapper is awaited in the server's loop."""
        def call(*args: Any) -> Awaitable[T]:
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), self._loop))
        return call

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Swap the model list, keys and load timeout in place."""
        self._settings = settings_from(user_config)
        self._server.call(setattr, self._server.relay, "settings", self._settings)
        for gone in set(self._handles) - set(self._settings.models):
            self._handles.pop(gone, None)

    def check_health(self) -> None:
        if not self._server.alive:
            raise RuntimeError("the fleet ingress's HTTP server is not running (see the replica log)")

    async def _refresh_registry(self) -> None:
        """Keep the relay's view of every engine replica's URL current; report swap admissions held."""
        while True:
            try:
                listed = await asyncio.to_thread(endpoints.listed)
                urls = {model: [r.url for r in regs] for model, regs in listed.items()}
                self._server.call(self._server.relay.set_registered, urls)
            except Exception as e:  # the GCS may be briefly away; the next round tries again
                logger.warning("reading the engine registry failed: %r", e)
            if any(spec.get("swap_group") for spec in self._settings.models.values()):
                try:
                    await self._report()
                except Exception as e:  # the coordinator may be restarting; the next round tries again
                    logger.warning("reporting swap admissions failed: %r", e)
            await asyncio.sleep(REGISTRY_REFRESH_S)

    # ---- swap groups: every request for a member is admitted by its group's coordinator ----
    # Exact in-flight counts (serve_app.swap): each admission is a ticket this replica holds until the
    # request's last byte (or its failure) and then gives back; every REGISTRY_REFRESH_S it reports the
    # tickets it holds, so a lost give-back or a restarted coordinator is set right within seconds.
    # Each router replica (openai.workers) holds its own tickets: the coordinator adds them up, and drops
    # those of a replica that stops reporting. Only the relay sends to an engine, and it asks for a
    # ticket for every request to a member, so none reaches a member uncounted.

    def _coordinator(self) -> DeploymentHandle:
        return serve.get_deployment_handle(SWAP_DEPLOYMENT, app_name=SWAP_APP, _check_exists=False)

    async def _enter(self, group: str, model: str) -> str | None:
        """Wait for ``model``'s turn (bounded by load_timeout_s): a ticket, or None when the coordinator is away."""
        bound = self._settings.load_timeout_s
        try:
            answer = await asyncio.wait_for(self._coordinator().enter.remote(group, model, self._replica),
                                            None if math.isinf(bound) else bound)
        except TimeoutError:
            raise Unavailable(f"The model `{model}` waited {bound:.0f} s (load_timeout_s) for its turn in swap "
                              f"group `{group}`.") from None
        except Exception as e:  # the coordinator away: relay unscheduled (the engine still refuses to cut a request)
            logger.warning("swap group %s: no admission for %s (%s); relaying unscheduled", group, model, _reason(e))
            return None
        if answer.get("busy"):
            raise Unavailable(str(answer["busy"]))
        ticket = answer.get("ticket")
        return str(ticket) if ticket else None

    def _leave(self, ticket: str) -> None:
        """Give a ticket back (from the server's loop; the call runs in Serve's, and is not waited for)."""
        asyncio.run_coroutine_threadsafe(self._give_back(ticket), self._loop)

    async def _give_back(self, ticket: str) -> None:
        try:
            await self._coordinator().leave.remote(ticket)
        except Exception as e:  # the next report drops it
            logger.warning("giving a swap admission back failed: %s", _reason(e))

    async def _report(self) -> None:
        tickets = {t: list(gm) for t, gm in dict(self._server.relay.tickets).items()}
        await asyncio.wait_for(self._coordinator().report.remote(self._replica, tickets), LIFECYCLE_TIMEOUT_S)

    # ---- discovery (Serve's loop; off the hot path) ----

    async def _discover(self, model: str) -> str:
        """A URL of the model's engine, waiting (bounded) while it starts.

        ``endpoint()`` on the app's handle goes to a live replica (and is where a sleeping model
        is woken); meanwhile the app's state ends the wait early when it failed or is gone.
        """
        call = asyncio.ensure_future(self._call_endpoint(self._handle(model)))
        t0 = time.monotonic()
        bound = self._settings.load_timeout_s
        measured = False
        try:
            while not call.done():
                await asyncio.wait({call}, timeout=STATUS_POLL_S)
                if call.done():
                    break
                state, message = (await self._app_states(fresh=True)).get(model, ("absent", ""))
                if state in ("failed", "absent", "unavailable"):
                    raise Unavailable(f"The model `{model}` is {state}: {message}".rstrip(": "))
                if time.monotonic() - t0 > bound and not measured:
                    measured = True  # past load_timeout_s: does this model's own last load say it needs longer?
                    lifecycle = (await self._lifecycles([model])).get(model) or {}
                    bound = hold_bound(bound, lifecycle.get("load_seconds"))
                if time.monotonic() - t0 > bound:
                    state = "loading" if state == "ready" else state  # a running engine loading on demand
                    raise Unavailable(
                        f"The model `{model}` is still {state} after {bound:.0f} s (load_timeout_s "
                        f"{self._settings.load_timeout_s:.0f} s, or longer when its last load took longer). "
                        f"{message}".strip()
                    )
            return call.result()
        except Unavailable:
            raise
        except Exception as e:
            raise Unavailable(f"The engine of `{model}` is not available: {_reason(e)}") from e
        finally:
            call.cancel()

    def _handle(self, model: str) -> DeploymentHandle:
        handle = self._handles.get(model)
        if handle is None:
            handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model, _check_exists=False)
            self._handles[model] = handle
        return handle

    async def _lifecycles(self, models: list[str]) -> dict[str, dict[str, Any] | None]:
        """Each running engine's lifecycle state (awake, asleep, unloaded, loading...); None if it does not answer."""
        async def one(model: str) -> dict[str, Any] | None:
            try:
                return dict(await asyncio.wait_for(self._handle(model).state.remote(), LIFECYCLE_TIMEOUT_S))
            except Exception as e:
                logger.warning("no lifecycle state from %s: %s", model, _reason(e))
                return None

        return dict(zip(models, await asyncio.gather(*(one(m) for m in models)), strict=True))

    @staticmethod
    async def _call_endpoint(handle: DeploymentHandle) -> str:
        return str(await handle.endpoint.remote())

    async def _app_states(self, fresh: bool = False) -> dict[str, tuple[str, str]]:
        """Live state and message per Serve application, cached for STATUS_CACHE_S."""
        at, states = self._status
        if fresh or time.monotonic() - at > STATUS_CACHE_S:
            status = await asyncio.to_thread(serve.status)  # a blocking controller call
            states = {name: _live_state(app) for name, app in status.applications.items()}
            pinned = {name: spec["node"] for name, spec in self._settings.models.items() if spec.get("node")}
            if pinned:  # a pinned model's node gone: unavailable at once, before Serve's own word
                alive = await asyncio.to_thread(ray.cluster_resources)  # alive nodes only
                for name, node in pinned.items():
                    if node_resource(node) not in alive and name in states:
                        states[name] = (ModelState.UNAVAILABLE.value, node_gone_message(node))
            self._status = (time.monotonic(), states)
        return states

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown: let streams in flight end, free the port.
        refresher = getattr(self, "_refresher", None)
        if refresher is not None:
            refresher.cancel()
        server = getattr(self, "_server", None)  # __del__ may run on a half-built instance
        if server is not None:
            server.stop()


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: host and port come as args, everything else as user_config."""
    return Router.bind(host=str(args.get("host", "127.0.0.1")), port=int(args.get("port", 8000)))
