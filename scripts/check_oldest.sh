#!/usr/bin/env bash
# CI: the test suite with the oldest supported versions (.ci/oldest-versions.txt) on the oldest
# supported Python, in a fresh virtual environment; then the protobuf-dependent tests again with
# protobuf 5.29 (the release line whose descriptors have neither `is_repeated` nor a removed `label`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python=${OLDEST_PYTHON:-}
if [ -z "$python" ]; then  # the first Python 3.9 that runs (a pyenv shim may exist and fail)
  for candidate in "$HOME"/.pyenv/versions/3.9*/bin/python python3.9; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 9)" >/dev/null 2>&1; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "check_oldest: no Python 3.9 found; set OLDEST_PYTHON" >&2; exit 1; }
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q -r "$root/.ci/oldest-versions.txt" "pybind11==2.10.0" "setuptools>=61" wheel
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$root"
cd "$root"
# torchvision is installed here (.ci/oldest-versions.txt): the example's tests must run, not skip
RLOSS_REQUIRE_TORCHVISION=1 "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider
"$venv/bin/python" -m pip install -q "protobuf==5.29.6"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_proto_text.py tests/test_upgrade.py tests/test_io.py \
    tests/test_exper_equivalence.py tests/test_reference_nets.py tests/test_variables.py
