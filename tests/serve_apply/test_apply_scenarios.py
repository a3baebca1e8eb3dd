"""plan/apply against a real Serve with real vLLM on the CPU, one scenario after another.

The tests share one Ray head and the deployments of the previous test (vLLM starts cost about
a minute each here), so they run in file order. In every scenario the action the plan predicts
for each app must equal what happened, judged by replica ids and vLLM child pids.

The model added on the way is an hf:// one, from a local stand-in of the Hub (tests/fixtures/hub.py;
the real Hub is not reachable here): `plan` says how much will be downloaded, `apply` downloads it
before it touches Serve, and the engine starts from the cache alone — the head has
``HF_HUB_OFFLINE=1``, so vLLM could not have fetched anything itself.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.change.plan import fingerprint_live
from reconciler.fleetfiles.units import format_size
from tests.fixtures.hub import StandInHub

from .helpers import Fleet, fingerprint

pytestmark = pytest.mark.serve

MODELS: dict[str, dict[str, Any]] = {"tiny-a": {}, "tiny-b": {}}
# What each predicted action must look like in replica ids / child pids.
EXPECTED = {"noop": "kept", "update": "kept", "restart": "replaced", "create": "new", "delete": "gone"}
REPO = "test-org/tiny-llama"  # on the stand-in Hub: the tiny Llama's files


@pytest.fixture(scope="module")
def hub(tiny_llama_path: Path) -> Iterator[StandInHub]:
    with StandInHub() as h:
        h.add_folder(REPO, tiny_llama_path)
        yield h


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="module")
def head_env(hf_cache: Path) -> dict[str, str]:
    """The engines read the Hub cache that fleetctl fills, and may not reach a Hub themselves."""
    return {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def fleet(fleet: Fleet, hub: StandInHub, hf_cache: Path) -> Fleet:
    """The folder's fleet, with fleetctl pointed at the stand-in Hub (HF_ENDPOINT) and the same cache."""
    fleet.env_extra = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": None}
    return fleet


def plan_json(fleet: Fleet) -> dict[str, Any]:
    r = fleet.fleetctl("plan", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def predicted(plan: dict[str, Any]) -> dict[str, str]:
    return {c["model"]: EXPECTED[c["action"]] for c in plan["changes"]}


def observed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name in set(before) | set(after):
        if name not in after:
            out[name] = "gone"
        elif name not in before:
            out[name] = "new"
        elif before[name] == after[name]:
            out[name] = "kept"
        elif not set(before[name]["replicas"]) & set(after[name]["replicas"]):
            out[name] = "replaced"
        else:
            out[name] = f"changed {before[name]} -> {after[name]}"
    return out


def apply_and_compare(fleet: Fleet) -> dict[str, Any]:
    """Plan, apply, and check that each app did what the plan said. Returns the plan."""
    return applied_as_planned(fleet)[0]


def applied_as_planned(fleet: Fleet) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """apply_and_compare, and what `apply` printed."""
    plan = plan_json(fleet)
    before = fingerprint(fleet.live())
    r = fleet.fleetctl("apply", "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    after = fingerprint(fleet.live())
    assert observed(before, after) == predicted(plan)
    return plan, r


def actions(plan: dict[str, Any]) -> dict[str, str]:
    return {c["model"]: c["action"] for c in plan["changes"]}


def test_first_apply_creates_everything(fleet: Fleet) -> None:
    fleet.write(MODELS)
    r = fleet.fleetctl("plan", "--detailed-exitcode")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "3 to create, 0 to update in place, 0 to restart, 0 to delete" in r.stdout
    plan = apply_and_compare(fleet)
    assert actions(plan) == {"router": "create", "tiny-a": "create", "tiny-b": "create"}
    state = fleet.live()
    assert all(app.status == "RUNNING" for app in state.apps.values())
    assert all(fingerprint(state)[m]["children"] for m in MODELS)  # a vLLM child each


def test_second_plan_says_no_changes_and_apply_restarts_nothing(fleet: Fleet) -> None:
    r = fleet.fleetctl("plan", "--detailed-exitcode")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No changes. The live fleet matches the files." in r.stdout
    before = fingerprint(fleet.live())
    r = fleet.fleetctl("apply", "--auto-approve")
    assert r.returncode == 0 and "No changes" in r.stdout
    assert fingerprint(fleet.live()) == before


def test_idle_timeout_is_updated_in_place(fleet: Fleet) -> None:
    fleet.write({"tiny-a": {"idle_timeout": "30m"}, "tiny-b": {}})
    plan = apply_and_compare(fleet)
    assert actions(plan) == {"router": "noop", "tiny-a": "update", "tiny-b": "noop"}
    [a] = [c for c in plan["changes"] if c["model"] == "tiny-a"]
    assert [f["path"] for f in a["fields"]] == ["deployments.engine.user_config.idle_timeout_s"]
    cfg = fleet.live().apps["tiny-a"].config
    assert cfg is not None and cfg["deployments"][0]["user_config"]["idle_timeout_s"] == 1800.0


def test_engine_arg_restarts_only_that_model(fleet: Fleet) -> None:
    fleet.write({"tiny-a": {"idle_timeout": "30m", "engine": "{max_model_len: 128}"}, "tiny-b": {}})
    plan = apply_and_compare(fleet)
    assert actions(plan) == {"router": "noop", "tiny-a": "restart", "tiny-b": "noop"}
    [a] = [c for c in plan["changes"] if c["model"] == "tiny-a"]
    assert a["restart_fields"] == ["args.engine_argv"]


def test_adding_a_model_creates_only_it(fleet: Fleet, hub: StandInHub) -> None:
    """The model added is a Hub one: downloaded by apply before Serve is asked to start it."""
    total = sum(len(v) for v in hub.repos[REPO].files.values())
    fleet.write({"tiny-a": {"idle_timeout": "30m", "engine": "{max_model_len: 128}"}, "tiny-b": {},
                 "tiny-c": {"source": f"hf://{REPO}", "size": "2MiB"}})
    r = fleet.fleetctl("plan")
    assert r.returncode == 0, r.stderr
    assert f"      download: {format_size(total)} from the Hub before it starts" in r.stdout.splitlines()
    [c] = [c for c in plan_json(fleet)["changes"] if c["model"] == "tiny-c"]
    assert c["download"] == {"source": f"hf://{REPO}", "total_bytes": total, "missing_bytes": total, "note": ""}
    assert hub.bytes_served(REPO) == 0  # planning measures; it downloads nothing

    plan, applied = applied_as_planned(fleet)
    # The router learns the new name in place (its user_config): its replica is kept.
    assert actions(plan) == {"router": "update", "tiny-a": "noop", "tiny-b": "noop", "tiny-c": "create"}
    lines = applied.stderr.splitlines()
    fetched = lines.index(f"tiny-c: downloading {format_size(total)} of hf://{REPO} before starting it")
    sent = next(i for i, line in enumerate(lines) if line.startswith("sending the config to Serve"))
    assert fetched < sent  # the download came first
    assert hub.bytes_served(REPO) == total
    body = {"model": "tiny-c", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "ignore_eos": True}
    r = httpx.post(f"http://127.0.0.1:{fleet.port}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4  # its engine, started from the cache, answered

    again = fleet.fleetctl("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr
    pulled = fleet.fleetctl("pull", "tiny-c")
    assert pulled.returncode == 0 and "already downloaded" in pulled.stderr, pulled.stderr
    assert hub.bytes_served(REPO) == total


def test_removing_a_model_deletes_only_it(fleet: Fleet) -> None:
    fleet.write({"tiny-a": {"idle_timeout": "30m", "engine": "{max_model_len: 128}"}, "tiny-b": {}})
    plan = apply_and_compare(fleet)
    assert actions(plan) == {"router": "update", "tiny-a": "noop", "tiny-b": "noop", "tiny-c": "delete"}
    assert "tiny-c" not in fleet.live().apps


CURRENT = {"tiny-a": {"idle_timeout": "30m", "engine": "{max_model_len: 128}"}, "tiny-b": {}}


def test_stale_saved_plan_is_refused(fleet: Fleet) -> None:
    fleet.write({**CURRENT, "tiny-b": {"idle_timeout": "20m"}})
    r = fleet.fleetctl("plan", "-out", "saved.plan")
    assert r.returncode == 0, r.stderr
    # 1. the files move on
    fleet.write({**CURRENT, "tiny-b": {"idle_timeout": "25m"}})
    r = fleet.fleetctl("apply", "saved.plan", "--auto-approve")
    assert r.returncode == 1 and "the fleet files changed" in r.stderr
    # 2. the files are back, but someone changes Serve by hand
    fleet.write({**CURRENT, "tiny-b": {"idle_timeout": "20m"}})
    fleet.set_idle_by_hand("tiny-b", 600.0)
    r = fleet.fleetctl("apply", "saved.plan", "--auto-approve")
    assert r.returncode == 1 and "the live Serve changed" in r.stderr
    # 3. Serve put back as it was: the saved plan applies, exactly
    fleet.set_idle_by_hand("tiny-b", 900.0)
    before = fingerprint(fleet.live())
    r = fleet.fleetctl("apply", "saved.plan", "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fingerprint(fleet.live()) == before
    cfg = fleet.live().apps["tiny-b"].config
    assert cfg is not None and cfg["deployments"][0]["user_config"]["idle_timeout_s"] == 1200.0


def test_two_concurrent_applies(fleet: Fleet) -> None:
    fleet.write({**CURRENT, "tiny-b": {"idle_timeout": "40m"}})
    before = fingerprint(fleet.live())
    procs = [fleet.popen("apply", "--auto-approve", "--lock-wait", "60") for _ in range(2)]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0 or "another apply is running" in err, out + err
    waited = [err for _, _, err in results if "waiting up to" in err]
    assert any(rc == 0 for rc, _, _ in results)
    assert waited or any(rc == 1 for rc, _, _ in results)  # one of them saw the other
    assert fleet.fleetctl("plan", "--detailed-exitcode").returncode == 0
    assert fingerprint(fleet.live()) == before


@pytest.mark.parametrize(("text", "where"), [
    ("models:\n  tiny-a: {source: /x\n", "fleet.yaml:"),  # YAML syntax
    ("models:\n  tiny-a:\n    source: /x\n    gpus: lots\n", "fleet.yaml:4:"),  # schema
])
def test_invalid_fleet_file_changes_nothing(fleet: Fleet, text: str, where: str) -> None:
    state = fleet.live()
    before, live_fp = fingerprint(state), fingerprint_live(state)
    good = (fleet.root / "fleet.yaml").read_text()
    (fleet.root / "fleet.yaml").write_text(text)
    try:
        for cmd in (["plan"], ["apply", "--auto-approve"]):
            r = fleet.fleetctl(*cmd)
            assert r.returncode == 1, r.stdout + r.stderr
            assert where in r.stderr and "the live fleet is unchanged" in r.stderr
        time.sleep(1)
        after = fleet.live()
        assert fingerprint(after) == before and fingerprint_live(after) == live_fp
    finally:
        (fleet.root / "fleet.yaml").write_text(good)


def test_an_engine_that_cannot_start_fails_apply_with_vllms_own_error(fleet: Fleet) -> None:
    before = fingerprint(fleet.live())
    fleet.write({**CURRENT, "broken": {"engine": "{max_model_len: 1000000}"}})
    r = fleet.fleetctl("apply", "--auto-approve")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "broken failed to deploy" in r.stderr
    # vLLM's own words, relayed from the engine's log through Serve's status to the user
    assert "User-specified max_model_len (1000000) is greater than the derived max_model_len" in r.stderr
    after = fingerprint(fleet.live())
    assert {m: after[m] for m in before} == before  # the others were not touched

    fleet.write(CURRENT)
    r = fleet.fleetctl("apply", "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in fleet.live().apps


# ---- LoRA adapters (last: the base keeps them, and the scenarios above compare against CURRENT) ----

@pytest.fixture(scope="module")
def loras(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random rank-8 adapters for the tiny Llama (peft), with different seeds."""
    from tests.fixtures.tiny_lora import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {name: build_tiny_lora(fleet.model_dir, root / name, seed=seed)
            for name, seed in (("lora-one", 1), ("lora-two", 2))}


def greedy(fleet: Fleet, model: str) -> str:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"http://127.0.0.1:{fleet.port}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def with_adapters(loras: dict[str, Path], *names: str) -> dict[str, dict[str, Any]]:
    lines = "".join(f"\n      {n}: {loras[n]}" for n in names)
    return {**CURRENT, "tiny-b": {"adapters": lines}}


def test_a_model_s_first_adapter_restarts_it_and_answers_under_its_own_name(fleet: Fleet,
                                                                            loras: dict[str, Path]) -> None:
    fleet.write(with_adapters(loras, "lora-one"))
    plan = apply_and_compare(fleet)
    assert actions(plan) == {"router": "update", "tiny-a": "noop", "tiny-b": "restart"}
    [b] = [c for c in plan["changes"] if c["model"] == "tiny-b"]
    assert b["reasons"][0].startswith("its first adapter turns LoRA on (--enable-lora)")
    assert greedy(fleet, "lora-one") != greedy(fleet, "tiny-b")


def test_an_adapter_added_by_an_edit_answers_without_restarting_its_base(fleet: Fleet,
                                                                         loras: dict[str, Path]) -> None:
    base_answer = greedy(fleet, "tiny-b")
    fleet.write(with_adapters(loras, "lora-one", "lora-two"))
    r = fleet.fleetctl("plan")
    assert r.returncode == 0, r.stderr
    assert "~ tiny-b  will be updated in place" in r.stdout
    assert "why: adapter added lora-two (in place" in r.stdout
    plan = apply_and_compare(fleet)  # same replica ids and vLLM child pids: nothing restarted
    assert actions(plan) == {"router": "update", "tiny-a": "noop", "tiny-b": "update"}
    listed = {m["id"]: m for m in httpx.get(f"http://127.0.0.1:{fleet.port}/v1/models").json()["data"]}
    assert listed["lora-two"]["parent"] == "tiny-b" and listed["lora-two"]["state"] == "awake"
    two = greedy(fleet, "lora-two")
    assert two != base_answer and two != greedy(fleet, "lora-one")
    assert greedy(fleet, "tiny-b") == base_answer  # the base itself is as it was

    fleet.write(with_adapters(loras, "lora-one"))  # and one removed: in place too, and gone from the endpoint
    plan = apply_and_compare(fleet)
    assert actions(plan)["tiny-b"] == "update"
    gone = httpx.post(f"http://127.0.0.1:{fleet.port}/v1/completions", json={"model": "lora-two", "prompt": "x"})
    assert gone.status_code == 404
