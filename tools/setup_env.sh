#!/usr/bin/env bash
# Create (or reuse) the virtual environment for megatron-asyncmesh and install
# this checkout into it. Prints the environment's path on stdout (progress on
# stderr), so callers can do:  VENV=$(bash tools/setup_env.sh)
#
# The environment is cached outside the clone, keyed on requirements.txt and
# this script: ${ASYNCMESH_VENV:-~/.cache/megatron-asyncmesh/venv-<key>}.
# Python 3.12 is required (megatron-core 0.19, emerging-optimizers); set
# ASYNCMESH_PYTHON to choose the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[setup] $*" >&2; }

is_py312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local cand
  if [ -n "${ASYNCMESH_PYTHON:-}" ]; then
    if is_py312 "$ASYNCMESH_PYTHON"; then echo "$ASYNCMESH_PYTHON"; return 0; fi
    log "ASYNCMESH_PYTHON=$ASYNCMESH_PYTHON is not a working Python 3.12 interpreter"
    return 1
  fi
  for cand in python3.12 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && is_py312 "$(command -v "$cand")"; then
      command -v "$cand"; return 0
    fi
  done
  for cand in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 \
              /usr/local/bin/python3.12 /usr/bin/python3.12 /opt/python3.12/bin/python3.12; do
    if [ -x "$cand" ] && is_py312 "$cand"; then echo "$cand"; return 0; fi
  done
  return 1
}

PY="$(find_python)" || {
  cat >&2 <<'MSG'
error: Python 3.12 was not found (megatron-core 0.19 and emerging-optimizers need it).
  Install it, then re-run this script:
    pyenv install 3.12          # or: apt-get install python3.12 python3.12-venv
                                # or: conda create -n py312 python=3.12
  or point ASYNCMESH_PYTHON at a 3.12 interpreter:
    ASYNCMESH_PYTHON=/path/to/python3.12 bash tools/setup_env.sh
MSG
  exit 3
}

key="$(cat "$here/requirements.txt" "$here/tools/setup_env.sh" | sha256sum | cut -c1-12)"
venv="${ASYNCMESH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-asyncmesh/venv-$key}"
mkdir -p "$(dirname "$venv")"

exec 9>"$venv.lock"
flock 9  # one installer at a time per environment

if [ ! -f "$venv/.asyncmesh-complete" ] || [ "$(cat "$venv/.asyncmesh-complete")" != "$key" ]; then
  log "creating $venv with $PY ($("$PY" -V 2>&1))"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  torch_pin="$(grep -E '^torch==' "$here/requirements.txt")"
  log "installing $torch_pin (about 1-4 minutes: a CUDA build that also runs on CPU)"
  "${pip[@]}" "$torch_pin" "setuptools<81" wheel packaging ninja
  # DeepSpeed's setup.py imports torch; an isolated build would fetch a second torch.
  log "installing $(grep -E '^deepspeed==' "$here/requirements.txt") (no build isolation, no prebuilt ops)"
  DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$(grep -E '^deepspeed==' "$here/requirements.txt")"
  log "installing the rest of requirements.txt"
  "${pip[@]}" -r "$here/requirements.txt"
  echo "$key" > "$venv/.asyncmesh-complete"
fi

# Point the environment at this checkout (cheap; the deps are already there). -P: ask
# where the installed package lives, not the one in the current directory (a second
# clone run from its own root would otherwise look installed and run the first one).
current="$("$venv/bin/python" -P -c 'import megatron_asyncmesh, os; print(os.path.dirname(os.path.dirname(megatron_asyncmesh.__file__)))' 2>/dev/null || true)"
if [ "$current" != "$here" ] || [ ! -x "$venv/bin/asyncmesh-train" ]; then
  log "installing this checkout ($here) in editable mode"
  (cd "$here" && "$venv/bin/python" -m pip install --disable-pip-version-check -q \
      --no-deps --no-build-isolation -e .) >&2
fi
echo "$venv"
