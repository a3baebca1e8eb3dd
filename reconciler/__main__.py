"""`python -m reconciler ...` is `fleetctl ...` (how `fleetctl up` starts the daemon)."""

from reconciler.cli import main

main()
