"""Stage 3, the change: pair desired with live (diff), the plan as data, its text and JSON, sending
it to Serve (apply), judging what became of it (rollout), and the state kept between applies (the
apply lock, start times, the last good files)."""
