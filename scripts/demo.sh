#!/usr/bin/env bash
# The README's main job: installs rloss if needed, then runs the pascal_scribble pipeline on its
# embedded default (a small net on a synthetic scribble dataset generated on first use): partial
# cross-entropy, then + DenseCRF loss, a control trained as long without it, full supervision, and
# a table of validation mIoU. Extra arguments are passed as environment settings, e.g.
#   bash scripts/demo.sh MAX_ITER=100
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_installed.sh
export RUN_CONTROL=${RUN_CONTROL:-1} RUN_FULL=${RUN_FULL:-1}
exec env "$@" PYTHON="$PYTHON" sh exper/run_pascal_scribble.sh
