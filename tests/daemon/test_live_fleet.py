"""The live fleet: `fleetctl daemon` applies edits, heals drift and shows status, against a real Ray
Serve with real vLLM on the CPU. Scenarios run in file order on one daemon and one head (each
vLLM start costs a minute here). Restarts are judged by replica ids and vLLM child pids.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler import state_files
from reconciler.live import local_head
from reconciler.live import serve_state as live_mod
from serve_app.contract import engine_log_name
from tests.serve_apply.helpers import fingerprint, write_atomic

from .conftest import SECRETS, START_ATTEMPTS, Live, daemon_section

pytestmark = pytest.mark.serve
KEY = SECRETS["FLEET_TEST_SECRET_KEY"]
EXTRA_HEAD = "openai:\n  api_keys: [FLEET_TEST_SECRET_KEY]\n"  # merged below into the openai section


def write(lv: Live, models: dict[str, dict[str, Any]], extra: str = "") -> None:
    port = int(lv.api.rsplit(":", 1)[1])
    text = lv.fleet.text(models, daemon_section(port) + extra).replace(
        f"  port: {lv.fleet.port}\n", f"  port: {lv.fleet.port}\n  api_keys: [FLEET_TEST_SECRET_KEY]\n", 1)
    write_atomic(lv.fleet.root / "fleet.yaml", text)  # one save, as an editor makes it


def user_config(lv: Live, app: str) -> dict[str, Any]:
    cfg = live_mod.read_live_state(lv.head.dashboard_url).apps[app].config or {}
    return dict(cfg["deployments"][0].get("user_config") or {})


def healthy(lv: Live, *names: str) -> bool:
    rows = {m["model"]: m for m in lv.status()["models"]}
    return all(rows.get(n, {}).get("health") == "Healthy" and rows[n]["sync"] == "Synced" for n in names)


def chat(lv: Live, model: str) -> bool:
    """True when the model answered a whole completion: 5 tokens generated (EOS ignored, so the
    tiny random model's text, which may be empty, does not matter). Raises on an HTTP error."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{lv.fleet.port}/v1", api_key=KEY, max_retries=0, timeout=300)
    r = client.chat.completions.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"ignore_eos": True})
    return r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 5


A = {"tiny-a": {"idle_timeout": "15m"}}


def test_daemon_brings_up_the_fleet_and_shows_it(live: Live) -> None:
    write(live, A)
    live.start_daemon()
    live.wait("tiny-a healthy and in sync", lambda: healthy(live, "router", "tiny-a"))
    doc = live.status()
    assert doc["in_sync"] and doc["health"] == "Healthy"
    assert doc["daemon"]["last_change"]["result"] == "applied"
    assert {c["model"]: c["action"] for c in doc["daemon"]["last_change"]["changes"]} == \
        {"router": "create", "tiny-a": "create"}
    assert chat(live, "tiny-a")
    # `fleetctl status --json` is the same document, less the daemon's section
    r = live.fleet.fleetctl("status", "--json")
    assert r.returncode == 0, r.stderr
    mine = json.loads(r.stdout)
    assert [m["model"] for m in mine["models"]] == [m["model"] for m in doc["models"]]
    assert {k: v for k, v in mine.items() if k != "models"} == \
        {k: v for k, v in doc.items() if k not in ("models", "daemon")}


def test_an_edit_reaches_serve_in_place_without_apply(live: Live) -> None:
    before = fingerprint(live.fleet.live())
    write(live, {"tiny-a": {"idle_timeout": "20m"}})
    live.wait("idle_timeout 1200 s on Serve", lambda: user_config(live, "tiny-a").get("idle_timeout_s") == 1200)
    assert fingerprint(live.fleet.live())["tiny-a"] == before["tiny-a"]  # same replica, same vLLM pid
    assert before["tiny-a"]["children"]
    live.wait("the pass recorded as an in-place update", lambda: [
        (c["model"], c["action"]) for c in live.status()["daemon"]["last_change"]["changes"]] == [("tiny-a", "update")],
        60)


def test_a_burst_of_writes_is_one_reconcile(live: Live) -> None:
    live.wait("idle", lambda: live.status()["daemon"]["progress"] == "", 60)
    before = live.status()["daemon"]
    for minutes in range(21, 31):  # ten saves in a row, as a `git pull` touching many files does
        write(live, {"tiny-a": {"idle_timeout": f"{minutes}m"}})
    live.wait("the last value on Serve", lambda: user_config(live, "tiny-a").get("idle_timeout_s") == 1800)
    live.wait("the pass recorded", lambda: live.status()["daemon"]["applies"] > before["applies"], 120)
    time.sleep(3)  # room for a second pass, were the burst split in two
    after = live.status()["daemon"]
    assert after["applies"] - before["applies"] == 1
    assert after["triggers"].get("edit", 0) - before["triggers"].get("edit", 0) == 1


def engine_argv(lv: Live, app: str) -> list[str]:
    cfg = live_mod.read_live_state(lv.head.dashboard_url).apps[app].config or {}
    return list(cfg["args"].get("engine_argv") or [])


def running_ids(lv: Live, app: str) -> set[str]:
    a = live_mod.read_live_state(lv.head.dashboard_url).apps.get(app)
    return {r for ids in a.replica_ids().values() for r in ids} if a else set()


def test_a_second_edit_mid_start_replaces_the_first_and_a_hand_removed_start_is_sent_again(live: Live) -> None:
    """The daemon never waits on a start: a second edit to a model whose restart is still starting
    reaches Serve before that start ends, and the app removed by hand mid-start comes back."""
    old = running_ids(live, "tiny-a")
    engine = "{dtype: float32, enforce_eager: true, max_model_len: %d}"
    write(live, {"tiny-a": {"idle_timeout": "30m", "engine": engine % 200}})
    live.wait("the first edit on Serve", lambda: "200" in engine_argv(live, "tiny-a"), 60, every=0.2)
    # ... and with no start bound: `start_timeout: never` travels as None and must start and answer
    write(live, {"tiny-a": {"idle_timeout": "30m", "engine": engine % 192, "start_timeout": "never"}})

    def second_on_serve() -> bool:
        ids = running_ids(live, "tiny-a")
        assert not ids - old, f"the first edit's start finished before the second edit reached Serve: {ids}"
        return "192" in engine_argv(live, "tiny-a")

    live.wait("the second edit on Serve while the first still starts", second_on_serve, 60, every=0.2)
    # Removed by hand while it starts: the daemon's next pass sends it again, and says what happened
    drift_before = live.status()["daemon"]["drift_corrections"]
    live.fleet.remove_by_hand("tiny-a")
    # a pass (not an edit) sends it again: a drift correction, while nothing else has drifted
    live.wait("tiny-a sent again", lambda: live.status()["daemon"]["drift_corrections"] > drift_before
              and (a := live.fleet.live().apps.get("tiny-a")) is not None and a.status != "DELETING"
              and "192" in engine_argv(live, "tiny-a"), 120, every=0.5)
    live.wait("tiny-a healthy with the second edit", lambda: healthy(live, "tiny-a"), 600)
    assert "192" in engine_argv(live, "tiny-a")
    assert live_mod.read_live_state(live.head.dashboard_url).apps["tiny-a"].config["args"]["start_timeout_s"] is None
    assert chat(live, "tiny-a")


def test_an_invalid_edit_changes_nothing_and_is_shown_until_fixed(live: Live) -> None:
    before = fingerprint(live.fleet.live())
    config_before = user_config(live, "tiny-a")
    write(live, {"tiny-a": {"idle_timeout": "40m", "gpu_memroy": 0.5}})
    err = live.wait("the spec error on /status", lambda: live.status()["daemon"]["spec_error"], 60)
    assert err[0]["file"] == "fleet.yaml" and err[0]["line"] and "gpu_memroy" in err[0]["field"]
    assert "did you mean 'gpu_memory'" in err[0]["message"]
    page = httpx.get(live.api + "/").text
    assert "fleet.yaml:" in page and "gpu_memroy" in page
    live.wait("a resync pass during the error", lambda: live.status()["daemon"]["reconciles"] >= 2, 60)
    assert user_config(live, "tiny-a") == config_before
    assert fingerprint(live.fleet.live()) == before
    write(live, {"tiny-a": {"idle_timeout": "40m"}})
    live.wait("the fix applied", lambda: user_config(live, "tiny-a").get("idle_timeout_s") == 2400)
    live.wait("the error cleared", lambda: live.status()["daemon"]["spec_error"] == [], 60)


def test_an_app_deleted_by_hand_is_restored(live: Live) -> None:
    state = live.fleet.live()
    drift_before = live.status()["daemon"]["drift_corrections"]
    live.fleet.remove_by_hand("tiny-a")
    live.wait("tiny-a gone", lambda: "tiny-a" not in live.fleet.live().apps or
              live.fleet.live().apps["tiny-a"].status == "DELETING", 120)
    # the daemon's next pass puts it back (and records that once it is up again)
    live.wait("the drift corrected", lambda: live.status()["daemon"]["drift_corrections"] > drift_before)
    live.wait("tiny-a healthy", lambda: healthy(live, "tiny-a"), 120)
    assert fingerprint(live.fleet.live())["tiny-a"]["replicas"] != fingerprint(state)["tiny-a"]["replicas"]
    assert chat(live, "tiny-a")


def test_a_model_that_cannot_load_is_tried_a_bounded_number_of_times(live: Live) -> None:
    write(live, {**{"tiny-a": {"idle_timeout": "40m"}}, "tiny-bad": {"engine": "{dtype: float32, "
                 "enforce_eager: true, max_model_len: 256, kv_cache_dtype: nonsense}"}})
    row = live.wait("tiny-bad failed", lambda: (m := live.model("tiny-bad")) and m["state"] == "failed" and m)
    assert row["health"] == "Degraded" and "nonsense" in row["message"]
    logs = Path(live.head.temp_dir)
    attempts = lambda: len(list(logs.rglob(engine_log_name("tiny-bad", 0).replace("-0.log", "-*.log"))))  # noqa: E731
    seen = attempts()
    assert 1 <= seen <= START_ATTEMPTS
    n = live.status()["daemon"]["reconciles"]
    live.wait("two more passes", lambda: live.status()["daemon"]["reconciles"] >= n + 2, 60)
    assert attempts() == seen  # nothing re-PUT it in a loop
    assert chat(live, "tiny-a")  # the others keep serving
    write(live, {"tiny-a": {"idle_timeout": "40m"}})
    live.wait("tiny-bad removed", lambda: live.model("tiny-bad") is None, 120)


def test_a_gpu_the_cluster_lacks_is_refused_up_front(live: Live) -> None:
    inventory = "inventory:\n  gpus: [{index: 0, memory: 24GiB}, {index: 1, memory: 24GiB}]\n"
    models = {"tiny-a": {"idle_timeout": "40m"}, "tiny-gpu": {"gpus": "[1]", "gpu_memory": 0.5}}
    write(live, models, inventory)
    last = live.wait("a capacity outcome", lambda: (lr := live.status()["daemon"]["last_reconcile"])
                     and lr["result"] == "capacity" and lr, 60)
    assert "fleet_gpu_1" in last["message"] and "tiny-gpu" in last["message"]
    assert "tiny-gpu" not in live.fleet.live().apps
    r = live.fleet.fleetctl("plan")
    assert r.returncode == 1 and "no node of the Ray cluster can hold a replica" in r.stderr, r.stderr


def test_a_replica_ray_cannot_place_is_reported_with_serves_reason(live: Live, tmp_path: Path) -> None:
    import ray

    ray.init(address=live.head.gcs_address, log_to_driver=False, namespace="hog")
    try:
        @ray.remote(resources={"fleet_gpu_0": 1.0}, num_cpus=0)
        class Hog:  # another program holding GPU 0, which the fleet cannot know up front
            def ping(self) -> bool:
                return True

        hog = Hog.options(name="hog", lifetime="detached").remote()
        ray.get(hog.ping.remote(), timeout=60)
        inventory = "inventory:\n  gpus: [{index: 0, memory: 24GiB}]\n"
        write(live, {"tiny-a": {"idle_timeout": "40m"}, "tiny-gpu": {"gpus": "[0]", "gpu_memory": 0.5}}, inventory)
        row = live.wait("tiny-gpu unschedulable", lambda: (m := live.model("tiny-gpu"))
                        and m["state"] == "unschedulable" and m, 120)
        assert "fleet_gpu_0" in row["message"] and row["health"] == "Degraded"
        # the pass that judges the start reports it (the row may show it one pass earlier: it reads live)
        last = live.wait("the start reported unschedulable", lambda: (c := live.status()["daemon"]["last_change"])
                         and c["result"] == "failed" and c, 30)
        assert "cannot be scheduled" in last["message"] and "tiny-gpu" in last["failed_models"]
        r = live.fleet.fleetctl("status")
        assert "unschedulable" in r.stdout and "fleet_gpu_0" in r.stdout
        write(live, {"tiny-a": {"idle_timeout": "40m"}})
        live.wait("tiny-gpu removed", lambda: live.model("tiny-gpu") is None and healthy(live, "tiny-a"), 180)
        ray.kill(hog)
    finally:
        ray.shutdown()


def test_status_api_is_read_only_on_loopback_with_metrics_and_no_secrets(live: Live) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/", "/status", "/metrics", "/anything"):
            assert httpx.request(method, live.api + path).status_code == 405
    port = int(live.api.rsplit(":", 1)[1])
    assert listen_addresses(port) == {"127.0.0.1"}
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(live.api + "/metrics").text)}
    assert sum(s.value for s in families["fleet_reconciles"].samples) >= 5
    states = {(s.labels["model"], s.labels["state"]): s.value for s in families["fleet_model_state"].samples}
    # exactly one state word is set per model; a serving engine reports "awake" (lifecycle) or "ready" (Serve)
    current = [st for (model, st), v in states.items() if model == "tiny-a" and v == 1.0]
    assert len(current) == 1 and current[0] in ("ready", "awake"), current
    healthy_gauge = {s.labels["model"]: s.value for s in families["fleet_model_healthy"].samples}
    assert healthy_gauge["tiny-a"] == 1.0
    assert families["fleet_drift_corrections"].samples[0].value >= 1
    outputs = [httpx.get(live.api + p).text for p in ("/", "/status", "/metrics", "/healthz")]
    outputs += [live.fleet.fleetctl(*a).stdout for a in (("status", "--json"), ("plan", "--json"), ("status",))]
    outputs.append(live.log_tail(10_000))
    for value in SECRETS.values():
        assert not [o for o in outputs if value in o]


def test_the_page_renders_in_a_real_browser(live: Live, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
        try:
            page = browser.new_page()
            page.goto(live.api + "/")
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
        finally:
            browser.close()
    assert "tiny-a" in text and "router" in text and "Healthy" in text and "in sync" in text


def _row(page: Any, model: str) -> dict[str, str]:
    """A model's row of the page's table as the browser shows it now (class name -> text)."""
    return dict(page.eval_on_selector(
        f"#models tr[data-model='{model}']",
        "tr => Array.from(tr.cells).filter(c => c.className).map(c => [c.className, c.innerText])"))


def _number(text: str) -> float:
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return 0.0


def test_the_page_shows_a_requests_effect_within_its_refresh_interval(live: Live, tmp_path: Path) -> None:
    """Open the page once (never reloaded): requests to tiny-a show as its requests/s and tokens/s within
    the page's refresh (the daemon reads the endpoint every PULSE_S, the page polls as often; a router
    process writes its totals every FLUSH_S); its load is among the lifecycle events; its log tail is a link."""
    from playwright.sync_api import sync_playwright

    from reconciler.loop.pulse import PULSE_S
    from serve_app.metrics import FLUSH_S

    bound_s = 2 * PULSE_S + FLUSH_S + 1.5  # sample interval + poll interval + flush + a loaded box's slack
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(live.api + "/")
            live.wait("a quiet tiny-a on the page", lambda: _number(_row(page, "tiny-a").get("rps", "")) == 0, 60, 0.5)
            for _ in range(3):
                assert chat(live, "tiny-a")
            done = time.monotonic()
            while time.monotonic() - done < bound_s + 10:
                row = _row(page, "tiny-a")
                if _number(row.get("rps", "")) > 0 and _number(row.get("tps", "")) > 0:
                    break
                time.sleep(0.2)
            seen_after = time.monotonic() - done
            events = page.inner_text("#events")
            log_link = page.get_attribute("#models tr[data-model='tiny-a'] a", "href")
            page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
            if os.environ.get("FLEET_STATUS_SCREENSHOT"):  # the lead refreshes docs/status-page.png with it
                page.screenshot(path=os.environ["FLEET_STATUS_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
    assert _number(row["rps"]) > 0 and _number(row["tps"]) > 0, row
    assert seen_after <= bound_s, f"the page showed the requests {seen_after:.1f} s after they ended (bound {bound_s})"
    assert "tiny-a" in events and "loaded in" in events
    assert log_link == "logs/tiny-a"
    # vLLM's own log, its access lines included: the chats just sent
    assert "/v1/chat/completions" in httpx.get(live.api + "/logs/tiny-a", timeout=30).text
    # the same numbers on the endpoint's own /metrics, for Prometheus
    text = httpx.get(f"http://127.0.0.1:{live.fleet.port}/metrics", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("fleet_requests_total", (("code", "200"), ("model", "tiny-a")))] >= 3
    assert samples[("fleet_tokens_total", (("kind", "completion"), ("model", "tiny-a"), ("source", "usage")))] >= 15
    assert samples[("fleet_model_transition_seconds_count", (("model", "tiny-a"), ("transition", "load")))] >= 1
    assert httpx.get(f"http://127.0.0.1:{live.fleet.port}/metrics", timeout=10).status_code == 401  # the fleet's key


def test_a_daemon_started_on_broken_files_heals_from_the_last_good_copy(live: Live) -> None:
    """Broken files and a live fleet changed by hand while no daemon ran: the new daemon shows the
    error, keeps to the copy of the last valid files, and puts the hand-made change back from it
    (an idle_timeout, changed in place on Serve: healed in place, no restart)."""
    assert live.stop_daemon() == 0
    good = (live.fleet.root / "fleet.yaml").read_text()
    write_atomic(live.fleet.root / "fleet.yaml", good + "# pasted \x1b[0m junk\n")
    want = user_config(live, "tiny-a")["idle_timeout_s"]
    live.fleet.set_idle_by_hand("tiny-a", want + 60)
    live.wait("the hand-made change on Serve", lambda: user_config(live, "tiny-a")["idle_timeout_s"] == want + 60, 60)
    before = fingerprint(live.fleet.live())
    live.start_daemon()
    daemon = live.wait("the daemon holding to the last good files", lambda: (d := live.status()["daemon"])["holding"]
                       and d["spec_error"] and d, 60)
    assert daemon["spec_error"][0]["file"] == "fleet.yaml" and daemon["spec_error"][0]["line"]
    assert daemon["holding"]["files"] == ["fleet.yaml"] and daemon["holding"]["saved_at"]
    assert "last good" in httpx.get(live.api + "/").text
    live.wait("tiny-a's idle_timeout put back from the kept copy",
              lambda: user_config(live, "tiny-a")["idle_timeout_s"] == want, 120)
    live.wait("in sync", lambda: healthy(live, "tiny-a"), 120)
    assert fingerprint(live.fleet.live())["tiny-a"] == before["tiny-a"]  # in place: same replica, same vLLM
    write_atomic(live.fleet.root / "fleet.yaml", good)
    live.wait("the files valid again", lambda: (d := live.status()["daemon"])["holding"] is None
              and d["spec_error"] == [], 60)


def test_a_killed_ray_head_is_started_again_by_the_daemon(live: Live) -> None:
    """`up` records the head it starts; a daemon whose head died starts it again and puts the fleet
    back. The record is written here as `up` writes it (this head was started by the fixture)."""
    old = os.environ.get("FLEET_LOCK_DIR")
    os.environ["FLEET_LOCK_DIR"] = str(live.fleet.lock_dir)
    try:
        state_files.head_record(live.head.dashboard_url).write_text(local_head.Record(
            live.head, 4, {"fleet_gpu_0": 1.0}, str(live.fleet.root), time.time(),
            object_store_bytes=256 * 1024**2).as_json())
        doomed = local_head.processes(local_head.Record(live.head, 4, {}, "", 0.0))
        t0 = time.monotonic()
        for pid in doomed:  # kill -9, as an OOM killer or a careless hand would
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        live.wait("a new head", lambda: (rec := local_head.load(live.head.dashboard_url)) is not None
                  and rec.head.pid != live.head.pid, 300)
        live.head = local_head.load(live.head.dashboard_url).head  # the fixture stops this one
        live.wait("tiny-a restored after the kill", lambda: healthy(live, "router", "tiny-a"), 600)
        assert chat(live, "tiny-a")
        print(f"\nkill -9 of the Ray head -> first answer: {time.monotonic() - t0:.0f} s")
    finally:
        if old is None:
            del os.environ["FLEET_LOCK_DIR"]
        else:
            os.environ["FLEET_LOCK_DIR"] = old
    assert "starting it again" in live.log_tail(400)


def test_sigterm_stops_cleanly_and_a_new_daemon_carries_on(live: Live) -> None:
    assert live.stop_daemon() == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(live.api + "/healthz", timeout=2)
    before = fingerprint(live.fleet.live())
    live.start_daemon()
    live.wait("a pass", lambda: live.status()["daemon"]["reconciles"] >= 1, 120)
    doc = live.status()
    assert doc["daemon"]["last_reconcile"]["result"] == "synced" and doc["in_sync"]
    assert fingerprint(live.fleet.live()) == before  # nothing restarted


def listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc, no traffic sent)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.add(addr)
    return found
