#!/usr/bin/env bash
# Fresh box → the whole test suite: install everything, then run the tests against a real Ray
# (started by the tests) and real vLLM on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1   # tests never reach a model hub; they build or ship their models
exec python3 -m pytest -q "$@"
