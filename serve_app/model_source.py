"""Model sources: turn a fleet `source` string into what vLLM's ``--model`` needs.

Sources:
- ``hf://org/name[@rev]``          → ``--model org/name [--revision rev]`` (vLLM downloads it)
- ``/abs/path``                    → that path
- ``pkg://<import_pkg>/<subpath>`` → the path inside that installed Python package (found
  without importing the package: some packages' ``__init__`` import things vLLM never needs)

A ``.gguf`` file (by path or pkg://) is converted once into a plain Hugging Face folder under
the cache dir (``$FLEET_CACHE_DIR``, default ``~/.cache/vllm-fleet/models``), guarded by a file
lock so two replicas never convert at once. ``resolve`` never does slow work: it raises
``NotPrepared`` for a GGUF that is not converted yet; ``prepare`` does the slow work (convert, or
download an hf:// snapshot ahead of time) and is what ``fleetctl up`` and the engine call.

Run ``python -m serve_app.model_source <source>`` to prepare one source and print its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from serve_app import source as sources
from serve_app.source import SourceError


class NotPrepared(RuntimeError):
    """The source needs `prepare()` (a GGUF conversion) before vLLM can load it."""


@dataclass(frozen=True)
class Resolved:
    """What vLLM gets: the ``--model`` value and, for hf://, an optional revision."""

    model: str
    revision: str | None = None

    def argv(self) -> list[str]:
        extra = ["--revision", self.revision] if self.revision else []
        return ["--model", self.model, *extra]


# What vLLM loads from a Hub repository: its weights in one format, config, tokenizer and generation
# config (and the small files beside them). Repositories often carry the same weights again in other
# formats: Meta's Llama keeps its native checkpoint in original/consolidated.*.pth (doubling the bytes),
# others ONNX, OpenVINO, Core ML, GGUF, TensorFlow or Flax copies that vLLM never reads.
_OTHER_COPIES = ("original/", "onnx/", "openvino/", "coreml/")
_OTHER_FORMATS = (".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack", ".ot", ".tflite", ".mlmodel", ".nemo")
_TORCH_WEIGHTS = (".bin", ".pt", ".pth")  # read only when the repository has no safetensors


def vllm_files(paths: Iterable[str]) -> list[str]:
    """The files of a Hub repository that vLLM loads: safetensors weights (PyTorch .bin/.pt/.pth only
    when there are none), and every other small file (config, tokenizer, generation config, a sentence
    transformer's module configs); never the other formats and copies above."""
    paths = [p for p in paths if not p.startswith(_OTHER_COPIES) and not p.endswith(_OTHER_FORMATS)]
    has_safetensors = any(p.endswith(".safetensors") for p in paths)
    return [p for p in paths if not (has_safetensors and p.endswith(_TORCH_WEIGHTS))]


def cache_dir() -> Path:
    """Where converted models live."""
    env = os.environ.get("FLEET_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vllm-fleet" / "models"


def _pkg_path(source: str, pkg: sources.Package) -> Path:
    # find_spec on a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec(pkg.package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{source!r}: no installed Python package named {pkg.package!r}")
    for base in spec.submodule_search_locations:
        candidate = Path(base) / pkg.path
        if candidate.exists():
            return candidate
    raise SourceError(f"{source!r}: package {pkg.package!r} has no {pkg.path!r}")


def local_path(source: str) -> Path:
    """The file or folder on this machine for a path or pkg:// source (a path is absolute here:
    compile made a fleet file's relative path absolute)."""
    parsed = sources.parse(source) if source.startswith(("pkg://", "hf://")) else sources.Local(source)
    if isinstance(parsed, sources.Package):
        return _pkg_path(source, parsed)
    path = Path(source)
    if isinstance(parsed, sources.Hub) or not path.is_absolute():
        raise SourceError(f"{source!r}: expected an absolute path or pkg://pkg/path")
    if not path.exists():
        raise SourceError(f"{source!r}: no such file or folder")
    return path


def converted_dir(gguf: Path) -> Path:
    """The cache folder for one GGUF file: ``<stem>-<hash of path, size, mtime>``."""
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return cache_dir() / f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve(source: str) -> Resolved:
    """What to pass to vLLM for ``source``; fast, never converts or downloads."""
    if hub := sources.hub(source):
        return Resolved(hub.repo, hub.revision)
    path = local_path(source)
    if path.suffix != ".gguf":
        return Resolved(str(path))
    out = converted_dir(path)
    if not (out / "config.json").exists():
        raise NotPrepared(f"{source!r} is a GGUF file that is not converted yet (into {out})")
    return Resolved(str(out))


def prepare(source: str) -> Path | str:
    """Do the slow work for ``source`` ahead of the engine start; return what vLLM will load.

    hf:// downloads what vLLM loads of the snapshot (``vllm_files``) into the Hugging Face cache
    (tqdm progress on stderr);
    a GGUF file is converted (once, under a lock); anything else is returned as is.
    """
    if hub := sources.hub(source):
        resolved = Resolved(hub.repo, hub.revision)
        from huggingface_hub import list_repo_files, snapshot_download

        files = vllm_files(list_repo_files(resolved.model, revision=resolved.revision))
        snapshot_download(resolved.model, revision=resolved.revision, allow_patterns=files)
        return resolved.model
    path = local_path(source)
    if path.suffix != ".gguf":
        return path
    out = converted_dir(path)
    with _locked(out.with_name(out.name + ".lock")):
        if not (out / "config.json").exists():
            _convert_gguf(path, out)
    return out


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        yield


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF → HF folder. transformers dequantizes GGUF on load but refuses to save a model that
    still carries the GGUF quantization_config, so a fresh model is built from the same config
    without it and given the loaded weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} into {out} (once)", file=sys.stderr, flush=True)
    folder, name = str(gguf.parent), gguf.name
    # local_files_only: a pkg:// or path GGUF needs no hub, also where HF_HUB_OFFLINE is unset
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.bfloat16)
    # Write next to the target and rename, so a crash never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)  # a leftover without config.json
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m serve_app.model_source <source>")
    print(prepare(sys.argv[1]))


if __name__ == "__main__":
    main()
