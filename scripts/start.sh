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
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # the default fleet needs no model hub
exec fleetctl up "$@"
