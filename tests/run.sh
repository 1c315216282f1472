#!/usr/bin/env bash
# Set up the environment (cached) and run the test suite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/tools/setup_env.sh")"
cd "$here"
export PATH="$venv/bin:$PATH"
exec "$venv/bin/python" -m pytest tests "$@"
