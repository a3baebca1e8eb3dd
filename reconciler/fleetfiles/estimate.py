"""How much memory a model's weights need, for automatic placement and fit checks.

From a declared `size`, else the safetensors headers of a local folder, else a GGUF file's header,
else the Hub's safetensors metadata (only when the Hub answers). Also reads config.json for the attention
head count.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from serve_app import source as sources

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


# GGUF metadata value types (ggml's gguf.h): fixed-size scalars by type id; 8 = string, 9 = array.
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_LOADED_BYTES_PER_PARAM = 2  # bf16: what the conversion writes and what vLLM loads (dtype auto)


def gguf_parameters(path: Path) -> int | None:
    """Number of parameters in a GGUF file, from its header (tensor shapes); None if it is not one."""
    try:
        with path.open("rb") as fh:
            magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", fh.read(24))
            if magic != b"GGUF":
                return None

            def skip(vtype: int) -> None:
                if vtype in _GGUF_SCALAR:
                    fh.seek(_GGUF_SCALAR[vtype], 1)
                elif vtype == 8:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    fh.seek(n, 1)
                elif vtype == 9:
                    etype, count = struct.unpack("<IQ", fh.read(12))
                    if etype in _GGUF_SCALAR:
                        fh.seek(_GGUF_SCALAR[etype] * count, 1)
                    else:
                        for _ in range(count):
                            skip(etype)
                else:
                    raise ValueError(f"unknown GGUF value type {vtype}")

            for _ in range(n_kv):
                (klen,) = struct.unpack("<Q", fh.read(8))
                fh.seek(klen, 1)
                skip(struct.unpack("<I", fh.read(4))[0])
            total = 0
            for _ in range(n_tensors):
                (nlen,) = struct.unpack("<Q", fh.read(8))
                fh.seek(nlen, 1)
                (n_dims,) = struct.unpack("<I", fh.read(4))
                count = 1
                for dim in struct.unpack(f"<{n_dims}Q", fh.read(8 * n_dims)):
                    count *= dim
                fh.seek(12, 1)  # ggml type (u32) and data offset (u64)
                total += count
            return total
    except (OSError, ValueError, struct.error):
        return None


def gguf_bytes(path: Path) -> int | None:
    """What vLLM will hold for a GGUF source: its parameters at bf16, not the file's size.

    The engine never loads the GGUF itself: serve_app.model_source converts it into a Hugging Face folder
    of bf16 safetensors (transformers dequantizes the 4- or 8-bit blocks), and vLLM loads that folder with
    dtype auto, i.e. bf16. So the quantized file (a Q4 file is ~0.6 bytes a parameter) would understate
    the need about 3.5-fold; parameters x 2 bytes is the converted folder's size without converting first.
    (A model forced to dtype float32 holds twice that; its share of a GPU is still only an estimate.)
    """
    params = gguf_parameters(path)
    return params * GGUF_LOADED_BYTES_PER_PARAM if params else None


def hub_bytes(source: str) -> int | None:
    """Weights size from the Hub's safetensors metadata; None when offline or unknown."""
    hub = sources.hub(source)
    if hub is None:
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(hub.repo, revision=hub.revision)
    except Exception:  # offline, gated, no safetensors: the size stays unknown
        return None
    return sum(count * _DTYPE_BYTES.get(dtype, 2) for dtype, count in meta.parameter_count.items())


def local_folder(source: str, root: Path) -> Path | None:
    """The folder of a local-path or pkg:// source (local paths resolved against the fleet's folder)."""
    try:
        parsed = sources.parse(source)
    except sources.SourceError:
        return None
    if isinstance(parsed, sources.Hub):
        return None
    if isinstance(parsed, sources.Package):
        from serve_app.model_source import SourceError, local_path

        try:
            return local_path(source)
        except SourceError:
            return None
    path = Path(parsed.path).expanduser()
    return path if path.is_absolute() else (root / path).resolve()


def hub_json(source: str, name: str = "config.json") -> dict | None:
    """A JSON file (config.json, adapter_config.json) of an hf:// repository when it is in the local Hub
    cache (never downloads)."""
    hub = sources.hub(source)
    if hub is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(hub.repo, name, revision=hub.revision)
    except Exception:
        return None
    return _read_json(Path(path)) if isinstance(path, str) else None


def source_json(source: str, root: Path, name: str = "config.json") -> dict | None:
    """A JSON file of a model or adapter source: from its folder here, else from the Hub cache."""
    folder = local_folder(source, root)
    if folder is not None:
        return _read_json(folder / name)
    return hub_json(source, name)


def model_config(source: str, root: Path) -> dict | None:
    return source_json(source, root)


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
        if folder.suffix == ".gguf" and folder.is_file():
            return gguf_bytes(folder)
        return safetensors_bytes(folder) if folder.is_dir() else None
    return hub_bytes(source)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
