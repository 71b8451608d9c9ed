#!/usr/bin/env bash
# The README's test command: installs rloss if needed, then runs the test suite (slow smoke runs excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_installed.sh
exec "$PYTHON" -m pytest -q -m "not slow" "$@"
