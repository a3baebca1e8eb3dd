"""The fleet spec: what people write in fleet.yaml, as pydantic models. Pure data and its own checks.

Fleet-wide `defaults` are inherited by every model (see `Fleet.resolved`); what needs the machine
(GPU inventory, model sizes) is checked later, in placement.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from reconciler.fleetfiles.redact import ENV_REF
from reconciler.fleetfiles.units import parse_duration, parse_size
from serve_app import source as sources
from serve_app.contract import DEFAULT_MAX_WAIT_S, ROUTER_APP, SWAP_APP

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GROUP_NAME = MODEL_NAME
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENGINE_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
# A model name with shell-style wildcards (fnmatch: * ? [abc] [!abc]), as an API key's scope lists them.
MODEL_PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,64}$")
SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY)$", re.IGNORECASE)

# Engine args the fleet sets itself, and the field that says it instead.
FLEET_OWNED_ARGS = {
    "model": "source",
    "served_model_name": "the model's name (its key under models:)",
    "host": "openai.host (the router is the endpoint; engines listen on loopback, or their node's address)",
    "port": "openai.port (the router is the endpoint; engines get a free port)",
    "tensor_parallel_size": "tensor_parallel (or the number of gpus)",
    "gpu_memory_utilization": "gpu_memory",
    "revision": "source (hf://org/name@revision)",
    "task": "task",
    "runner": "task",
    "enable_sleep_mode": "sleep: (GPU models get sleep mode unless sleep: false)",
}
SECRET_ARGS = {"api_key", "hf_token", "token"}
RPM_MAX = 100_000  # the router keeps one timestamp per request in the window


def _duration(value: object) -> float:
    seconds = parse_duration(value)
    return math.inf if seconds is None else seconds


def _model_name(value: str) -> str:
    if not MODEL_NAME.match(value):
        raise ValueError(
            f"{value!r} cannot name a model: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it becomes both the Serve application name and the OpenAI model id)")
    if value == ROUTER_APP:
        raise ValueError(f"{value!r} is the name of the fleet's OpenAI router application; pick another name")
    if value == SWAP_APP:
        raise ValueError(f"{value!r} is the name of the fleet's swap-group application; pick another name")
    return value


def _group_name(value: str) -> str:
    if not GROUP_NAME.match(value):
        raise ValueError(f"{value!r} cannot name a swap group: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


def _node(value: str) -> str:
    """A node is named by its IP address, the one Ray knows it by (`ray start --node-ip-address`,
    `ray status`): Ray's own resource ``node:<ip>`` pins a replica there, and it is what someone
    who joined the machine typed or can read off it."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f"{value!r} is not a node's IP address; name the node by the IP Ray knows it by (the "
            "--node-ip-address given to `ray start`, listed by `ray list nodes`), e.g. 10.0.0.12") from None


NodeAddress = Annotated[str, AfterValidator(_node)]


def _source(value: str) -> str:
    sources.parse(value)  # SourceError is a ValueError: pydantic reports it at the field's line
    return value


def _env_var_name(example: str) -> Callable[[str], str]:
    """A validator for a field that names an environment variable (e.g. ``example``). A rejected
    value is never echoed: it may be the secret itself, pasted where its variable's name belongs."""
    def check(value: str) -> str:
        if ENV_NAME.match(value) and value.upper() == value:
            return value
        if len(value) >= 12 or value.startswith(("sk-", "hf_")) or not ENV_NAME.match(value):
            raise ValueError(f"this looks like an inline secret ({len(value)} characters); put the key in an "
                             f"environment variable and name the variable here, e.g. {example}")
        raise ValueError(f"environment-variable names here are upper case (this one, {len(value)} characters, "
                         f"is not), e.g. {example}")
    return check


Duration = Annotated[float, BeforeValidator(_duration), Field(
    json_schema_extra={"type": ["string", "number"],
                       "description": 'seconds, or a duration such as "90s", "15m", "1h30m", or "never"'})]
Size = Annotated[int, BeforeValidator(parse_size), Field(
    json_schema_extra={"type": ["string", "integer"], "description": 'bytes, or e.g. "24GiB", "16GB"'})]
ModelName = Annotated[str, AfterValidator(_model_name)]
GroupName = Annotated[str, AfterValidator(_group_name)]
Source = Annotated[str, AfterValidator(_source), Field(
    description="hf://org/name[@revision], pkg://python_package/path, or a local path")]
ApiKeyEnv = Annotated[str, AfterValidator(_env_var_name("api_keys: [FLEET_API_KEY]"))]
TokenEnv = Annotated[str, AfterValidator(_env_var_name("token_env: FLEET_STATUS_TOKEN"))]
EngineScalar = str | int | float | bool
EngineValue = EngineScalar | list[EngineScalar] | dict[str, Any]


class Strict(BaseModel):
    """Unknown keys are errors; specs never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_engine(engine: dict[str, Any]) -> dict[str, Any]:
    for key in engine:
        norm = key.replace("-", "_")
        if not ENGINE_KEY.match(key):
            raise ValueError(f"engine arg {key!r} is not a vLLM option name (e.g. max_model_len)")
        if norm in SECRET_ARGS:
            raise ValueError(f"engine arg {key!r} would put a secret in the fleet file; set it through "
                             "an environment variable (openai.api_keys names the variables for API keys)")
        if norm in FLEET_OWNED_ARGS:
            raise ValueError(f"engine arg {key!r} is set by the fleet; use {FLEET_OWNED_ARGS[norm]} instead")
        try:  # a nested dict reaches vLLM as JSON: no dates (YAML reads 2024-01-01 as one), no .nan or .inf
            json.dumps(engine[key], allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"engine arg {key!r} holds a date, .nan or .inf, which vLLM cannot take; quote it "
                             "to pass a string") from None
    return engine


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not ENV_NAME.match(key):
            raise ValueError(f"{key!r} is not an environment-variable name")
        if SECRET_ENV.search(key) and not ENV_REF.match(value):
            raise ValueError(f"{key} holds an inline secret; write {key}: \"${{{key}}}\" to pass it "
                             "through from the environment instead")
    return env


EngineArgs = Annotated[dict[str, EngineValue], AfterValidator(_check_engine), Field(
    description="vLLM engine args (as for `vllm serve`, without dashes: max_model_len: 8192)")]
Env = Annotated[dict[str, str], AfterValidator(_check_env), Field(
    description="environment for the engine process; secrets as \"${NAME}\" references")]


def _model_patterns(patterns: list[str]) -> list[str]:
    if not patterns:
        raise ValueError("an empty list lets the key use no model; list model names or patterns "
                         "(e.g. [qwen2.5-*]), or leave models out for every model")
    for pattern in patterns:  # the value is not echoed: a key pasted here by mistake must not show
        if not MODEL_PATTERN.match(pattern):
            raise ValueError(f"an entry ({len(pattern)} characters) is not a model name or pattern: use model "
                             "names with shell-style wildcards (* ? [abc]), e.g. qwen2.5-*")
    return patterns


class ApiKey(Strict):
    """An API key with a scope: the models it may use and how many requests a minute it may send."""

    env: ApiKeyEnv = Field(description="name of the environment variable holding the key")
    models: Annotated[list[str], AfterValidator(_model_patterns)] | None = Field(None, description=(
        "model names or shell-style patterns (qwen2.5-*, *-embed) this key may use; other models answer 403 "
        "and are not listed to it. Omit for every model"), json_schema_extra={"minItems": 1})
    rpm: int | None = Field(None, ge=1, le=RPM_MAX, strict=True, description=(
        "requests per minute (sliding window, per router process) before 429 with Retry-After; omit for no limit"))

    @property
    def scoped(self) -> bool:
        return self.models is not None or self.rpm is not None


def _api_key_form(value: object) -> str:
    return "dict" if isinstance(value, dict | ApiKey) else "str"


# A bare name (every model, no limit) or a scoped entry. The tags are names validate.py drops from
# error locations, so a problem reads openai.api_keys[1].rpm, not openai.api_keys[1].dict.rpm.
ApiKeyEntry = Annotated[
    Annotated[ApiKeyEnv, Tag("str")] | Annotated[ApiKey, Tag("dict")], Discriminator(_api_key_form)]


class RaySettings(Strict):
    address: str = Field("auto", description="the Ray cluster to use; `fleetctl up` starts one when none runs")
    dashboard_url: str = Field("http://127.0.0.1:8265", pattern=r"^https?://",
                               description="Ray's dashboard (Serve REST API)")


class OpenAISettings(Strict):
    host: str = Field("127.0.0.1", description="address the OpenAI endpoint binds; 0.0.0.0 for all")
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[ApiKeyEntry] = Field(default_factory=list, description=(
        "accepted API keys: names of environment variables holding them, or {env, models, rpm} entries "
        "for a key limited to some models and/or a request rate"))
    load_timeout: Duration = Field(600.0, description="how long a request waits for its model to come up")
    workers: int = Field(1, ge=1, le=64, description=(
        "router processes per node sharing the OpenAI port; one carries ~10k streamed tokens/s"))


    def api_key_entries(self) -> list[ApiKey]:
        """Every API key entry as an ApiKey (a bare name: every model, no limit), in file order."""
        return [ApiKey(env=k) if isinstance(k, str) else k for k in self.api_keys]


class Follow(Strict):
    """A git remote the daemon follows: fetched every `every`, fast-forwarded only (reconciler.loop.follow)."""

    remote: str = Field("origin", min_length=1, description="the git remote to fetch (as `git remote -v` names it)")
    branch: str = Field("main", min_length=1, description="the branch whose commits the fleet follows")
    every: Duration = Field(60.0, description="how often to fetch, e.g. 60s or 5m")


class DaemonSettings(Strict):
    """`fleetctl daemon`: its read-only status API and how often it re-checks the live fleet."""

    host: str = Field("127.0.0.1", description=(
        "address the status API binds; loopback unless you mean it (any other address needs token_env)"))
    port: int = Field(8266, ge=1, le=65535, description="port of the status API and page")
    resync: Duration = Field(30.0, description="how often the daemon compares the files with the live "
                             "fleet even when nothing was edited (heals drift)")
    token_env: TokenEnv | None = Field(None, description=(
        "name of the environment variable holding the status API's bearer token; required when host is "
        "not loopback (the daemon refuses to start without it). With it, every route but /healthz needs "
        "Authorization: Bearer <token> (a browser opens /?token=<token> once and gets a cookie)"))
    follow: Follow | None = Field(None, description=(
        "follow a git remote: fetch it every `every` and fast-forward the fleet's checkout, so a merged "
        "commit is applied with nobody on the box; local changes or a diverged branch are refused and shown"))


class Settings(Strict):
    foreign_apps: Literal["keep", "delete"] = Field(
        "keep", description="what apply does with Serve applications the fleet does not own")


class OnCpu(Strict):
    """Engine args and environment only for models that run on the CPU (no GPU in the inventory)."""

    engine: EngineArgs = Field(default_factory=dict)
    env: Env = Field(default_factory=dict)


class Defaults(Strict):
    """Values every model inherits unless it sets its own."""

    idle_timeout: Duration = Field(900.0, description=(
        "idle time (no request in flight) before a model goes down: asleep on a GPU when sleep is on, "
        "else unloaded; the next request brings it back. never = stays loaded"))
    unload_after: Duration = Field(3600.0, description=(
        "further idle time an asleep model (GPU) keeps its weights in host RAM before it is unloaded; "
        "never = stays asleep"))
    sleep: bool = Field(True, description=(
        "on a GPU, go to vLLM's sleep mode first (GPU memory freed, wake in about a second); "
        "false = unload straight away. Ignored on the CPU, which has no sleep mode"))
    start_timeout: Duration = Field(600.0, description="bound on an engine's start-up")
    engine: EngineArgs = Field(default_factory=dict)
    env: Env = Field(default_factory=dict)
    on_cpu: OnCpu = Field(default_factory=OnCpu, description=(
        "engine args and env that only models placed on the CPU inherit (e.g. dtype: float32, enforce_eager), "
        "over engine and env; a model on GPUs never gets them"))
    replicas: int = Field(1, ge=1)


class Gpu(Strict):
    index: int = Field(ge=0)
    memory: Size = Field(description="the card's memory, e.g. 24GiB")
    node: NodeAddress | None = Field(None, description=(
        "IP address of the Ray node the card is on (as in `ray list nodes`); omit for the head's own cards"))
    name: str | None = None


class Inventory(Strict):
    gpus: list[Gpu] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Inventory:
        seen: set[tuple[str | None, int]] = set()
        for gpu in self.gpus:
            if (gpu.node, gpu.index) in seen:
                raise ValueError(f"GPU {gpu.index} is declared twice")
            seen.add((gpu.node, gpu.index))
        return self


class SwapGroup(Strict):
    """Models that take turns on the same GPUs: at most `awake` of them are loaded at once."""

    awake: int = Field(1, ge=1, description=(
        "how many members may be awake (loaded) at once; a request for another puts the least recently "
        "used idle member to sleep (GPU) or unloads it (CPU) first"))
    queue_timeout: Duration = Field(300.0, description=(
        "how long a request for a member waits while every awake member is busy (requests in flight; "
        "a busy member is never put to sleep) before it is answered 503"))
    # 5 s: a swap costs ~1.5 s on an H100 (sleep + wake), so a turn of at least 5 s under contention spends
    # at most ~25 % of the card's time swapping, while a waiting request is served within ~7 s: far inside
    # queue_timeout and a person's patience. 0 is first come first served (a swap per request when two
    # clients alternate); "never" swaps only when the busy member goes idle.
    max_wait: Duration = Field(DEFAULT_MAX_WAIT_S, ge=0, description=(
        "the swap scheduler's fairness bound: while an awake member has requests queued or in flight, a "
        "request for another member waits up to this long, then the group swaps and serves the other "
        "member's whole queue (two clients alternating get runs, not a swap per request); below "
        "queue_timeout. 0 = a swap as soon as the other member is asked"))
    default: ModelName | None = Field(None, description=(
        "a member of the group woken (or loaded) when the awake member has idled past its idle_timeout, "
        "so the next request finds it ready"))


class Model(Strict):
    source: Source
    task: Literal["generate", "embed"] = "generate"
    engine: EngineArgs = Field(default_factory=dict)
    env: Env = Field(default_factory=dict)
    gpus: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description=(
            "GPU indices; tensor parallel across them (or, with tensor_parallel and replicas, each replica "
            "on its own tensor_parallel of them). Omit to place automatically"))
    node: NodeAddress | None = Field(None, description=(
        "IP address of the Ray node to run on (as in `ray list nodes`); omit to let placement decide"))
    gpu_memory: float | None = Field(None, gt=0, le=1, description="share of each of its GPUs' memory")
    tensor_parallel: int | None = Field(None, ge=1, description=(
        "GPUs per engine; defaults to the number of gpus. Fewer than gpus lists: the replicas split them"))
    enabled: bool = Field(True, description="false = declared and validated, but not served")
    always_on: bool = Field(False, description="kept loaded and awake always (e.g. the embedding model)")
    idle_timeout: Duration | None = Field(None, description="overrides defaults.idle_timeout")
    unload_after: Duration | None = Field(None, description="overrides defaults.unload_after")
    sleep: bool | None = Field(None, description="overrides defaults.sleep")
    start_timeout: Duration | None = None
    replicas: int | None = Field(None, ge=1)
    size: Size | None = Field(None, description="memory the weights need, for automatic placement")
    swap_group: GroupName | None = Field(None, description=(
        "a swap group (swap_groups: at the top level; undeclared means awake: 1): its members may "
        "together declare more GPU memory than the card has, and take turns being loaded"))
    adapters: dict[ModelName, Source] = Field(default_factory=dict, description=(
        "LoRA adapters on this model, by the model name each is served as: {name: source} (sources as for "
        "models); each adapter's rank must fit the engine's max_lora_rank (vLLM's default 16)"))
    tool_parser: str | None = Field(
        None, description="vLLM --tool-call-parser for tool calls; default: known from the model's name "
                          "(e.g. Qwen2.5 → hermes, Llama-3.1 → llama3_json); none = no tool calls")

    @model_validator(mode="after")
    def _tp_matches_gpus(self) -> Model:
        if self.gpus is not None and self.tensor_parallel is not None and len(self.gpus) % self.tensor_parallel:
            raise ValueError(f"tensor_parallel is {self.tensor_parallel} but {len(self.gpus)} gpus are listed; "
                             "list tensor_parallel GPUs per replica (e.g. gpus: [0, 1] with tensor_parallel: 1 "
                             "and replicas: 2 puts one replica on each), or drop tensor_parallel")
        if len(set(self.gpus or [])) != len(self.gpus or []):
            raise ValueError("a GPU is listed twice in gpus")
        return self


class Fleet(Strict):
    """A whole fleet: every file merged."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="vLLM Fleet",
                              json_schema_extra={"description": "fleet.yaml and fleet.d/*.yaml of vLLM Fleet"})

    ray: RaySettings = Field(default_factory=RaySettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    settings: Settings = Field(default_factory=Settings)
    defaults: Defaults = Field(default_factory=Defaults)
    inventory: Inventory | None = Field(None, description="GPUs to plan for when NVML finds none")
    models: dict[ModelName, Model] = Field(default_factory=dict)
    swap_groups: dict[GroupName, SwapGroup] = Field(default_factory=dict, description=(
        "settings per swap group (a model joins one with swap_group: NAME); a group no file declares "
        "gets the defaults (awake: 1)"))
