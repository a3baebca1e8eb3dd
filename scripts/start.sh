#!/usr/bin/env bash
# Fresh box → running fleet: install everything into a virtual environment (GPU engine when
# NVIDIA GPUs are present, else the CPU one), start a local Ray head if none runs, apply
# fleet.yaml (+ fleet.d/), and print the OpenAI endpoint. A second run installs nothing and
# changes nothing on a fleet that is already up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/python-env.sh
fleet_python_env
# No HF_HUB_OFFLINE here: the default fleet's models ship in Python packages and load from local
# files without it, and `up` hands its environment to the daemon and the engines, so the flag would
# stop every hf:// model committed later from downloading.
echo "fleetctl is in $(dirname "$(command -v fleetctl)"); to use it in your shell:" \
     "export PATH=\"$(dirname "$(command -v fleetctl)"):\$PATH\"" >&2
exec fleetctl up "$@"
