"""Where each engine replica's vLLM server listens: a small registry in Ray's cluster key-value store.

Serve routes a handle call to *one* replica, so asking ``endpoint()`` finds one URL per model. To
spread requests over ``replicas: N`` engines the router must know every replica's URL: each engine
replica registers ``{url, at}`` under its own key once vLLM is healthy, refreshes ``at`` on every
health check (Serve calls it every ``health_check_period_s``) and deletes the key when it stops. A
replica that is killed cannot delete its key, so readers drop entries whose ``at`` is older than
``STALE_S``; the router also drops a URL at once when it refuses connections.

The same store keeps the fleet's engine token (``engine_token``): the secret that routers send to
engines listening on another node's network address (serve_app.engine_auth checks it).

The store is Ray's internal KV in the GCS (what Serve itself keeps its checkpoints in); its calls
block, so async callers run them in a thread.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ray.experimental import internal_kv

from serve_app.contract import LifecycleRecord

NAMESPACE = "vllm_fleet"
PREFIX = "endpoint/"
LIFECYCLE_PREFIX = "lifecycle/"
TOKEN_KEY = b"engine-token"
# Health checks run every 10 s (docs/contracts.md); three missed ones mean the replica is gone.
STALE_S = 45.0


@dataclass(frozen=True)
class Registered:
    """One engine replica's vLLM server."""

    model: str
    replica: str
    url: str
    at: float  # wall-clock time of the last refresh


def _key(model: str, replica: str) -> bytes:
    return f"{PREFIX}{model}/{replica}".encode()


def register(model: str, replica: str, url: str) -> None:
    """Add or refresh this replica's URL (blocking)."""
    value = json.dumps({"url": url, "at": time.time()}).encode()
    internal_kv._internal_kv_put(_key(model, replica), value, overwrite=True, namespace=NAMESPACE)


def unregister(model: str, replica: str) -> None:
    """Remove this replica's URL (blocking); a missing key is fine."""
    internal_kv._internal_kv_del(_key(model, replica), namespace=NAMESPACE)


def listed(now: float | None = None) -> dict[str, list[Registered]]:
    """Every model's live registrations (blocking), stale ones left out."""
    now = time.time() if now is None else now
    out: dict[str, list[Registered]] = {}
    for key in internal_kv._internal_kv_list(PREFIX, namespace=NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue  # deleted between list and get
        model, _, replica = key.decode()[len(PREFIX):].partition("/")
        try:
            entry = json.loads(raw)
            url, at = str(entry["url"]), float(entry["at"])
        except (ValueError, KeyError, TypeError):
            continue
        if now - at <= STALE_S:
            out.setdefault(model, []).append(Registered(model, replica, url, at))
    return out


def engine_token() -> str:
    """The cluster's engine token (blocking): made by the first fleet process to ask, then shared.

    Kept in the GCS, never in the Serve config, a log or argv: whoever can read the GCS can already
    run code on every node, so it exposes nothing new. A new cluster gets a new token.
    """
    internal_kv._internal_kv_put(TOKEN_KEY, secrets.token_urlsafe(32).encode(), overwrite=False,
                                 namespace=NAMESPACE)  # first writer wins; later ones keep its token
    raw = internal_kv._internal_kv_get(TOKEN_KEY, namespace=NAMESPACE)
    if not raw:
        raise RuntimeError("the fleet's engine token could not be read back from Ray's key-value store")
    return bytes(raw).decode()


def publish_lifecycle(model: str, replica: str, record: dict[str, Any]) -> None:
    """An engine replica's lifecycle record (state, transition histograms, last events), blocking.

    Written on each transition and kept after the replica goes: the endpoint's /metrics sums the
    histograms over every replica of this cluster (so they never go backwards) and the status page
    shows the events. A record is a few KB, one per engine replica ever started in the cluster."""
    internal_kv._internal_kv_put(f"{LIFECYCLE_PREFIX}{model}/{replica}".encode(), json.dumps(record).encode(),
                                 overwrite=True, namespace=NAMESPACE)


def lifecycle_records() -> list[dict[str, Any]]:
    """Every engine replica's last lifecycle record (blocking)."""
    out = []
    for key in internal_kv._internal_kv_list(LIFECYCLE_PREFIX, namespace=NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        try:  # parsed through the contract: a record of another version is left out, not half read
            out.append(LifecycleRecord.parse(json.loads(raw)).wire())
        except (ValueError, TypeError):
            continue
    return out
