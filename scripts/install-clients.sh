#!/usr/bin/env bash
# The real clients the tests drive, installed apart from the fleet: OpenWebUI in a virtual
# environment of its own (its pins clash with vLLM's), cached under $FLEET_CLIENTS_DIR
# (default ~/.cache/vllm-fleet/clients), and a Chromium for playwright (apt; playwright's own
# browser download needs a host these boxes can't reach). Idempotent: a second run is a check.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
fleet_python_env

OPEN_WEBUI_VERSION=0.12.4
clients="${FLEET_CLIENTS_DIR:-$HOME/.cache/vllm-fleet/clients}"
venv="$clients/open-webui-$OPEN_WEBUI_VERSION"
quiet() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }

if [ ! -f "$venv/.installed" ]; then
  echo "installing open-webui $OPEN_WEBUI_VERSION into $venv (once; a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$clients"
  base="$("$PY" -c 'import sys; print(sys._base_executable)')"
  "$base" -m venv "$venv"
  # Its embedding library pulls torch; take the build the fleet already has (CPU-only on a
  # CPU box) instead of letting pip fetch a multi-GB CUDA build.
  torch="$("$PY" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true)"
  quiet "$venv/bin/pip" install -q ${torch:+"torch==$torch"} "open-webui==$OPEN_WEBUI_VERSION"
  touch "$venv/.installed"
fi

chromium_bin() { command -v chromium || command -v chromium-browser || true; }
if [ -z "$(chromium_bin)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (apt) for the browser tests" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2
  else
    echo "warning: no chromium; the OpenWebUI browser tests will be skipped (apt-get install chromium)" >&2
  fi
fi
