"""The status page's live data: the endpoint's /metrics and lifecycle records shaped into rates,
TTFT p50, states and the last events (reconciler.loop.pulse), and the page that shows them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.live.endpoint_stats import ModelSample, Sample, parse_metrics
from reconciler.loop import pulse
from reconciler.loop.status_api import event_words, render_live, row_state
from serve_app import metrics
from serve_app.lifecycle import EVENTS_KEPT, Counters
from serve_app.observe_api import lifecycle_view


def _recorder(requests: int, ttft_s: float, tokens: int, in_flight: int = 0) -> metrics.Recorder:
    rec = metrics.Recorder()
    stats = rec.model("chat")
    for _ in range(requests):
        rec.finish(stats, 200)
        stats.ttft.observe(ttft_s)
    stats.completion += tokens
    stats.in_flight = in_flight
    rec.refused(404)
    return rec


def _sample(at: float, rec: metrics.Recorder, lifecycle: dict[str, Any] | None = None) -> Sample:
    return Sample(at, parse_metrics(metrics.render(rec, None, []).decode()), lifecycle or {})


def test_the_endpoint_text_reads_back_per_model() -> None:
    got = parse_metrics(metrics.render(_recorder(3, 0.05, 40, in_flight=2), None, []).decode())
    assert set(got) == {"chat"}  # requests that named no model of the fleet are no model's
    chat = got["chat"]
    assert (chat.requests, chat.completion_tokens, chat.in_flight) == (3, 40, 2)
    assert chat.ttft[-1] == (float("inf"), 3)


def test_rates_come_from_the_counters_over_the_window() -> None:
    t = 1000.0
    s1 = _sample(t, _recorder(10, 0.05, 100))
    s2 = _sample(t + 10, _recorder(30, 0.5, 600, in_flight=1))  # 20 more requests, all at 0.5 s
    row = pulse.models_motion([s1, s2])["chat"]
    assert row["requests_per_s"] == pytest.approx(2.0)
    assert row["tokens_per_s"] == pytest.approx(50.0)
    assert row["in_flight"] == 1
    # the window's p50 sees only the new requests (0.5 s), not the all-time mix
    assert 0.25 < row["ttft_p50_s"] <= 0.5 and row["ttft_p50_window"]


def test_a_quiet_window_shows_the_p50_since_start_and_zero_rates() -> None:
    rec = _recorder(4, 0.05, 10)
    row = pulse.models_motion([_sample(0.0, rec), _sample(2.0, rec)])["chat"]
    assert row["requests_per_s"] == 0 and row["tokens_per_s"] == 0
    assert not row["ttft_p50_window"] and 0.025 < row["ttft_p50_s"] <= 0.05


def test_routers_restarted_count_from_zero_not_negative() -> None:
    row = pulse.models_motion([_sample(0.0, _recorder(50, 0.05, 10)), _sample(5.0, _recorder(5, 0.05, 10))])["chat"]
    assert row["requests_per_s"] == pytest.approx(1.0)


def test_one_sample_gives_no_rates_yet() -> None:
    row = pulse.models_motion([_sample(0.0, _recorder(1, 0.05, 1))])["chat"]
    assert row["requests_per_s"] is None


@pytest.mark.parametrize(("buckets", "q", "expected"), [
    ([(0.1, 0), (0.2, 10), (float("inf"), 10)], 0.5, 0.15),
    ([(0.1, 10), (float("inf"), 10)], 0.5, 0.05),
    ([(0.1, 0), (float("inf"), 4)], 0.5, 0.1),  # in the open bucket: its lower bound
    ([(0.1, 0), (float("inf"), 0)], 0.5, None),
])
def test_quantile_is_prometheus_histogram_quantile(buckets: list[tuple[float, float]], q: float,
                                                   expected: float | None) -> None:
    assert pulse.quantile(q, buckets) == (pytest.approx(expected) if expected is not None else None)


def _records() -> list[dict[str, Any]]:
    """Two replicas of `chat` (the older one gone) and one of `embed`, as engines publish them."""
    out = []
    for model, replica, at, transitions in (("chat", "old", 100.0, [("load", 60.0), ("sleep", 0.4)]),
                                            ("chat", "new", 200.0, [("load", 55.0), ("wake", 0.312), ("swap", 1.4)]),
                                            ("embed", "e1", 150.0, [("load", 20.0)])):
        counters = Counters()
        for i, (what, seconds) in enumerate(transitions):
            counters.add(what, seconds, at=at + i)
        out.append({"model": model, "replica": replica, "at": at + len(transitions), "state": "awake",
                    "since": at, **counters.record()})
    return out


def test_engine_records_become_per_model_states_and_the_fleets_last_events() -> None:
    view = lifecycle_view(_records(), ["chat", "embed"])
    sample = Sample(300.0, {}, view["models"])
    assert pulse.states(sample)["chat"] == {"state": "awake", "since": 200.0}  # the newest replica's
    events = pulse.events(sample)
    assert [(e["model"], e["event"]) for e in events] == [
        ("chat", "swap"), ("chat", "wake"), ("chat", "load"), ("embed", "load"), ("chat", "sleep"), ("chat", "load")]
    assert [event_words(e) for e in events[:2]] == ["swapped in 1400 ms", "woke in 312 ms"]


def test_the_events_are_the_last_fifty() -> None:
    counters = Counters()
    for i in range(EVENTS_KEPT + 20):
        counters.add("wake", 0.3, at=float(i))
    assert len(counters.events) == EVENTS_KEPT  # each engine keeps its last 50
    lifecycle = {m: {"events": counters.record()["events"], "replicas": []} for m in ("a", "b")}
    events = pulse.events(Sample(0.0, {}, lifecycle))
    assert len(events) == 50 and events[0]["at"] == EVENTS_KEPT + 19  # the fleet's last 50, newest first


def test_transition_histograms_sum_over_an_engines_replicas() -> None:
    text = metrics.render(metrics.Recorder(), None, _records()).decode()
    assert 'fleet_model_transition_seconds_count{model="chat",transition="load"} 2.0' in text
    assert 'fleet_model_transition_seconds_sum{model="chat",transition="load"} 115.0' in text
    assert 'fleet_model_transition_seconds_bucket{le="0.5",model="chat",transition="wake"} 1.0' in text
    assert 'fleet_model_transition_seconds_count{model="chat",transition="swap"} 1.0' in text


def test_a_scrape_sums_the_nodes_router_processes_and_in_flight_only_of_live_ones(tmp_path: Path) -> None:
    peer = _recorder(5, 0.05, 50, in_flight=3)
    peer.flush(tmp_path)  # written as this pid: give it another one, alive, and a dead one's copy
    written = json.loads(next(tmp_path.glob("router-*.json")).read_text())
    for pid in (1, 2 ** 22 + 12345):  # init (alive), and a pid no process has
        (tmp_path / f"router-{pid}.json").write_text(json.dumps({**written, "pid": pid}))
    os.remove(tmp_path / f"router-{os.getpid()}.json")
    own = _recorder(2, 0.05, 20, in_flight=1)
    chat = parse_metrics(metrics.render(own, tmp_path, []).decode())["chat"]
    assert chat.requests == 12 and chat.completion_tokens == 120  # every process, gone ones too
    assert chat.in_flight == 4  # own 1 + the live peer's 3; the gone one's are not in flight


def test_a_flush_writes_only_after_a_change(tmp_path: Path) -> None:
    rec = _recorder(1, 0.05, 1)
    rec.flush(tmp_path)
    path = tmp_path / f"router-{os.getpid()}.json"
    first = path.stat().st_mtime_ns
    time.sleep(0.01)
    rec.flush(tmp_path)
    assert path.stat().st_mtime_ns == first


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"choices":[],"usage":{"prompt_tokens":12,"total_tokens":40,"completion_tokens":28}}', (12, 28)),
    (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\ndata: [DONE]\n\n', (3, 9)),
    (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n', None),
])
def test_usage_is_read_from_the_answers_end(body: bytes, expected: tuple[int, int] | None) -> None:
    assert metrics.usage_tokens(body) == expected


def _doc(state: str = "ready") -> dict[str, Any]:
    return {"health": "Healthy", "in_sync": True, "daemon": {"path": "/fleet"},
            "models": [{"model": "chat", "kind": "engine", "task": "generate", "state": state, "since": None,
                        "health": "Healthy", "sync": "Synced", "replicas": "1/1", "gpus": "cpu", "message": ""}]}


def test_the_page_shows_motion_state_since_and_events() -> None:
    now = time.time()
    motion = {"at": now, "models": {"chat": {"requests_per_s": 2.5, "tokens_per_s": 310.0, "ttft_p50_s": 0.042,
                                             "ttft_p50_window": True, "in_flight": 3, "state": "awake",
                                             "since": now - 75}},
              "events": [{"model": "chat", "event": "wake", "seconds": 0.312, "at": now - 75}]}
    html = render_live(_doc(), None, motion)
    assert "2.5</td>" in html and "310</td>" in html and "42 ms" in html and ">3</td>" in html
    assert "awake <span class=muted>for 75 s</span>" in html
    assert "woke in 312 ms" in html and "logs/chat" in html


def test_the_pass_s_word_stands_when_serve_does_not_run_the_app() -> None:
    assert row_state({"state": "failed", "since": 5.0}, {"state": "awake", "since": 9.0}) == ("failed", 5.0)
    assert row_state({"state": "ready", "since": None}, {"state": "asleep", "since": 9.0}) == ("asleep", 9.0)


def test_a_machine_without_gpus_says_so() -> None:
    class Placed:
        class inventory:  # noqa: N801 - the shape of PlacedFleet.inventory
            gpus: list[Any] = []
            source = "declared"
        models: list[Any] = []

    assert "No GPUs on this machine" in render_live(_doc(), Placed(), {})


def test_an_unread_endpoint_leaves_the_motion_blank() -> None:
    assert pulse.motion([]) == {"at": None, "every_s": pulse.PULSE_S, "endpoint_answered": False,
                                "models": {}, "events": []}
    assert ModelSample().requests == 0


def test_an_engines_record_round_trips_through_the_contract() -> None:
    from serve_app.contract import LifecycleRecord

    record = _records()[1]
    assert LifecycleRecord.parse(record).wire() == json.loads(json.dumps(record))
    with pytest.raises(ValueError):
        LifecycleRecord.parse({**record, "unknown": 1})  # another version's record is refused, not half read
