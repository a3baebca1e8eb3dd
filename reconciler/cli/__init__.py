"""`fleetctl`: parse arguments, call the stages below, print. The top layer; nothing imports it.

``main`` is re-exported so that a ``fleetctl`` script installed before the CLI became a package
(its entry point read ``reconciler.cli:main``) keeps working until the next install.
"""

from reconciler.cli.fleetctl import main

__all__ = ["main"]
