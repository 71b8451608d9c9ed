#!/usr/bin/env bash
# Smoke test of an installed (not editable) rloss, run from an empty folder outside the source tree:
# the package must bring everything it needs (subpackages, the schema, the compiled lattice).
#   bash scripts/smoke_installed.sh [PYTHON]      (PYTHON: the interpreter of the environment to test)
set -euo pipefail
PYTHON=${1:-python3}
root="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# imported from the installation, not from the source tree
env -u PYTHONPATH "$PYTHON" - "$root" <<'EOF'
import sys
from pathlib import Path
import rloss, rloss._lattice, rloss.models.deeplab
from rloss.proto import caffe_pb2
source_tree = Path(sys.argv[1]).resolve()
installed = Path(rloss.__file__).resolve()
assert source_tree not in installed.parents, f"rloss imported from the source tree: {installed}"
assert source_tree not in Path(caffe_pb2.SCHEMA_PATH).resolve().parents, caffe_pb2.SCHEMA_PATH
print(f"rloss from {installed.parent}")
EOF

# the experiment builders (rloss.models, netspec) and the four networks' files
env -u PYTHONPATH "$PYTHON" -m rloss.models.write_exper "$work"
# two iterations of the demo net on synthetic data, then a test pass, through the command line
cp -r "$root/prototxt/small_fcn" "$work/net"
env -u PYTHONPATH "$PYTHON" -m rloss.data.synthetic "$work/data/" --train 4 --val 2 --size 33 --classes 3 >/dev/null
sets=(--set CONFIG_DIR="$work/net" --set MODEL_DIR="$work/model" --set DATA_ROOT="$work/data/"
      --set LIST_DIR="$work/data/list" --set NUM_LABELS=3 --set CROP_SIZE=33 --set TEST_CROP_SIZE=33
      --set BATCH_SIZE=2 --set MAX_ITER=2 --set STEPSIZE=1 --set BASE_LR=0.001 --set BI_XY_STD=30
      --set BI_RGB_STD=15 --set DENSECRF_LOSS_WEIGHT=2e-6 --set MAX_ITER2=2 --set STEPSIZE2=1 --set BASE_LR2=0.001)
env -u PYTHONPATH "$PYTHON" -m rloss train --solver="$work/net/solver.prototxt" "${sets[@]}" 2>train.log
env -u PYTHONPATH "$PYTHON" -m rloss train --solver="$work/net/solverwithdensecrfloss.prototxt" \
    --weights="$work/model/train_iter_2.caffemodel" "${sets[@]}" 2>densecrf.log
env -u PYTHONPATH "$PYTHON" -m rloss test --model="$work/net/test.prototxt" \
    --weights="$work/model/trainwithdensecrfloss_iter_2.caffemodel" --iterations=2 "${sets[@]}" 2>test.log
grep -q "mean IoU" test.log || { cat test.log; echo "smoke: test printed no mean IoU" >&2; exit 1; }
echo "smoke: installed rloss trained, fine-tuned with the DenseCRF loss and tested from $work"
