#!/usr/bin/env bash
# CI: the test suite with the oldest supported versions (.ci/oldest-versions.txt) on the oldest
# supported Python, in a fresh virtual environment; then the protobuf-dependent tests again with
# protobuf 5.29 (the release line whose descriptors have neither `is_repeated` nor a removed `label`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python=${OLDEST_PYTHON:-$(command -v python3.9 || echo "$HOME/.pyenv/versions/3.9.18/bin/python")}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q -r "$root/.ci/oldest-versions.txt" "pybind11==2.10.0" "setuptools>=61" wheel
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$root"
cd "$root"
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider
"$venv/bin/python" -m pip install -q "protobuf==5.29.6"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_proto_text.py tests/test_upgrade.py tests/test_io.py \
    tests/test_exper_equivalence.py tests/test_reference_nets.py tests/test_variables.py
