#!/usr/bin/env bash
# Fresh box → running fleet: install everything, start a local Ray head if none runs, apply
# fleet.yaml (+ fleet.d/), and print the OpenAI endpoint. ENGINE=gpu on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # the default fleet needs no model hub
exec fleetctl up "$@"
