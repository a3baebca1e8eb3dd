#!/usr/bin/env bash
# Fresh box → the whole test suite: install everything (the fleet, and the clients the tests
# drive: OpenWebUI, Chromium), then run the tests against a real Ray (started by the tests) and
# real vLLM on the CPU. Extra arguments go to pytest. The Python: see scripts/python-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install-clients.sh
source scripts/python-env.sh
fleet_python_env
export HF_HUB_OFFLINE=1   # tests never reach a model hub; they build or ship their models
# --durations: the 25 slowest tests and fixtures, to see where the suite's time goes.
# -n: FLEET_TEST_WORKERS pytest workers (default 0: one process). With N, each folder that starts
# real engines runs whole on one worker (tests/conftest.py), N such folders side by side: for boxes
# with cores to spare; on 2 cores two workers were no faster and timed out under the load.
exec "$PY" -m pytest -q --durations=25 -n "${FLEET_TEST_WORKERS:-0}" "$@"
