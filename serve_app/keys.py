"""API keys and what each may do: which models (shell-style patterns) and how many requests a minute.

The router's user_config names the keys' environment variables (``api_key_envs``) and, for scoped
ones, their scope by that name (``key_scopes``, docs/contracts.md); each router replica reads the
values from its own environment. A request's ``Authorization: Bearer <key>`` gives its ``Caller``:
the key's variable name and scope, never the key. Then:

- a model outside the scope answers 403, and listings (/v1/models, /api/tags, /api/ps) show only
  the models in scope;
- past ``rpm`` requests to models in the last 60 s (a sliding window: at most rpm in any 60 s), 429
  with ``Retry-After``, the seconds until the oldest of them leaves the window. Per router replica:
  each process keeps its own window, so ``openai.workers: N`` lets a key through up to N x rpm.

Pure: the standard library only, no I/O; the router turns a ``Denial`` into its answer
(serve_app.key_gate). Keys are compared in constant time and never leave this module's objects
(their repr hides them); messages name neither the key nor its variable.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeVar

V = TypeVar("V")
WINDOW_S = 60.0


@dataclass(frozen=True)
class Scope:
    """The models a key may use (fnmatch patterns; None = every model) and its requests per minute."""

    models: tuple[str, ...] | None = None
    rpm: int | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or any(fnmatchcase(model, p) for p in self.models)

    def visible(self, models: Mapping[str, V]) -> dict[str, V]:
        """The entries of ``models`` (by model name) this key may use."""
        return {name: spec for name, spec in models.items() if self.allows(name)}


EVERY_MODEL = Scope()


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the variable its key came from (None when the fleet asks for no key) and its scope."""

    key_env: str | None
    scope: Scope = EVERY_MODEL


ANYONE = Caller(None)


@dataclass(frozen=True)
class _Key:
    env: str
    secret: bytes = field(repr=False)
    scope: Scope


@dataclass(frozen=True)
class KeyRing:
    """The accepted keys of one router replica. ``required`` and no key set: nobody gets in (fail closed)."""

    keys: tuple[_Key, ...] = ()
    required: bool = False

    @classmethod
    def from_config(cls, user_config: Mapping[str, Any], environ: Mapping[str, str]) -> KeyRing:
        envs = list(user_config.get("api_key_envs") or [])
        scopes = dict(user_config.get("key_scopes") or {})
        keys = tuple(_Key(env, environ[env].encode(), scope_of(scopes.get(env))) for env in envs if environ.get(env))
        return cls(keys, bool(envs))

    @classmethod
    def of(cls, keys: Mapping[str, str], scopes: Mapping[str, Mapping[str, Any]] | None = None) -> KeyRing:
        """A ring of literal keys by variable name (tests; the router reads the environment)."""
        return cls.from_config({"api_key_envs": list(keys), "key_scopes": dict(scopes or {})}, keys)

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller an Authorization header identifies; None when the key is missing or wrong (401)."""
        if not self.required:
            return ANYONE
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.encode()
        match = None
        for key in self.keys:  # every key compared, so the time taken says nothing about which one matched
            if hmac.compare_digest(given, key.secret) and match is None:
                match = key
        return Caller(match.env, match.scope) if match else None


def scope_of(entry: Mapping[str, Any] | None) -> Scope:
    """A key_scopes entry (docs/contracts.md) as a Scope; None = every model, no limit."""
    if not entry:
        return EVERY_MODEL
    models = entry.get("models")
    rpm = entry.get("rpm")
    return Scope(None if models is None else tuple(str(m) for m in models), None if rpm is None else int(rpm))


class RateLimiter:
    """Requests per minute per key, as a sliding window: at most ``rpm`` admitted in any ``window_s``.

    One timestamp per admitted request in the window (rpm is bounded in the spec). Lives in one
    event loop (the router's HTTP server): no locking. A refused request is not counted.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S) -> None:
        self._clock = clock
        self._window_s = window_s
        self._admitted: dict[str, deque[float]] = {}

    def admit(self, caller: Caller) -> float | None:
        """None when the request may go (and it is counted), else the seconds until one may."""
        rpm = caller.scope.rpm
        if rpm is None or caller.key_env is None:
            return None
        now = self._clock()
        log = self._admitted.setdefault(caller.key_env, deque())
        while log and log[0] <= now - self._window_s:
            log.popleft()
        if len(log) >= rpm:  # (more than rpm when the limit was lowered: wait until rpm - 1 remain)
            return log[len(log) - rpm] + self._window_s - now
        log.append(now)
        return None


@dataclass(frozen=True)
class Denial:
    """A request the key may not make: the HTTP status, OpenAI's error fields, and Retry-After for a 429."""

    status: int
    message: str
    type: str
    code: str
    retry_after_s: int | None = None

    def openai_error(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def outside_scope(caller: Caller, model: str, models: Mapping[str, Any]) -> Denial | None:
    """403 when the caller's key may not use ``model``; the message lists the models it may use."""
    if caller.scope.allows(model):
        return None
    allowed = ", ".join(sorted(caller.scope.visible(models))) or "(none)"
    return Denial(403, f"This API key may not use the model `{model}`. Models it may use: {allowed}.",
                  "invalid_request_error", "model_not_allowed")


def over_rate(caller: Caller, limiter: RateLimiter) -> Denial | None:
    """429 when the caller's key is past its requests per minute; else the request is counted."""
    wait = limiter.admit(caller)
    if wait is None:
        return None
    seconds = max(1, math.ceil(wait))
    return Denial(429, f"This API key's limit of {caller.scope.rpm} requests per minute is reached; "
                       f"try again in {seconds} s.", "requests", "rate_limit_exceeded", seconds)


def admit(caller: Caller, model: str, models: Mapping[str, Any], limiter: RateLimiter) -> Denial | None:
    """The one check before a request reaches a model's engine: in scope (403), then under the rate (429)."""
    return outside_scope(caller, model, models) or over_rate(caller, limiter)
