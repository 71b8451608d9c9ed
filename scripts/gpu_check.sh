#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): rloss's CUDA paths against the CPU on synthetic inputs, from the
# repository alone, in a few minutes; prints a table, exits 1 on a mismatch, 0 without a CUDA device.
# Builds the lattice extension in place when it is missing (offline: no dependencies are fetched).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import rloss._lattice" >/dev/null 2>&1; then
  "$PYTHON" setup.py -q build_ext --inplace >&2 ||
    echo "gpu_check: the lattice extension could not be built; the DenseCRF checks will fail" >&2
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
