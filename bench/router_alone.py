"""The fleet's router alone: its relay and HTTP ingress in one process, without Ray, in front of engines
at given URLs (``bench/standin.py``, or a vLLM started by hand). For benches of the relay itself:
``bench/soak.py --standin`` watches this process's memory.

    python bench/router_alone.py --port 8000 --engine http://127.0.0.1:8100 [--engine URL ...] [--model m]

It serves until SIGTERM or Ctrl-C. The same code as in a router replica (serve_app.ingress.Server
with serve_app.relay.Relay and the router's FastAPI app); only discovery is fixed: the engines given.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from serve_app import ingress, metrics, relay, router  # noqa: E402
from serve_app.keys import KeyRing  # noqa: E402


def serve(host: str, port: int, model: str, engines: list[str]) -> ingress.Server:
    """Start the router's server (in its own thread) with ``model`` served by ``engines``."""
    settings = relay.Settings(models={model: {"task": "generate"}}, keyring=KeyRing(), load_timeout_s=30.0)

    async def discover(name: str) -> str:  # only asked when no engine is registered: never here
        raise relay.Unavailable(f"The model `{name}` has no engine in this bench")

    async def app_states() -> dict[str, tuple[str, str]]:
        return {model: ("ready", "")}

    the_relay = relay.Relay(settings, discover, app_states)
    recorder = metrics.Recorder()
    server = ingress.Server(ingress.listen_socket(host, port), the_relay, router.web_app(the_relay, recorder),
                            recorder)
    server.wait_started(30)
    server.call(the_relay.set_registered, {model: engines})
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--engine", action="append", required=True, help="an engine's base URL (repeatable)")
    p.add_argument("--model", default="m", help="the model name clients ask for")
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = serve(args.host, args.port, args.model, args.engine)
    print(f"router on http://{args.host}:{args.port} for {args.model} -> {', '.join(args.engine)}",
          file=sys.stderr, flush=True)
    while not stop.wait(1.0) and server.alive:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
