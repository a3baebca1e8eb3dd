"""The model engine: one Serve deployment (``engine``) per model.

Each replica runs vLLM's own OpenAI server as a child process (``serve_app.vllm_child``; under
``serve_app.guard``, so no vLLM process outlives the replica, even a SIGKILLed one), waits for its
``/health``, reports the child's health to Serve, and hands the router the child's URL so requests go straight to vLLM.
It serves no requests itself: the router relays them.

The model's lifecycle (serve_app.lifecycle) lives here too: an idle model goes to sleep (GPU) or
is unloaded (its child stops) while the replica stays RUNNING; ``endpoint()`` brings it back.

import_path ``serve_app.engine:app``; the args are the ``args`` of docs/contracts.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import httpx
from ray import serve
from ray.serve import Application, metrics

from serve_app import adapters, endpoints, gpu_turns, lifecycle, vllm_child
from serve_app.contract import (
    ENGINE_DEPLOYMENT,
    SWAP_APP,
    SWAP_DEPLOYMENT,
    EngineArgs,
    EngineUserConfig,
    LifecycleRecord,
    ModelState,
    engine_log_name,
    engine_start_attempts,
)
from serve_app.contract import deadline as contract_deadline

logger = logging.getLogger("ray.serve")

REASON_CHARS = 1800  # the router shows at most 2000 characters of an engine's error


def _replica_rank() -> int:
    """This replica's rank in its deployment (0..replicas-1), where this Ray's Serve has ranks."""
    rank = getattr(serve.get_replica_context(), "rank", None)
    return int(getattr(rank, "rank", rank) or 0)



def brief(message: str, limit: int = REASON_CHARS) -> str:
    """A long error (a summary line, then vLLM's log tail) cut to ``limit`` characters, keeping its
    first line (what failed) and its end (vLLM's own last words)."""
    if len(message) <= limit:
        return message
    first, _, rest = message.partition("\n")
    first = first[: limit // 2]
    return f"{first}\n...\n{rest[-(limit - len(first) - 5):]}"



def _host_ram_short() -> bool:
    try:
        import psutil  # Ray's own dependency; absent only in unusual installs, where the rule is skipped
    except ImportError:
        return False
    memory = psutil.virtual_memory()
    return lifecycle.host_ram_short(memory.available, memory.total)


class LoadFailed(RuntimeError):
    """A load on demand failed; the message is the engine's own reason (the tail of vLLM's log)."""


@serve.deployment(name=ENGINE_DEPLOYMENT, max_constructor_retry_count=engine_start_attempts())
class Engine:
    """One vLLM OpenAI server, as a guarded child process of this replica, with its lifecycle.

    The replica stays RUNNING and healthy while its model sleeps or is unloaded; only the child
    comes and goes. One task at a time changes the child (under ``_lock``); a load or wake asked
    for by many requests at once is one shared task.
    """

    async def __init__(self, args: EngineArgs) -> None:
        model = args.model
        self._args = args
        self._model = model
        self._gpus = list(args.gpus)
        self._gpu_claim = None  # with replica_gpus: the lock that holds this replica's own set of them
        if args.replica_gpus and args.replica_gpus < len(self._gpus):
            self._gpus, self._gpu_claim = await gpu_turns.claim_gpus(
                model, self._gpus, args.replica_gpus, _replica_rank(), self._waiting_for_gpu_set)
        environ = vllm_child.child_env(args.env, self._gpus)
        self._start_timeout_s = args.start_timeout_s  # None: never (`start_timeout: never`)
        self._swap_group = args.swap_group
        self._can_sleep = args.sleep_mode
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._registered = False
        self._rules = lifecycle.Rules()
        self._state = ModelState.LOADING
        self._since = time.time()
        self._reason = ""
        self._activity = lifecycle.Activity(last_at=time.monotonic())
        self._counters = lifecycle.Counters()
        # Prometheus, through Ray's metrics export (Serve adds application/deployment/replica tags).
        self._transitions = metrics.Counter(
            "fleet_model_transitions", "Model lifecycle transitions (load, load_failed, unload, sleep, wake).",
            tag_keys=("model", "transition"))
        self._durations = metrics.Histogram(
            "fleet_model_transition_seconds", "How long each lifecycle transition took.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600], tag_keys=("model", "transition"))
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # set on every change of state: the watch loop re-times itself
        self._unpublished = asyncio.Event()  # a transition or state not yet in the cluster's KV (_publish)
        self._publisher = asyncio.get_running_loop().create_task(self._publish())
        self._up: asyncio.Task[None] | None = None
        self._adapters = adapters.Adapters(model)  # LoRA adapters in its vLLM (serve_app.adapters)
        self._child = vllm_child.Child(
            model, environ, vllm_child.log_dir() / engine_log_name(model, os.getpid()),
            await asyncio.to_thread(vllm_child.listen_host), await asyncio.to_thread(endpoints.engine_token))
        if args.swap_group:
            # A swap member starts unloaded: loading it here could break its group's limit. Its
            # first request (or `fleetctl load`) loads it, once the group's coordinator made room.
            self._set(ModelState.UNLOADED)
        else:
            async with self._lock:
                await self._load()  # a model that cannot start at deploy time fails the deploy, as before
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # ---- the child process ----

    async def _register(self) -> None:
        """Tell the routers where this replica's vLLM listens (and that it still does)."""
        await asyncio.to_thread(endpoints.register, self._model, self._replica, self._child.url)
        self._registered = True

    async def _unregister(self) -> None:
        """Routers stop sending here (before a sleep or an unload); endpoint() brings them back."""
        if self._registered:
            self._registered = False
            await asyncio.to_thread(endpoints.unregister, self._model, self._replica)

    async def _load(self) -> None:
        """Start vLLM and wait for its /health (caller holds the lock); state awake, or failed and raise."""
        self._set(ModelState.LOADING)
        t0 = time.monotonic()
        deadline = contract_deadline(t0, self._start_timeout_s)
        try:
            resolved = await self._child.prepare(self._args.source, self._start_timeout_s)
            argv = self._child.argv(resolved, self._args.runner, self._args.engine_argv)
            async with gpu_turns.start_turn(self._gpus, self._waiting_for_gpu):
                # the wait is not its start
                deadline = max(deadline, contract_deadline(time.monotonic(), self._start_timeout_s))
                self._child.start(argv)
                await self._child.wait_ready(deadline)
        except BaseException as e:
            self._stop_child()
            self._record("load_failed", t0)
            self._set(ModelState.FAILED, brief(str(e)))
            raise
        await self._adapters.sync(self._child.client, self._child.url, fresh=True)  # a new vLLM holds none
        self._record("load", t0)
        self._activity.restart(time.monotonic())
        self._set(ModelState.AWAKE)
        await self._register()  # the port may be new after an unload
        logger.info("vLLM for %s is ready at %s (guard pid %s)", self._model, self._child.url,
                    self._child.last_guard_pid)

    def _waiting_for_gpu_set(self, gpus: list[int]) -> None:
        logger.info("%s waits for a set of its GPUs %s: other replicas of it hold every set (an old one "
                    "still stopping?)", self._model, gpus)

    def _waiting_for_gpu(self, gpu: int) -> None:
        logger.info("%s waits for GPU %d: another engine is starting there (vLLM sizes its cache from free memory)",
                    self._model, gpu)

    def _stop_child(self) -> None:
        # a swap member: the next member must find the memory free, so wait out the whole tree
        self._child.stop(wait_tree=bool(self._swap_group))

    async def _unload(self) -> None:
        """Stop the child (caller holds the lock): memory freed, the replica stays."""
        self._set(ModelState.UNLOADING)
        t0 = time.monotonic()
        await self._unregister()
        await asyncio.to_thread(self._stop_child)  # up to the guard's grace; keep the event loop free
        self._activity.in_flight = 0
        self._record("unload", t0)
        self._set(ModelState.UNLOADED)

    async def _sleep(self) -> None:
        """vLLM sleep mode level 1 (caller holds the lock): weights to host RAM, GPU memory freed."""
        self._set(ModelState.SLEEPING)
        t0 = time.monotonic()
        await self._unregister()  # a sleeping vLLM must get no requests
        try:
            await self._child.sleep()
        except httpx.HTTPError as e:
            logger.warning("vLLM for %s did not go to sleep (%r); unloading it instead", self._model, e)
            await self._unload()
            return
        self._record("sleep", t0)
        self._set(ModelState.ASLEEP)

    async def _wake(self) -> None:
        self._set(ModelState.WAKING)
        t0 = time.monotonic()
        try:
            # a wake allocates the KV cache again: not while another engine on the GPU measures its start
            async with gpu_turns.start_turn(self._gpus, self._waiting_for_gpu):
                await self._child.wake()
        except httpx.HTTPError as e:  # a broken sleeper: start afresh
            logger.warning("vLLM for %s did not wake (%r); reloading it", self._model, e)
            self._stop_child()
            await self._load()
            return
        await self._adapters.sync(self._child.client, self._child.url)  # an edit may have come while asleep
        self._record("wake", t0)
        self._activity.touch(time.monotonic())
        self._set(ModelState.AWAKE)
        await self._register()

    def _record(self, transition: str, t0: float) -> None:
        seconds = time.monotonic() - t0
        self._counters.add(transition, seconds)
        self._unpublished.set()
        tags = {"model": self._model, "transition": transition}
        self._transitions.inc(tags=tags)
        self._durations.observe(seconds, tags=tags)

    def _set(self, state: ModelState, reason: str = "") -> None:
        if state is not self._state:
            logger.info("model %s: %s -> %s", self._model, self._state.value, state.value)
            self._changed.set()
            self._unpublished.set()
        self._state, self._since, self._reason = state, time.time(), reason

    # ---- bringing the model up on demand ----

    async def _bring_up(self) -> None:
        """Load or wake the model; concurrent callers share one attempt, a failed one is not reused."""
        if self._up is None or self._up.done():
            self._up = asyncio.get_running_loop().create_task(self._up_once())
            # Retrieved here too, so a failure whose every waiter left is not logged as unretrieved.
            self._up.add_done_callback(lambda t: t.cancelled() or t.exception())
        # Shielded: a caller that gives up (router timeout, client gone) must not cancel the others' load.
        await asyncio.shield(self._up)

    async def _up_once(self) -> None:
        async with self._lock:
            if self._state is ModelState.AWAKE:
                return
            t0 = time.monotonic()
            grant = await self._acquire_turn()
            try:
                if self._state is ModelState.ASLEEP:
                    await self._wake()
                else:
                    await self._load()
                if grant is not None:  # a swap, as this member's next request sees it (less the routing)
                    self._record("swap", t0)
            except Exception as e:
                raise LoadFailed(brief(f"loading {self._model!r} failed: {e}")) from None
            finally:
                if grant is not None:
                    await self._release_turn(grant)

    # ---- swap groups: take turns with the other members (serve_app/swap.py decides) ----

    def _coordinator(self) -> Any:
        return serve.get_deployment_handle(SWAP_DEPLOYMENT, app_name=SWAP_APP, _check_exists=False)

    async def _acquire_turn(self) -> str | None:
        """For a swap member: wait until the group has room (others put to sleep or unloaded)."""
        if not self._swap_group:
            return None
        t0 = time.monotonic()
        # The lease frees the group when a member dies mid-load; with no start bound, a day.
        bound = 86400.0 if self._start_timeout_s is None else min(self._start_timeout_s, 86400.0)
        lease_s = bound + 2 * vllm_child.STOP_GRACE_S + 30.0
        try:
            token = str(await self._coordinator().acquire.remote(self._swap_group, self._model, lease_s))
        except Exception as e:  # GroupBusy (its message says why), or the coordinator is away
            cause = getattr(e, "cause", None) or e
            raise LoadFailed(brief(str(cause).strip() or repr(cause))) from None
        self._record("swap_wait", t0)
        return token

    async def _release_turn(self, token: str) -> None:
        try:
            await self._coordinator().release.remote(self._swap_group, token)
        except Exception:  # its lease frees the group anyway
            logger.exception("releasing the swap group %s", self._swap_group)

    async def evict(self) -> bool:
        """The swap coordinator makes room: sleep (GPU) or unload now, unless requests are in flight
        (a busy member is never cut). True when this member holds nothing any more.

        The coordinator asks only once the routers' exact count of this member's requests is 0 and no
        router admits new ones (serve_app.swap), so no quiet time is waited here. vLLM's own in-flight
        signal is a second guard (a request the coordinator does not know of: seconds after its restart)."""
        async with self._lock:
            if self._state is not ModelState.AWAKE:
                return self._state in (ModelState.ASLEEP, ModelState.UNLOADED, ModelState.FAILED)
            await self._observe()
            if self._activity.in_flight:
                return False
            if self._can_sleep:
                await self._sleep()
            else:
                await self._unload()
            self._record("swapped_out", time.monotonic())
        return True

    async def _publish(self) -> None:
        """This replica's lifecycle record into the cluster's KV after each change (the endpoint's /metrics
        and the status page read it there, from every replica); one write at a time, the newest state."""
        while True:
            await self._unpublished.wait()
            self._unpublished.clear()
            record = LifecycleRecord(model=self._model, replica=self._replica, at=time.time(),
                                     state=self._state.value, since=self._since, **self._counters.record()).wire()
            try:
                await asyncio.to_thread(endpoints.publish_lifecycle, self._model, self._replica, record)
            except Exception as e:  # the GCS briefly away: the next change publishes again
                logger.warning("publishing the lifecycle of %s failed: %r", self._model, e)

    # ---- the idle rule ----

    async def _watch(self) -> None:
        """Look at the child now and then; apply the idle rule. The only caller of sleep/unload besides unload()."""
        while True:
            await self._pause()
            try:
                await self._observe()
                step = self._step()
                if step is not lifecycle.Step.NONE and not self._lock.locked():
                    await self._apply_step(step)
            except Exception:  # keep watching; the next look tries again
                logger.exception("lifecycle watch of %s", self._model)

    async def _pause(self) -> None:
        """One poll interval, cut short by a change of state. A member that its swap group put to sleep
        mid-interval otherwise kept an awake model's pace (5 s for a long idle_timeout), and a request
        that its sleeping vLLM held waited out the rest of it: swaps of 4.5 s against 0.7 s on an H200."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), lifecycle.poll_interval(self._state, self._rules))

    def _step(self) -> lifecycle.Step:
        if self._state in (ModelState.AWAKE, ModelState.ASLEEP) and not self._child.running:
            return lifecycle.Step.NONE  # died on its own: check_health reports it and Serve replaces us
        idle_s = time.monotonic() - self._activity.last_at
        ram_short = False
        if self._state is ModelState.ASLEEP:
            ram_short = _host_ram_short()
        return lifecycle.next_step(self._state, self._rules, idle_s, self._activity.in_flight, self._can_sleep,
                                   ram_short)

    async def _observe(self) -> None:
        if self._state not in (ModelState.AWAKE, ModelState.ASLEEP) or not self._child.running:
            return
        in_flight, finished = await self._child.activity()
        self._activity.observe(in_flight, finished, time.monotonic())

    async def _apply_step(self, step: lifecycle.Step) -> None:
        async with self._lock:
            await self._observe()  # look again under the lock: a request may have just arrived
            if self._step() is not step:
                return
            if step is lifecycle.Step.SLEEP:
                await self._sleep()
            elif step is lifecycle.Step.UNLOAD:
                await self._unload()
        if step in (lifecycle.Step.WAKE, lifecycle.Step.LOAD):
            await self._bring_up()

    # ---- what Serve, the router and operators call ----

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """In-place settings: idle_timeout_s, unload_after_s, always_on; the LoRA adapters its vLLM holds."""
        config = EngineUserConfig.parse(user_config)
        self._rules = lifecycle.Rules.from_user_config(config)
        self._adapters.want(config.adapters)
        async with self._lock:  # not mid-load or mid-sleep: a load or wake syncs them itself
            if self._state is ModelState.AWAKE:
                await self._adapters.sync(self._child.client, self._child.url)

    async def check_health(self) -> None:
        """Unhealthy only when a child that should run died or fails /health: Serve then replaces us.

        Loading, unloaded and failed are states of the model, not of the replica, which stays healthy
        so the next request can load it again.
        """
        if self._state not in (ModelState.AWAKE, ModelState.ASLEEP):
            return
        await self._child.check_health()
        if self._state is ModelState.AWAKE:
            await self._register()  # the refresh that keeps the registration from going stale

    async def endpoint(self) -> str:
        """The child's base URL, for the router to relay to: loads or wakes the model when it is down.

        Routers learn every replica's URL from ``serve_app.endpoints``; they call this when they
        know none for the model or its vLLM refused them (a model unloaded or asleep comes back here).
        Raises when the child died unexpectedly, or when the load failed (with vLLM's reason).
        """
        self._activity.touch(time.monotonic())
        if self._state is not ModelState.AWAKE:
            await self._bring_up()
        self._child.raise_if_exited("")
        return self._child.url

    async def load(self) -> dict[str, Any]:
        """Bring the model up now (`fleetctl load`); the idle rule applies again from now."""
        await self.endpoint()
        return await self.state()

    async def unload(self, force: bool = False) -> dict[str, Any]:
        """Unload now (`fleetctl unload`); refused for always-on models and, unless forced, while busy."""
        if self._rules.always_on:
            raise ValueError(f"{self._model!r} is always_on: it stays loaded; set always_on: false in the fleet "
                             "files to let it unload")
        async with self._lock:
            if self._state in (ModelState.UNLOADED, ModelState.FAILED):
                return await self.state()
            await self._observe()
            if self._activity.in_flight and not force:
                raise RuntimeError(f"{self._model!r} has {self._activity.in_flight} request(s) in flight; "
                                   "wait, or force it")
            await self._unload()
        return await self.state()

    async def state(self) -> dict[str, Any]:
        """The model's lifecycle state as status, /v1/models and operators show it."""
        last = time.time() - (time.monotonic() - self._activity.last_at)
        return {
            "state": self._state.value,
            "since": self._since,
            "reason": self._reason,
            "in_flight": self._activity.in_flight,
            "last_request_at": last,
            "idle_timeout_s": self._rules.idle_timeout_s,
            "unload_after_s": self._rules.unload_after_s,
            "always_on": self._rules.always_on,
            "can_sleep": self._can_sleep,
            "gpus": list(self._gpus),  # this replica's own (a set of the model's when its replicas split them)
            "swap_group": self._swap_group,
            "load_seconds": self._counters.last_s.get("load"),
            **self._counters.as_dict(),
            **self._adapters.state(),
        }

    async def info(self) -> dict[str, Any]:
        """What operators and tests look at: URL, pids, log file, in-place settings, lifecycle state."""
        return {
            "url": self._child.url,
            "replica_pid": os.getpid(),
            "guard_pid": self._child.proc.pid if self._child.proc else None,
            "last_guard_pid": self._child.last_guard_pid,
            "alive": self._child.running,
            "log_path": str(self._child.log_path),
            "idle_timeout_s": self._rules.idle_timeout_s,
            "always_on": self._rules.always_on,
            "lifecycle": await self.state(),
        }

    def _shutdown(self) -> None:
        if getattr(self, "_registered", False):
            self._registered = False
            with contextlib.suppress(Exception):  # the GCS may be gone with the cluster
                endpoints.unregister(self._model, self._replica)
        for task in (getattr(self, "_watcher", None), getattr(self, "_publisher", None)):  # __del__: maybe half-built
            if task is not None:
                task.cancel()
        child = getattr(self, "_child", None)
        if child is not None:
            child.stop()

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown; the guard covers every other way to die.
        self._shutdown()


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: the contract's engine ``args`` become constructor args."""
    return Engine.bind(EngineArgs.parse(args))
