"""Stage 4, the loop: one reconcile step everyone calls, the daemon that runs it on every edit and
timer, what it watches and follows, and the status it reports (document and read-only API)."""
