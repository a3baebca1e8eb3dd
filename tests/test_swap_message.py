"""The 503 a swap group gives when no member could make room says what kept each member busy."""

from serve_app.swap import Group, busy_message


def test_the_message_gives_the_most_requests_seen_in_flight_and_names_back_to_back_finishes() -> None:
    group = Group(awake=2, members=["a", "b", "c"], queue_timeout_s=2.0)
    text = busy_message("pair", group, "c", {"b": 0, "a": 3}, 2.4)
    assert "`a` (up to 3 request(s) in flight), `b` (requests finishing back to back)" in text
    assert "0 request(s)" not in text  # a member refused for its quiet time never reads as idle
    assert "swap group `pair`" in text and "2 model(s) may be awake" in text
    assert "Waited 2 s (queue_timeout 2 s)" in text and "swap_groups.pair.awake" in text
