#!/usr/bin/env bash
# The default demo: set up the environment (cached), prepare the bundled corpus
# if missing, train a small GPT on CPU with PP = 2 x DP = 2, print a table.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/tools/setup_env.sh")"
cd "$here"
exec "$venv/bin/asyncmesh-demo" "$@"
