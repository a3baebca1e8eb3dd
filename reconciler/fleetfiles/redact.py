"""Secrets never shown: every env value in every output is a short fingerprint, e.g. ``sha256:1a2b3c4d``.

A model's ``env:`` may hold a key under a name that does not look secret (``OPENAI_KEY: sk-…``), so
all env values are treated alike: a changed value shows as a changed fingerprint, the value never
does. ``"${NAME}"`` references stay readable: they name a variable, they are not one. Only outputs
redact (plan text and JSON, status, the page, logs); the config that apply PUTs keeps its values,
since the engine needs them.

The fingerprint is the first 8 hex digits of the value's SHA-256: enough to see that a value
changed, too short to be a stable identifier; a value someone could guess (a dictionary word)
can be confirmed from it, as from any unsalted hash, so keep real keys out of the files
(``${NAME}``) anyway.

Pure functions over JSON data; the one place that knows where env values sit in a Serve config:
under a key ``env`` (the engine's args) or ``env_vars`` (a Ray runtime_env), at any depth.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

ENV_KEYS = frozenset({"env", "env_vars"})
ENV_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
FINGERPRINT_PREFIX = "sha256:"
# Free text (Serve's messages, errors) is scrubbed of env values this long or longer; shorter ones
# ("1", "true") are too common to replace and too short to be keys.
SCRUB_MIN_CHARS = 8


def fingerprint(value: object) -> str:
    """``sha256:`` and 8 hex digits of the value (a string as it is, anything else as JSON)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return FINGERPRINT_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:8]


def redact_value(value: Any) -> Any:
    """One env value as an output shows it: a ``${NAME}`` reference or unset as it is, else its fingerprint."""
    if value is None or (isinstance(value, str) and ENV_REF.match(value)):
        return value
    return fingerprint(value)


def redact_config(config: Any) -> Any:
    """A copy of a Serve config (or one app, or any part of one) with every env value a fingerprint."""
    if isinstance(config, Mapping):
        return {k: _redact_env(v) if k in ENV_KEYS else redact_config(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [redact_config(v) for v in config]
    return config


def _redact_env(env: Any) -> Any:
    if isinstance(env, Mapping):
        return {k: redact_value(v) for k, v in env.items()}
    return redact_config(env)


def redact_at(path: str, value: Any) -> Any:
    """The value found at a dotted config path (a plan's field change, e.g. ``args.env.OPENAI_KEY``)."""
    parts = path.split(".")
    if any(p in ENV_KEYS for p in parts[:-1]):
        return redact_config(value) if isinstance(value, Mapping | list) else redact_value(value)
    if parts[-1] in ENV_KEYS:
        return _redact_env(value)
    return redact_config(value)


def env_values(configs: Iterable[Any]) -> set[str]:
    """The env values (not references) in these configs that free text must not show."""
    return {v for c in configs for v in _env_values(c)
            if isinstance(v, str) and len(v) >= SCRUB_MIN_CHARS and not ENV_REF.match(v)}


def _env_values(config: Any) -> Iterator[Any]:
    if isinstance(config, Mapping):
        for k, v in config.items():
            if k in ENV_KEYS and isinstance(v, Mapping):
                yield from v.values()
            else:
                yield from _env_values(v)
    elif isinstance(config, list | tuple):
        for v in config:
            yield from _env_values(v)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Free text (JSON or HTML too) with each of ``secrets`` replaced by its fingerprint, longest first."""
    for s in sorted(secrets, key=len, reverse=True):
        for form in {s, json.dumps(s)[1:-1], html.escape(s)}:
            if form in text:
                text = text.replace(form, fingerprint(s))
    return text


class ScrubFilter(logging.Filter):
    """A log handler's filter: each record (and its traceback) scrubbed of the values ``secrets()``
    returns at that moment (the fleet's env values change with its files)."""

    def __init__(self, secrets: Callable[[], Iterable[str]]) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        found = set(self._secrets())
        if found:
            record.msg, record.args = scrub(record.getMessage(), found), ()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = scrub(record.exc_text, found)
        return True
