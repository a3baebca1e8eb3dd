"""Placement: declared GPUs are kept exactly; automatic placement packs by size and explains a misfit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from reconciler.fleetfiles.units import parse_size

from .test_bad_fleets import write_fleet

REPO = Path(__file__).resolve().parents[2]
GPU3 = "inventory:\n  gpus:\n" + "".join(f"    - {{index: {i}, memory: 24GiB}}\n" for i in range(3))


def test_three_gpu_example_places_exactly_as_declared(tmp_path: Path) -> None:
    shutil.copy(REPO / "fleet.d" / "gpu-box.yaml.example", tmp_path / "fleet.yaml")
    placed = desired_state(tmp_path).placed
    where = {m.name: (m.gpus, m.gpu_memory, m.tensor_parallel, m.always_on) for m in placed.models}
    assert placed.inventory.source == "declared"
    assert where == {
        "qwen2.5-14b-instruct": ((0, 1), 0.9, 2, False),
        "llama-3.1-8b-instruct": ((2,), 0.8, 1, False),
        "bge-m3": ((2,), 0.15, 1, True),
    }


def test_three_gpu_example_compiles_to_gpu_resources_and_flags(tmp_path: Path) -> None:
    shutil.copy(REPO / "fleet.d" / "gpu-box.yaml.example", tmp_path / "fleet.yaml")
    apps = {a["name"]: a for a in desired_state(tmp_path).config["applications"]}
    qwen = apps["qwen2.5-14b-instruct"]
    assert qwen["deployments"][0]["ray_actor_options"]["resources"] == {"fleet_gpu_0": 0.9, "fleet_gpu_1": 0.9}
    assert qwen["args"]["gpus"] == [0, 1]
    argv = qwen["args"]["engine_argv"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    bge = apps["bge-m3"]
    assert bge["deployments"][0]["ray_actor_options"]["resources"] == {"fleet_gpu_2": 0.15}
    assert bge["args"]["engine_argv"][:2] == ["--runner", "pooling"]


def _sized(models: dict[str, str]) -> str:
    return GPU3 + "models:\n" + "".join(
        f"  {name}: {{source: hf://org/{name}, size: {size}}}\n" for name, size in models.items())


def test_automatic_placement_packs_models_best_fit(tmp_path: Path) -> None:
    # needs (weights x 1.25): big 20 GiB, mid 15 GiB, two smalls of 7.5 GiB, tiny 2.5 GiB
    write_fleet(tmp_path, {"fleet.yaml": _sized(
        {"big": "16GiB", "mid": "12GiB", "small-a": "6GiB", "small-b": "6GiB", "tiny": "2GiB"})})
    placed = desired_state(tmp_path).placed
    gpus = {m.name: m.gpus for m in placed.models}
    shares = {m.name: m.gpu_memory for m in placed.models}
    assert all(m.placed_by == "auto" for m in placed.models)
    # every model on exactly one GPU, and no GPU over its memory
    per_gpu: dict[int, float] = {}
    for m in placed.models:
        assert len(m.gpus) == 1
        per_gpu[m.gpus[0]] = per_gpu.get(m.gpus[0], 0) + (m.gpu_memory or 0)
    assert all(total <= 1.0 + 1e-9 for total in per_gpu.values())
    # best fit: the two big ones take a GPU each; the rest fill the gaps instead of spreading out
    assert gpus["big"] != gpus["mid"]
    assert shares["big"] == pytest.approx(20 / 24, abs=0.01)
    assert len(per_gpu) == 3


def test_automatic_placement_refuses_with_the_numbers(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": _sized({"a": "16GiB", "b": "16GiB", "c": "16GiB", "d": "16GiB"})})
    with pytest.raises(SpecError) as e:
        desired_state(tmp_path)
    [problem] = e.value.problems
    assert str(problem) == (
        "fleet.yaml:10:3: models.d: does not fit: it needs 20.0 GiB (16.0 GiB of weights + 25% for KV cache), "
        "but the most free is 3.8 GiB on GPU 0 (0.16 of 24.0 GiB); 16.2 GiB missing. Free a GPU share, "
        "or set gpus: and gpu_memory: by hand")


def test_automatic_placement_reads_sizes_from_safetensors_headers(tmp_path: Path) -> None:
    import json
    import struct

    folder = tmp_path / "m"
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1024, 1024, 1024], "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    write_fleet(tmp_path, {"fleet.yaml": GPU3 + "models:\n  m: {source: ./m}\n"})
    [m] = desired_state(tmp_path).placed.models
    assert m.weights_bytes == 2 * 1024**3
    # 2 GiB + the 1 GiB floor for the engine (more than 25 % of 2 GiB) of 24 GiB, rounded up to 0.01
    assert m.gpu_memory == pytest.approx(0.13)


def test_unknown_size_on_a_gpu_box_asks_for_size(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": GPU3 + "models:\n  m: {source: ./nowhere}\n"})
    with pytest.raises(SpecError) as e:
        desired_state(tmp_path)
    assert "set size: (e.g. 16GiB) or gpus: [...]" in str(e.value)


def test_cpu_only_box_runs_models_on_the_cpu(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": "models:\n  m: {source: hf://org/m}\n"})
    [m] = desired_state(tmp_path).placed.models
    assert (m.gpus, m.gpu_memory, m.placed_by) == ((), None, "cpu")


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": (
        "defaults:\n  idle_timeout: 15m\n  engine: {dtype: float32, max_model_len: 512}\n  env: {A: '1'}\n"
        "models:\n  a: {source: hf://o/a}\n"
        "  b: {source: hf://o/b, idle_timeout: never, engine: {max_model_len: 4096}, env: {B: '2'}}\n"
        "  c: {source: hf://o/c, idle_timeout: 90s, always_on: true}\n")})
    models = {m.name: m for m in desired_state(tmp_path).placed.models}
    assert models["a"].idle_timeout_s == 900
    assert dict(models["a"].engine) == {"dtype": "float32", "max_model_len": 512}
    assert models["b"].idle_timeout_s is None
    assert dict(models["b"].engine) == {"dtype": "float32", "max_model_len": 4096}
    assert dict(models["b"].env) == {"A": "1", "B": "2"}
    assert models["c"].idle_timeout_s is None  # always-on models are never unloaded


def test_fleet_d_files_merge_in_sorted_order(tmp_path: Path) -> None:
    write_fleet(tmp_path, {
        "fleet.yaml": "models:\n  a: {source: hf://o/a}\n",
        "fleet.d/20-c.yaml": "models:\n  c: {source: hf://o/c}\n",
        "fleet.d/10-b.yaml": "models:\n  b: {source: hf://o/b}\n",
        "fleet.d/notes.txt": "not a fleet file",
    })
    state = desired_state(tmp_path)
    assert state.loaded.files == ("fleet.yaml", "fleet.d/10-b.yaml", "fleet.d/20-c.yaml")
    assert [m.name for m in state.placed.models] == ["a", "b", "c"]


def test_units() -> None:
    from reconciler.fleetfiles.units import parse_duration

    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration("never") is None
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("16 GB") == 16 * 10**9


TWO_NODES = ("inventory:\n  gpus:\n    - {index: 0, memory: 24GiB}\n"
             "    - {index: 0, memory: 80GiB, node: 10.0.0.12}\n    - {index: 1, memory: 80GiB, node: 10.0.0.12}\n")


def test_automatic_placement_spreads_over_nodes_and_pins_each_engine(tmp_path: Path) -> None:
    # big (40 GiB of weights) fits only on the 80 GiB cards of 10.0.0.12; small fits the head's 24 GiB card
    write_fleet(tmp_path, {"fleet.yaml": TWO_NODES + "models:\n"
                           "  big: {source: hf://org/big, size: 40GiB}\n"
                           "  small: {source: hf://org/small, size: 10GiB}\n"
                           "  pinned: {source: hf://org/p, size: 4GiB, node: 10.0.0.12}\n"})
    d = desired_state(tmp_path)
    where = {m.name: (m.node, m.gpus) for m in d.placed.models}
    assert where["big"][0] == "10.0.0.12" and where["pinned"][0] == "10.0.0.12"
    assert where["small"] == (None, (0,))
    apps = {a["name"]: a for a in d.config["applications"]}
    res = {name: apps[name]["deployments"][0]["ray_actor_options"]["resources"] for name in where}
    assert res["big"]["node:10.0.0.12"] > 0 and res["pinned"]["node:10.0.0.12"] > 0
    # the head's cards are fleet_gpu_0 too: in a cluster they are pinned to the head
    assert res["small"] == {"fleet_gpu_0": res["small"]["fleet_gpu_0"], "node:__internal_head__": 0.001}
    assert apps["router"]["deployments"][0]["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}


def test_single_box_engines_carry_no_node_resource(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": _sized({"a": "4GiB"})})
    app = next(a for a in desired_state(tmp_path).config["applications"] if a["name"] == "a")
    resources = app["deployments"][0]["ray_actor_options"]["resources"]
    assert resources and all(k.startswith("fleet_gpu_") for k in resources)


def test_replicas_that_split_their_gpus_each_ask_a_part_of_every_card(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": GPU3 + (
        "models:\n  chat: {source: hf://o/chat, gpus: [0, 1], tensor_parallel: 1, replicas: 2, gpu_memory: 0.8}\n"
        "  solo: {source: hf://o/solo, gpus: [2], replicas: 2, gpu_memory: 0.4}\n")})
    state = desired_state(tmp_path)
    chat = next(m for m in state.placed.models if m.name == "chat")
    assert (chat.gpus, chat.tensor_parallel, chat.replicas) == ((0, 1), 1, 2)
    apps = {a["name"]: a for a in state.config["applications"]}
    # one replica per card: each asks half of both, so the two ask 0.8 of each card in all
    deployment = apps["chat"]["deployments"][0]
    assert deployment["num_replicas"] == 2
    assert deployment["ray_actor_options"]["resources"] == {"fleet_gpu_0": 0.4, "fleet_gpu_1": 0.4}
    assert apps["chat"]["args"]["gpus"] == [0, 1] and apps["chat"]["args"]["replica_gpus"] == 1
    assert "--tensor-parallel-size" not in apps["chat"]["args"]["engine_argv"]
    # replicas sharing their GPU (no split) are as before: no replica_gpus, the whole share each
    assert "replica_gpus" not in apps["solo"]["args"]
    assert apps["solo"]["deployments"][0]["ray_actor_options"]["resources"] == {"fleet_gpu_2": 0.4}
