"""How much memory a model's weights need, for automatic placement and fit checks.

From a declared `size`, else the safetensors headers of a local folder, else the Hub's safetensors
metadata (only when the Hub answers). Also reads config.json for the attention head count.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .spec import HF_SOURCE

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_bytes(folder: Path) -> int | None:
    """Sum of tensor sizes in a folder's *.safetensors files, read from their headers only."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in t["shape"]:
                count *= dim
            total += count * _DTYPE_BYTES.get(t["dtype"], 2)
    return total


def hub_bytes(source: str) -> int | None:
    """Weights size from the Hub's safetensors metadata; None when offline or unknown."""
    m = HF_SOURCE.match(source)
    if not m:
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(m["repo"], revision=m["revision"])
    except Exception:  # offline, gated, no safetensors: the size stays unknown
        return None
    return sum(count * _DTYPE_BYTES.get(dtype, 2) for dtype, count in meta.parameter_count.items())


def local_folder(source: str, root: Path) -> Path | None:
    """The folder of a local-path or pkg:// source (local paths resolved against the fleet's folder)."""
    if source.startswith("pkg://"):
        from serve_app.model_source import SourceError, local_path

        try:
            return local_path(source)
        except SourceError:
            return None
    if source.startswith("hf://"):
        return None
    path = Path(source).expanduser()
    return path if path.is_absolute() else (root / path).resolve()


def hub_config(source: str) -> dict | None:
    """config.json of an hf:// model when it is in the local Hub cache (never downloads)."""
    m = HF_SOURCE.match(source)
    if not m:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(m["repo"], "config.json", revision=m["revision"])
    except Exception:
        return None
    return _read_json(Path(path)) if isinstance(path, str) else None


def model_config(source: str, root: Path) -> dict | None:
    folder = local_folder(source, root)
    if folder is not None:
        return _read_json(folder / "config.json")
    return hub_config(source)


def attention_heads(config: dict) -> int | None:
    for key in ("num_attention_heads", "n_head", "num_heads"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return attention_heads(text) if isinstance(text, dict) else None


def weights_bytes(source: str, root: Path, declared: int | None) -> int | None:
    if declared is not None:
        return declared
    folder = local_folder(source, root)
    if folder is not None:
        return safetensors_bytes(folder) if folder.is_dir() else None
    return hub_bytes(source)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
