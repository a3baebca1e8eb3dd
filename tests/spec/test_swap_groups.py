"""Swap groups in the spec: an overbooked group fits when only N are awake; Ray reserves what it needs at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.change import diff
from reconciler.cli.fleetctl import main
from reconciler.desired.pipeline import desired_state
from reconciler.errors import SpecError
from reconciler.fleetfiles import swap_groups
from reconciler.loop.status import format_table
from serve_app.contract import SWAP_APP

from .test_bad_fleets import write_fleet
from .test_placement import GPU3

PAIR = GPU3 + (
    "models:\n"
    "  a: {source: hf://o/a, gpus: [0], gpu_memory: 0.6, swap_group: big}\n"
    "  b: {source: hf://o/b, gpus: [0], gpu_memory: 0.6, swap_group: big}\n"
    "  c: {source: hf://o/c, gpus: [0], gpu_memory: 0.3}\n")


def _apps(tmp_path: Path, text: str) -> dict[str, dict]:  # type: ignore[type-arg]
    write_fleet(tmp_path, {"fleet.yaml": text})
    return {a["name"]: a for a in desired_state(tmp_path).config["applications"]}


def test_an_overbooked_group_fits_when_one_member_is_awake(tmp_path: Path) -> None:
    apps = _apps(tmp_path, PAIR)
    reserved = {n: apps[n]["deployments"][0]["ray_actor_options"]["resources"]["fleet_gpu_0"] for n in "abc"}
    asleep = swap_groups.ASLEEP_HOLDS_BYTES / (24 * 1024**3)
    # the group needs its largest share plus what the sleeper keeps, split evenly so Ray can place both
    assert reserved["a"] == reserved["b"] == pytest.approx((0.6 + asleep) / 2, abs=1e-4)
    assert reserved["c"] == 0.3
    assert sum(reserved.values()) <= 1.0
    # each engine still runs with its own share when awake
    argv = apps["a"]["args"]["engine_argv"]
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.6"
    assert apps["a"]["args"]["swap_group"] == "big" and "swap_group" not in apps["c"]["args"]
    coordinator = apps[SWAP_APP]["deployments"][0]
    assert coordinator["num_replicas"] == 1
    # it stays on the head with the routers, whichever nodes join the cluster
    assert coordinator["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}
    assert coordinator["user_config"] == {"groups": {"big": {"awake": 1, "members": ["a", "b"],
                                                             "queue_timeout_s": 300.0, "max_wait_s": 5.0}}}


def test_validate_explains_what_fits(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": PAIR})
    result = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "swap group big on GPU 0: a 0.6, b 0.6 = 1.2 declared; 1 awake at once needs 0.66" in result.output
    assert "GPU 0: 0.96 of 1 needed at once in all" in result.output


def test_overbooking_outside_a_group_is_still_refused(tmp_path: Path) -> None:
    write_fleet(tmp_path, {"fleet.yaml": PAIR.replace(", swap_group: big", "")})
    with pytest.raises(SpecError) as e:
        desired_state(tmp_path)
    assert [str(p) for p in e.value.problems] == [
        "fleet.yaml:9:48: models.c.gpu_memory: GPU 0 is shared by a (0.6), b (0.6), c (0.3): 1.5 of its memory in "
        "all, more than 1; lower their gpu_memory shares so they add up to at most 1"]


def test_two_awake_need_the_two_largest_shares(tmp_path: Path) -> None:
    text = GPU3 + ("swap_groups: {trio: {awake: 2}}\nmodels:\n"
                   + "".join(f"  {n}: {{source: hf://o/{n}, gpus: [1], gpu_memory: {s}, swap_group: trio}}\n"
                             for n, s in (("a", 0.5), ("b", 0.4), ("c", 0.3))))
    write_fleet(tmp_path, {"fleet.yaml": text})
    assert desired_state(tmp_path).placed.swap_groups["trio"].awake == 2  # 0.5 + 0.4 + a sleeper fits
    write_fleet(tmp_path, {"fleet.yaml": text.replace("gpu_memory: 0.4", "gpu_memory: 0.5")})
    with pytest.raises(SpecError) as e:
        desired_state(tmp_path)
    assert "GPU 1 needs 1.06 of its memory at once" in str(e.value) and "2 awake at once needs 1.06" in str(e.value)


def test_cpu_groups_compile_and_fleets_without_groups_have_no_coordinator(tmp_path: Path) -> None:
    apps = _apps(tmp_path, "models:\n  a: {source: hf://o/a, swap_group: g}\n  b: {source: hf://o/b, swap_group: g}\n")
    assert apps[SWAP_APP]["deployments"][0]["user_config"]["groups"]["g"]["members"] == ["a", "b"]
    assert "resources" not in apps["a"]["deployments"][0]["ray_actor_options"]
    plain = _apps(tmp_path, "models:\n  a: {source: hf://o/a}\n")
    assert set(plain) == {"router", "a"} and "swap_group" not in plain["a"]["args"]


def test_a_disabled_member_leaves_the_coordinator_but_keeps_the_group_valid(tmp_path: Path) -> None:
    apps = _apps(tmp_path, "models:\n  a: {source: hf://o/a, swap_group: g}\n"
                           "  b: {source: hf://o/b, swap_group: g, enabled: false}\n")
    assert apps[SWAP_APP]["deployments"][0]["user_config"]["groups"]["g"]["members"] == ["a"]


def test_group_settings_change_in_place(tmp_path: Path) -> None:
    three = "models:\n" + "".join(f"  {n}: {{source: hf://o/{n}, swap_group: g}}\n" for n in "abc")
    before = _apps(tmp_path, three)
    after = _apps(tmp_path, "swap_groups: {g: {awake: 2, queue_timeout: 1m}}\n" + three)
    change = diff.diff_app(after[SWAP_APP], before[SWAP_APP])
    assert change.action is diff.Action.UPDATE
    assert diff.diff_app(after["a"], before["a"]).action is diff.Action.NOOP


def test_scheduler_settings_compile_and_change_in_place(tmp_path: Path) -> None:
    pair = "models:\n" + "".join(f"  {n}: {{source: hf://o/{n}, swap_group: g}}\n" for n in "ab")
    before = _apps(tmp_path, pair)
    after = _apps(tmp_path, "swap_groups: {g: {max_wait: 0, default: b}}\n" + pair)
    assert after[SWAP_APP]["deployments"][0]["user_config"]["groups"]["g"] == {
        "awake": 1, "members": ["a", "b"], "queue_timeout_s": 300.0, "max_wait_s": 0.0, "default": "b"}
    never = _apps(tmp_path, "swap_groups: {g: {max_wait: never}}\n" + pair)
    assert never[SWAP_APP]["deployments"][0]["user_config"]["groups"]["g"]["max_wait_s"] is None
    # the plan: the coordinator changes in place, no engine restarts
    assert diff.diff_app(after[SWAP_APP], before[SWAP_APP]).action is diff.Action.UPDATE
    assert all(diff.diff_app(after[m], before[m]).action is diff.Action.NOOP for m in "ab")


def test_status_table_shows_the_group() -> None:
    row = {"model": "a", "state": "asleep", "health": "Suspended", "sync": "Synced", "replicas": "1/1", "gpus": "0",
           "swap_group": "big", "message": ""}
    table = format_table([row, {**row, "model": "c", "state": "awake", "swap_group": None}])
    assert table.splitlines()[0].split() == ["MODEL", "STATE", "HEALTH", "SYNC", "REPLICAS", "GPUS", "SWAP_GROUP"]
    assert table.splitlines()[1].split()[-1] == "big"


def test_automatic_placement_packs_a_group_where_its_members_alone_would_not_fit(tmp_path: Path) -> None:
    text = ("inventory:\n  gpus: [{index: 0, memory: 24GiB}]\nmodels:\n"
            "  c: {source: hf://o/c, gpus: [0], gpu_memory: 0.4}\n"
            "  a: {source: hf://o/a, size: 10GiB, swap_group: g}\n"
            "  b: {source: hf://o/b, size: 10GiB, swap_group: g}\n")
    write_fleet(tmp_path, {"fleet.yaml": text})
    placed = {m.name: m for m in desired_state(tmp_path).placed.models}
    assert placed["a"].gpus == placed["b"].gpus == (0,) and placed["a"].placed_by == "auto"
    write_fleet(tmp_path, {"fleet.yaml": text.replace(", swap_group: g", "")})
    with pytest.raises(SpecError) as e:
        desired_state(tmp_path)
    assert "models.b: does not fit" in str(e.value)
