"""The 503 a swap group gives when a request waited past queue_timeout says what kept each member busy."""

from serve_app.contract import SwapGroupConfig
from serve_app.swap import Group, busy_message


def test_the_message_gives_the_most_requests_seen_in_flight_per_turn_holder() -> None:
    group = Group(SwapGroupConfig(awake=2, members=["a", "b", "c"], queue_timeout_s=2.0))
    text = busy_message("pair", group, "c", {"b": 0, "a": 3}, 2.4)
    assert "`a` (up to 3 request(s) in flight), `b` (holding its turn)" in text
    assert "0 request(s)" not in text  # a turn holder between requests never reads as idle
    assert "swap group `pair`" in text and "2 model(s) may be awake" in text
    assert "Waited 2 s (queue_timeout 2 s)" in text and "swap_groups.pair.awake" in text
