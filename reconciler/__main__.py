"""`python -m reconciler ...` is `fleetctl ...` (how `fleetctl up` starts the daemon)."""

from reconciler.cli.fleetctl import main

main()
