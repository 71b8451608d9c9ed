#!/usr/bin/env bash
# CI: a normal (not editable) `pip install .` into a fresh virtual environment, then the smoke test
# of the installed package from outside the source tree (scripts/smoke_installed.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q "$root"
bash "$root/scripts/smoke_installed.sh" "$venv/bin/python"
