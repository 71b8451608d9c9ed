#!/usr/bin/env bash
# Installs rloss (and torch, if absent) into the current Python when it is not importable yet.
# Sourced by the README's two commands so that each works on a fresh machine.
set -euo pipefail
PYTHON=${PYTHON:-python3}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  # A CPU build; users with a CUDA build of torch already installed keep theirs.
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi
if ! (cd /tmp && "$PYTHON" -c "import rloss._lattice, google.protobuf, PIL, scipy, h5py, matplotlib, pytest, lmdb" >/dev/null 2>&1) \
   || [ "${RLOSS_REINSTALL:-0}" = 1 ]; then
  "$PYTHON" -m pip install -q -e "$root[test]"
fi
