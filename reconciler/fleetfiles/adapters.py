"""Checks on LoRA adapters (`adapters:` under a model), each a Problem at the adapter's file:line.

An adapter's name is a model name on the endpoint, so it may not repeat a model's or another
adapter's. Its own adapter_config.json (peft's) is read where it is on this machine (a local folder,
pkg://, or an hf:// adapter already in the Hub cache; never downloaded here): its rank ``r`` must fit
the base engine's ``max_lora_rank`` (vLLM refuses to load it otherwise), and its
``base_model_name_or_path`` must name the model it sits on (compared as a Hub id, a path, or by the
last part of either, since an adapter trained on a copy records that copy's path).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import Problem
from reconciler.fleetfiles.estimate import local_folder, source_json
from reconciler.fleetfiles.loader import Origins
from reconciler.fleetfiles.spec import Fleet, Model
from serve_app import source as sources

VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank


def adapter_config(source: str, root: Path) -> dict[str, Any] | None:
    """peft's adapter_config.json of an adapter source, when it is on this machine; None otherwise."""
    return source_json(source, root, "adapter_config.json")


def max_lora_rank(fleet: Fleet, model: Model) -> int:
    """The engine's --max-lora-rank: the model's engine args over the defaults', else vLLM's default."""
    value = {**fleet.defaults.engine, **model.engine}.get("max_lora_rank")
    return value if isinstance(value, int) and not isinstance(value, bool) else VLLM_MAX_LORA_RANK


def _names(source: str, root: Path) -> set[str]:
    """The forms a base can be recognised by: its Hub id or absolute path, and its last part (lower case)."""
    hub = sources.hub(source)
    if hub:
        full = hub.repo
    else:
        folder = local_folder(source, root)
        full = str(folder) if folder is not None else source
    return {full.lower(), PurePosixPath(full.rstrip("/")).name.lower()}


def same_base(recorded: str, source: str, root: Path) -> bool:
    recorded = recorded.strip()
    return bool(_names(source, root) & {recorded.lower(), PurePosixPath(recorded.rstrip("/")).name.lower()})


def problems(fleet: Fleet, origins: Origins, root: Path) -> list[Problem]:
    found: list[Problem] = []
    taken: dict[str, str] = {name: "a model" for name in fleet.models}
    for name, model in fleet.models.items():
        if model.adapters and model.task == "embed":
            found.append(Problem(origins.of(("models", name, "adapters"), key=True), f"models.{name}.adapters", (
                f"{name} is an embedding model (task: embed); LoRA adapters serve generation only: move them "
                "under a generate model, or remove them")))
            continue
        for adapter, source in model.adapters.items():
            where = ("models", name, "adapters", adapter)
            field = f"models.{name}.adapters.{adapter}"
            if adapter in taken:
                found.append(Problem(origins.of(where, key=True), field, (
                    f"{adapter!r} is already {taken[adapter]}'s name; an adapter is a model name of its own "
                    "on the endpoint, so pick another")))
                continue
            taken[adapter] = f"an adapter of {name}"
            config = adapter_config(source, root)
            if config is None:
                if not source.startswith("hf://"):
                    found.append(Problem(origins.of(where), field, (
                        "no adapter_config.json there; a LoRA adapter folder (as peft's save_pretrained "
                        "writes it) holds one")))
                continue
            rank, limit = config.get("r"), max_lora_rank(fleet, model)
            if isinstance(rank, int) and rank > limit:
                found.append(Problem(origins.of(where), field, (
                    f"the adapter's rank is {rank}, over {name}'s max_lora_rank {limit}; set "
                    f"engine: {{max_lora_rank: {rank}}} on {name} (more memory per adapter slot) or use an "
                    "adapter of a smaller rank")))
            base = config.get("base_model_name_or_path")
            if isinstance(base, str) and base and not same_base(base, model.source, root):
                found.append(Problem(origins.of(where), field, (
                    f"the adapter was made for {base!r} (its adapter_config.json), not for {name} "
                    f"({model.source}); put it under the model it was trained on")))
    return found
