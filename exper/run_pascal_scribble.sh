#!/bin/sh
# The pascal_scribble experiment in three phases, as the original run script ran them, calling rloss
# instead of caffe.bin:
#   1. train with partial cross-entropy on the scribbles          (RUN_TRAIN)
#   2. fine-tune with cross-entropy + DenseCRF loss from phase 1  (RUN_TRAINWITHDENSECRFLOSS)
#      (REGULARIZER=normalized_cut, gated_crf or size_constraint: rloss's other regularized losses instead,
#      weighted by NORMALIZED_CUT_LOSS_WEIGHT, GATED_CRF_LOSS_WEIGHT or SIZE_CONSTRAINT_LOSS_WEIGHT)
#   3. test on TEST_SET and print pixel accuracy and mean IoU     (RUN_TEST)
#
# Defaults run in minutes on 2 CPU cores: NET_ID=small_fcn (prototxt/small_fcn) on a synthetic scribble
# dataset that is generated on first use. Setting NET_ID and DATA_ROOT runs the real experiments:
#   NET_ID=deeplab_largeFOV DATA_ROOT=/data/pascal_scribble/ sh exper/run_pascal_scribble.sh
# (the init models, e.g. pascal_scribble/model/deeplab_largeFOV/vgg16_20M.caffemodel, must be in
# place, as for the original). Every variable below can be set from the environment.
# RUN_CONTROL=1 also trains a partial-cross-entropy-only control as long as phase 2 (DenseCRF loss
# weight 0, same schedule), and RUN_FULL=1 a fully supervised model (TRAIN_SET=train_full), both
# for the small net; the last lines print a table of the mean IoUs.
# Scale: DEV_ID=0,1 trains data-parallel on those GPUs (caffe.bin's --gpu; the tests use the first);
# RLOSS_TRAIN="torchrun --nproc_per_node=4 -m rloss" (any torchrun flags, several machines too) runs the
# training commands through torchrun instead; PRECISION=bf16 (or fp16) trains and tests under autocast.
set -eu
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
RLOSS="${PYTHON} -m rloss"
RLOSS_TRAIN=${RLOSS_TRAIN:-${RLOSS}}
DEFAULTED=""
default() {  # default NAME VALUE: NAME takes VALUE unless set; the values taken are printed at the start
  if eval "[ -z \"\${$1:-}\" ]"; then eval "$1=\$2"; DEFAULTED="${DEFAULTED} $1=$2"; fi
}
default EXP pascal_scribble
default NET_ID small_fcn
TRAIN_SET=${TRAIN_SET:-train${TRAIN_SET_SUFFIX:-}}
TEST_SET=${TEST_SET:-val}
RUN_TRAIN=${RUN_TRAIN:-1}
RUN_TRAINWITHDENSECRFLOSS=${RUN_TRAINWITHDENSECRFLOSS:-1}
default REGULARIZER densecrf
case "${REGULARIZER}" in
  densecrf|normalized_cut|gated_crf|size_constraint) ;;
  *) echo "REGULARIZER=${REGULARIZER}: expected densecrf, normalized_cut, gated_crf or size_constraint" >&2; exit 2 ;;
esac
PHASE2=trainwith$(echo "${REGULARIZER}" | tr -d _)loss  # its net, solver, log and snapshots
REGULARIZER_WEIGHT=$(echo "${REGULARIZER}" | tr a-z A-Z)_LOSS_WEIGHT
RUN_TEST=${RUN_TEST:-1}
RUN_CONTROL=${RUN_CONTROL:-0}
RUN_FULL=${RUN_FULL:-0}
GPU_FLAG="${DEV_ID:+--gpu=${DEV_ID}} ${PRECISION:+--precision=${PRECISION}}"
TEST_GPU_FLAG="${DEV_ID:+--gpu=${DEV_ID%%,*}} ${PRECISION:+--precision=${PRECISION}}"

if [ "${NET_ID}" = small_fcn ]; then
  default CONFIG_DIR ../prototxt/small_fcn
  if [ -z "${DATA_ROOT:-}" ]; then  # the embedded default: synthetic shapes, the demo's settings
    DATA_ROOT=${EXP}/data/synthetic/
    [ -f "${DATA_ROOT}list/train.txt" ] || ${PYTHON} -m rloss.data.synthetic "${DATA_ROOT}" --train 60 --val 20 --size 97 --classes 4
    for v in CROP_SIZE=97 BATCH_SIZE=10 BI_XY_STD=30 BI_RGB_STD=15 DENSECRF_LOSS_WEIGHT=2e-6 DENSECRF_SCALE=1; do
      default "${v%%=*}" "${v#*=}"
    done
  else  # one's own data (python -m rloss data prepare): the image-size preset (rloss/presets.py)
    DATA_ROOT=${DATA_ROOT%/}/
    PRESET_VALUES=$(${PYTHON} -m rloss.presets "${DATA_ROOT}" "${PRESET:-auto}") || exit 1
    for v in ${PRESET_VALUES}; do default "${v%%=*}" "${v#*=}"; done
  fi
  # The other regularizers are scale-free as the files set them (ratios, normalized, fractions): one weight
  # for every image size, chosen on the demo's val set (README, "Regularized losses").
  for v in NORMALIZED_CUT_LOSS_WEIGHT=3 GATED_CRF_LOSS_WEIGHT=20 SIZE_CONSTRAINT_LOSS_WEIGHT=0.3; do
    [ "${REGULARIZER_WEIGHT}" != "${v%%=*}" ] || default "${v%%=*}" "${v#*=}"
  done
  for v in TEST_CROP_SIZE="${CROP_SIZE}" MAX_ITER=300 STEPSIZE=200 BASE_LR=0.001 MAX_ITER2=150 STEPSIZE2=100 \
           BASE_LR2="${BASE_LR:-0.001}"; do
    default "${v%%=*}" "${v#*=}"
  done
  [ -n "${NUM_LABELS:-}" ] || NUM_LABELS=$(grep -c -v '^255 ' "${DATA_ROOT}classes.txt")
  default LIST_DIR "${DATA_ROOT}list"
  default MODEL_DIR "${EXP}/model/$(basename "${DATA_ROOT%/}")/${NET_ID}"  # one folder per dataset and net
  default LOG_DIR "${EXP}/log/$(basename "${DATA_ROOT%/}")/${NET_ID}"
  SMALL_VARS="CROP_SIZE=${CROP_SIZE} TEST_CROP_SIZE=${TEST_CROP_SIZE} BATCH_SIZE=${BATCH_SIZE} BI_XY_STD=${BI_XY_STD}
    BI_RGB_STD=${BI_RGB_STD} DENSECRF_SCALE=${DENSECRF_SCALE} MAX_ITER=${MAX_ITER} STEPSIZE=${STEPSIZE}
    BASE_LR=${BASE_LR} MAX_ITER2=${MAX_ITER2} STEPSIZE2=${STEPSIZE2} BASE_LR2=${BASE_LR2}"
else
  default CONFIG_DIR "${EXP}/config/${NET_ID}"
  : "${DATA_ROOT:?set DATA_ROOT to the folder of the PASCAL scribble data (with a trailing /)}"
  if [ -z "${NUM_LABELS:-}" ] && [ -f "${DATA_ROOT%/}/classes.txt" ]; then
    NUM_LABELS=$(grep -c -v '^255 ' "${DATA_ROOT%/}/classes.txt")
  fi
  default NUM_LABELS 21  # PASCAL's: printed below, with the Caffe files' loss weight, for other data to see
  default DENSECRF_LOSS_WEIGHT 1e-8
  if [ "${REGULARIZER}" != densecrf ] && eval "[ -z \"\${${REGULARIZER_WEIGHT}:-}\" ]"; then
    echo "REGULARIZER=${REGULARIZER} on ${NET_ID}: set ${REGULARIZER_WEIGHT} (no published value to default to)" >&2
    exit 2
  fi
  default LIST_DIR "${EXP}/list"
  default MODEL_DIR "${EXP}/model/${NET_ID}"  # the original layout: the init models are there
  default LOG_DIR "${EXP}/log/${NET_ID}"
  SMALL_VARS=""
fi
[ "${REGULARIZER}" = densecrf ] || REGULARIZER_VALUE="${REGULARIZER_WEIGHT}=$(eval echo "\${${REGULARIZER_WEIGHT}}")"
echo "rloss run script: NET_ID=${NET_ID} DATA_ROOT=${DATA_ROOT} NUM_LABELS=${NUM_LABELS} REGULARIZER=${REGULARIZER}"
echo "taken from the defaults:${DEFAULTED}"
mkdir -p "${MODEL_DIR}" "${LOG_DIR}"

set_vars() {  # the --set flags of every rloss call: the original's sed variables plus ours
  for v in "EXP=${EXP}" "NET_ID=${NET_ID}" "DATA_ROOT=${DATA_ROOT}" "TRAIN_SET=${TRAIN_SET}" "TEST_SET=${TEST_SET}" \
           "NUM_LABELS=${NUM_LABELS}" "DENSECRF_LOSS_WEIGHT=${DENSECRF_LOSS_WEIGHT}" "LIST_DIR=${LIST_DIR}" \
           "CONFIG_DIR=${CONFIG_DIR}" "MODEL_DIR=${MODEL_DIR}" "FEATURE_DIR=${EXP}/features/${NET_ID}" ${SMALL_VARS} \
           ${REGULARIZER_VALUE:-}; do
    printf ' --set %s' "$v"
  done
}

latest() {  # the snapshot of the highest iteration with this prefix
  ls "$1"_iter_*.caffemodel 2>/dev/null | sed 's/.*_iter_\([0-9]*\)\.caffemodel/\1 &/' | sort -n | tail -n 1 | cut -d' ' -f2
}

# run LOG COMMAND...: echo the command, run it with its log, echo it again (as the original did); stop
# on failure, naming the phase and its log. Ctrl-C (SIGINT to the whole process group) is the command's
# to handle, as with caffe.bin (train: --sigint_effect, by default a snapshot and stop): tee ignores it
# and writes the log until the command has ended; the subshell around the command outlives it with a
# no-op trap (the command itself gets SIGINT's default back) to record the exit status ("|| status=$?":
# set -e would end that subshell first); then the script names the phase and exits 130, starting no other.
run() {
  log=$1; shift
  echo "Running $*"
  status_file="${LOG_DIR}/.status"
  interrupted=0
  trap 'interrupted=1' INT
  { trap : INT; status=0; "$@" 2>&1 || status=$?; echo "${status}" > "${status_file}"; } |
    (trap '' INT; exec tee "${LOG_DIR}/${log}")
  trap - INT
  status=$(cat "${status_file}" 2>/dev/null || echo unknown); rm -f "${status_file}"
  if [ "${interrupted}" = 1 ]; then
    echo "Interrupted (exit ${status}): $*" >&2
    echo "rloss run script: interrupted during ${log%.log}; its log is ${LOG_DIR}/${log}" >&2
    exit 130
  fi
  if [ "${status}" != 0 ]; then
    echo "Failed (exit ${status}): $*" >&2
    echo "rloss run script: ${log%.log} failed; its log is ${LOG_DIR}/${log}" >&2
    [ "${status}" != unknown ] || exit 1  # the subshell was killed before it could record the status
    exit "${status}"
  fi
  echo "Done: $*"
}

init_model() {  # phase-1 initialisation, as the original script chose it per net
  case "${NET_ID}" in
    deeplab_largeFOV) echo "${MODEL_DIR}/vgg16_20M.caffemodel" ;;
    deeplab_vgg16|resnet-101) echo "${MODEL_DIR}/init.caffemodel" ;;
    *) echo "" ;;
  esac
}

if [ "${NET_ID}" != small_fcn ] && [ "${RUN_CONTROL}${RUN_FULL}" != 00 ]; then
  echo "RUN_CONTROL and RUN_FULL are for the small demo net (their snapshots need MODEL_DIR in the solver files)" >&2
  exit 2
fi

if [ "${RUN_TRAIN}" = 1 ]; then
  INIT=$(init_model)
  run train.log ${RLOSS_TRAIN} train --solver="${CONFIG_DIR}/solver.prototxt" ${INIT:+--weights=${INIT}} ${GPU_FLAG} $(set_vars)
fi

if [ "${RUN_TRAINWITHDENSECRFLOSS}" = 1 ]; then
  if [ "${NET_ID}" = deeplab_msc_largeFOV ]; then
    WEIGHTS=${EXP}/model/deeplab_largeFOV/trainwithdensecrfloss_iter_9000.caffemodel
  else
    WEIGHTS=$(latest "${MODEL_DIR}/train")
  fi
  run "${PHASE2}.log" ${RLOSS_TRAIN} train --solver="${CONFIG_DIR}/$(echo "${PHASE2}" | sed 's/^train/solver/').prototxt" \
    --weights="${WEIGHTS}" ${GPU_FLAG} $(set_vars)
  if [ "${RUN_CONTROL}" = 1 ]; then
    run control.log ${RLOSS_TRAIN} train --solver="${CONFIG_DIR}/solverwithdensecrfloss.prototxt" \
      --weights="${WEIGHTS}" ${GPU_FLAG} $(set_vars) --set DENSECRF_LOSS_WEIGHT=0 --set MODEL_DIR="${MODEL_DIR}/control"
  fi
fi

if [ "${RUN_FULL}" = 1 ]; then
  run full.log ${RLOSS_TRAIN} train --solver="${CONFIG_DIR}/solver.prototxt" ${GPU_FLAG} $(set_vars) \
    --set TRAIN_SET=train_full --set MODEL_DIR="${MODEL_DIR}/full"
fi

if [ "${RUN_TEST}" = 1 ]; then
  TEST_ITER=$(grep -c . "${LIST_DIR}/${TEST_SET}.txt")
  RESULTS=${LOG_DIR}/results.txt
  : > "${RESULTS}"
  for entry in "pce:partial cross-entropy:${MODEL_DIR}/train" "densecrf:+ DenseCRF loss:${MODEL_DIR}/trainwithdensecrfloss" \
               "normalized_cut:+ normalized cut loss:${MODEL_DIR}/trainwithnormalizedcutloss" \
               "gated_crf:+ Gated CRF loss:${MODEL_DIR}/trainwithgatedcrfloss" \
               "size_constraint:+ size constraint loss:${MODEL_DIR}/trainwithsizeconstraintloss" \
               "control:partial cross-entropy, as long (control):${MODEL_DIR}/control/trainwithdensecrfloss" \
               "full:full supervision:${MODEL_DIR}/full/train"; do
    name=${entry%%:*}; rest=${entry#*:}; label=${rest%%:*}
    model=$(latest "${rest#*:}")
    [ -n "${model}" ] || continue
    run "test_${name}.log" ${RLOSS} test --model="${CONFIG_DIR}/test.prototxt" --weights="${model}" \
      --iterations="${TEST_ITER}" ${TEST_GPU_FLAG} $(set_vars) --metrics_json="${LOG_DIR}/metrics_${name}.json"
    ${PYTHON} -c "import json,sys; m=json.load(open(sys.argv[1])); print('%-42s %6.2f %6.2f  %s' % (sys.argv[2], 100*m['mean_iou'], 100*m['pixel_accuracy'], sys.argv[3]))" \
      "${LOG_DIR}/metrics_${name}.json" "${label}" "${model}" >> "${RESULTS}"
  done
  echo
  echo "${NET_ID} on ${TEST_SET} (${TEST_ITER} images)"
  printf '%-42s %6s %6s  %s\n' "model" "mIoU" "pixAcc" "weights"
  cat "${RESULTS}"
fi

TRAIN_LOGS=""
for log in train trainwithdensecrfloss trainwithnormalizedcutloss trainwithgatedcrfloss trainwithsizeconstraintloss \
           control full; do
  [ -f "${LOG_DIR}/${log}.log" ] && TRAIN_LOGS="${TRAIN_LOGS} ${LOG_DIR}/${log}.log"
done
if [ -n "${TRAIN_LOGS}" ]; then  # the training curves beside the logs (needs matplotlib; not fatal)
  if ${RLOSS} plot ${TRAIN_LOGS} -o "${LOG_DIR}/curves.png" --csv "${LOG_DIR}/curves.csv"; then
    echo "training curves: ${LOG_DIR}/curves.png (values in ${LOG_DIR}/curves.csv)"
  else
    echo "no training curves (python -m rloss plot failed; see above)" >&2
  fi
fi
