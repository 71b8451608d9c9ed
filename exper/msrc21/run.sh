#!/bin/bash
# MSRC-21 at CPU scale: does the DenseCRF loss beat partial cross-entropy on real photos? (issue 12)
#
# The net is msrc_fov (exper/msrc21/make_nets.py), trained from scratch on half-size photos. For each
# seed in SEEDS, five conditions, same net, data and schedule:
#   pce             phase 1: partial cross-entropy on the scribbles (train.txt), MAX_ITER iterations
#   densecrf        phase 2 from pce: + DenseCRF loss (DENSECRF_LOSS_WEIGHT, BI_XY_STD, BI_RGB_STD), MAX_ITER2
#   normalized_cut  phase 2 from pce: + normalized cut loss (NORMALIZED_CUT_LOSS_WEIGHT, NC_XY_STD, NC_RGB_STD)
#   gated_crf, size_constraint  (not in the default CONDITIONS) phase 2 from pce: + Gated CRF loss
#                   (GATED_CRF_LOSS_WEIGHT) or + size constraint loss on the scribbles' tags
#                   (SIZE_CONSTRAINT_LOSS_WEIGHT), the layers of the original networks' phase-2 files
#   control         phase 2 from pce with DenseCRF weight 0: partial cross-entropy as long as both phases
#   full            full supervision (train_full.txt): phase 1 then phase 2 (weight 0), as long as the others
# Each final model is tested on val (mIoU, the reported number) and on train_full (the training images
# against their full ground truth); exper/msrc21/report.py then writes OUT/results/summary.json
# ({condition: {seed: val mIoU in %}}), summary_train.json (the same on the training images), summary.md
# (mean +- std per condition, ratio to full) and summary.png (bars, and a few val images).
#
#   bash exper/msrc21/run.sh                      # the reported protocol (SEEDS="1 2 3")
#   QUICK=1 bash exper/msrc21/run.sh              # all of it at a tiny budget (minutes; the test runs it)
#   SEEDS=1 CONDITIONS="pce full" bash exper/msrc21/run.sh
#   DENSECRF_LOSS_WEIGHT=3e-6 BI_XY_STD=20 CONDITIONS=densecrf OUT=/tmp/sweep1 PHASE1_OUT=exper/msrc21 \
#     SEEDS=1 TEST_SETS=val bash exper/msrc21/run.sh        # one point of a phase-2 sweep
# A phase 2 starts from the phase-1 model of its seed in PHASE1_OUT (default OUT), which is trained first
# when it is missing (PHASE1_OUT=OUT only) or when CONDITIONS has pce: sweeps of phase 2 can share phase 1.
#
# Every variable below can be set from the environment. DATA_ROOT (default ../shared/data/msrc21 beside
# the repository) and OUT (default exper/msrc21, or exper/msrc21/quick with QUICK=1), when given as
# relative paths, are relative to the current directory. PRECISION=bf16 trains and tests under autocast.
# A failed step stops the script, naming the step and its log.
set -eu
CALLER_DIR=$(pwd)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "${REPO}"

absolute() {  # absolute PATH: PATH made absolute against the caller's directory
  case "$1" in /*) echo "$1" ;; *) echo "${CALLER_DIR}/$1" ;; esac
}

PYTHON=${PYTHON:-python3}
RLOSS="${PYTHON} -m rloss"
QUICK=${QUICK:-0}
DEFAULTED=""
default() {  # default NAME VALUE: NAME takes VALUE unless set; the values taken are printed at the start
  if [ -z "${!1:-}" ]; then printf -v "$1" '%s' "$2"; DEFAULTED="${DEFAULTED} $1=$2"; fi
}

if [ -n "${DATA_ROOT:-}" ]; then DATA_ROOT=$(absolute "${DATA_ROOT}"); else DATA_ROOT=${REPO}/../shared/data/msrc21; fi
[ ! -d "${DATA_ROOT}" ] || DATA_ROOT=$(cd "${DATA_ROOT}" && pwd)
DATA_ROOT=${DATA_ROOT%/}/
if [ ! -f "${DATA_ROOT}list/train.txt" ] || [ ! -f "${DATA_ROOT}list/train_full.txt" ] ||
   [ ! -f "${DATA_ROOT}list/val.txt" ]; then
  echo "msrc21: no MSRC-21 data at ${DATA_ROOT} (expected list/train.txt, list/train_full.txt, list/val.txt);" \
       "set DATA_ROOT to the folder of /work/shared/data/msrc21's layout" >&2
  exit 2
fi

if [ "${QUICK}" = 1 ]; then  # the whole protocol at a tiny budget, on a few images
  default OUT exper/msrc21/quick
  for v in SEEDS=1 MAX_ITER=4 MAX_ITER2=4 BATCH_SIZE=2 CROP_SIZE=33 DISPLAY=2 QUICK_IMAGES=4 FIGURE_IMAGES=2 \
           THREADS=1; do
    default "${v%%=*}" "${v#*=}"
  done
else
  default OUT exper/msrc21
  # The reported protocol: about 0.5 s an iteration (phase 1, batch 10, crop 113) on 2 unloaded cores, 0.7 s at
  # THREADS=1 beside another run; see README.md here.
  for v in SEEDS="1 2 3" MAX_ITER=1000 MAX_ITER2=1000 BATCH_SIZE=10 CROP_SIZE=113 DISPLAY=50 QUICK_IMAGES=0 \
           FIGURE_IMAGES=4; do
    default "${v%%=*}" "${v#*=}"
  done
fi
OUT=$(absolute "${OUT}")
if [ -n "${PHASE1_OUT:-}" ]; then PHASE1_OUT=$(absolute "${PHASE1_OUT}"); else PHASE1_OUT=${OUT}; fi
for v in CONDITIONS="pce densecrf normalized_cut control full" TEST_SETS="val train_full" BASE_LR=0.01 \
         BASE_LR2=0.001 TEST_CROP_SIZE=161 NUM_LABELS=21 BI_XY_STD=30 BI_RGB_STD=15 DENSECRF_SCALE=1 \
         NORMALIZED_CUT_LOSS_WEIGHT=0.3 GATED_CRF_LOSS_WEIGHT=20 SIZE_CONSTRAINT_LOSS_WEIGHT=0.3 \
         DENSECRF_LOSS_WEIGHT=2.5e-7; do  # the DenseCRF weight of the seed-1 sweep (README.md here)
  default "${v%%=*}" "${v#*=}"
done
default NC_XY_STD "${BI_XY_STD}"
default NC_RGB_STD "${BI_RGB_STD}"
PRECISION_FLAG=${PRECISION:+--precision=${PRECISION}}
# THREADS=N: torch's and the lattice's threads (default torch's, one a core). On cores that other jobs share,
# THREADS=1 can be several times faster than two threads waiting for each other.
[ -z "${THREADS:-}" ] || export OMP_NUM_THREADS=${THREADS}

CONFIG_DIR=exper/msrc21
LOG_DIR=${OUT}/log
mkdir -p "${LOG_DIR}" "${OUT}/model" "${OUT}/results"
LIST_DIR=${DATA_ROOT}list
if [ "${QUICK_IMAGES}" != 0 ]; then  # QUICK_IMAGES lines of each list, evenly spaced (the lists go class by class)
  LIST_DIR=${OUT}/list
  mkdir -p "${LIST_DIR}"
  for set in train train_full val; do
    awk -v n="${QUICK_IMAGES}" '{ line[NR] = $0 }
      END { for (i = 0; i < n && i < NR; i++) print line[1 + int(i * NR / n)] }' \
      "${DATA_ROOT}list/${set}.txt" > "${LIST_DIR}/${set}.txt"
  done
fi
[ "${QUICK}" != 1 ] || export RLOSS_SKIP_MEMORY_CHECK=1  # a few seconds a run, which QUICK cannot spare

echo "msrc21: DATA_ROOT=${DATA_ROOT} OUT=${OUT} SEEDS=\"${SEEDS}\" CONDITIONS=\"${CONDITIONS}\" QUICK=${QUICK}" \
     "PRECISION=${PRECISION:-fp32} THREADS=${THREADS:-default}"
echo "taken from the defaults:${DEFAULTED}"

VARS=()
for v in DATA_ROOT LIST_DIR NUM_LABELS BATCH_SIZE CROP_SIZE TEST_CROP_SIZE MAX_ITER MAX_ITER2 BASE_LR BASE_LR2 DISPLAY \
         DENSECRF_LOSS_WEIGHT BI_XY_STD BI_RGB_STD DENSECRF_SCALE NORMALIZED_CUT_LOSS_WEIGHT NC_XY_STD NC_RGB_STD \
         GATED_CRF_LOSS_WEIGHT SIZE_CONSTRAINT_LOSS_WEIGHT; do
  VARS+=(--set "${v}=${!v}")
done

STEP=""; STEP_LOG=""
echo "# run.sh started $(date -u +%Y-%m-%dT%H:%M:%SZ): step, seconds" >> "${LOG_DIR}/times.tsv"
trap 'echo "msrc21: interrupted during ${STEP:-start-up}${STEP_LOG:+; its log is ${STEP_LOG}}" >&2; exit 130' INT TERM
# run NAME LOG COMMAND...: run COMMAND with its output in LOG; on failure, the last lines of LOG and
# which step failed. The seconds each step took go to OUT/log/times.tsv.
run() {
  STEP=$1; STEP_LOG=$2; shift 2
  echo "msrc21: ${STEP} ... (log: ${STEP_LOG})"
  local start=${SECONDS} status=0
  { echo "msrc21 command: $*"; "$@"; } > "${STEP_LOG}" 2>&1 || status=$?
  if [ "${status}" != 0 ]; then
    tail -n 15 "${STEP_LOG}" >&2
    echo "Failed (exit ${status}): $*" >&2
    echo "msrc21: ${STEP} failed (exit ${status}); its log is ${STEP_LOG}" >&2
    exit "${status}"
  fi
  printf '%s\t%s\n' "${STEP}" "$((SECONDS - start))" >> "${LOG_DIR}/times.tsv"
  echo "msrc21: ${STEP} done in $((SECONDS - start)) s"
  STEP=""; STEP_LOG=""
}

wants() { case " ${CONDITIONS} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
wants_phase2() {  # any condition that starts from the pCE model
  local condition
  for condition in densecrf normalized_cut gated_crf size_constraint control; do
    if wants "${condition}"; then return 0; fi
  done
  return 1
}
model_of() {  # model_of SEED CONDITION: the final snapshot of that condition
  case "$2" in
    pce) echo "${PHASE1_OUT}/model/seed$1/pce/train_iter_${MAX_ITER}.caffemodel" ;;
    densecrf) echo "${OUT}/model/seed$1/densecrf/trainwithdensecrfloss_iter_${MAX_ITER2}.caffemodel" ;;
    normalized_cut) echo "${OUT}/model/seed$1/normalized_cut/trainwithnormalizedcutloss_iter_${MAX_ITER2}.caffemodel" ;;
    gated_crf) echo "${OUT}/model/seed$1/gated_crf/trainwithgatedcrfloss_iter_${MAX_ITER2}.caffemodel" ;;
    size_constraint) echo "${OUT}/model/seed$1/size_constraint/trainwithsizeconstraintloss_iter_${MAX_ITER2}.caffemodel" ;;
    control) echo "${OUT}/model/seed$1/control/trainwithdensecrfloss_iter_${MAX_ITER2}.caffemodel" ;;
    full) echo "${OUT}/model/seed$1/full/trainwithdensecrfloss_iter_${MAX_ITER2}.caffemodel" ;;
    full_phase1) echo "${OUT}/model/seed$1/full_phase1/train_iter_${MAX_ITER}.caffemodel" ;;
  esac
}
train() {  # train SEED NAME SOLVER [ARGS...]: NAME's final model must exist afterwards
  local seed=$1 name=$2 solver=$3; shift 3
  mkdir -p "${OUT}/model/seed${seed}/${name}" "${LOG_DIR}/seed${seed}"
  run "${name} (seed ${seed})" "${LOG_DIR}/seed${seed}/${name}.log" ${RLOSS} train --solver="${CONFIG_DIR}/${solver}" \
    ${PRECISION_FLAG} "${VARS[@]}" --set SEED="${seed}" --set MODEL_DIR="${OUT}/model/seed${seed}/${name}" "$@"
  if [ ! -f "$(model_of "${seed}" "${name}")" ]; then  # stopped early (a signal, a stop request)
    echo "msrc21: ${name} (seed ${seed}) ended without its final model $(model_of "${seed}" "${name}");" \
         "its log is ${LOG_DIR}/seed${seed}/${name}.log" >&2
    exit 1
  fi
}

for seed in ${SEEDS}; do
  PCE=$(model_of "${seed}" pce)
  if [ "${PHASE1_OUT}" != "${OUT}" ]; then
    if { wants pce || wants_phase2; } && [ ! -f "${PCE}" ]; then
      echo "msrc21: no phase-1 model ${PCE} (PHASE1_OUT=${PHASE1_OUT})" >&2
      exit 2
    fi
  elif wants pce || { [ ! -f "${PCE}" ] && wants_phase2; }; then
    train "${seed}" pce solver.prototxt --set TRAIN_SET=train
  fi
  if wants densecrf; then
    train "${seed}" densecrf solverwithdensecrfloss.prototxt --set TRAIN_SET=train --weights="${PCE}"
  fi
  for regularizer in normalized_cut gated_crf size_constraint; do
    if wants "${regularizer}"; then
      train "${seed}" "${regularizer}" "solverwith${regularizer//_/}loss.prototxt" --set TRAIN_SET=train --weights="${PCE}"
    fi
  done
  if wants control; then
    train "${seed}" control solverwithdensecrfloss.prototxt --set TRAIN_SET=train --weights="${PCE}" \
      --set DENSECRF_LOSS_WEIGHT=0
  fi
  if wants full; then
    train "${seed}" full_phase1 solver.prototxt --set TRAIN_SET=train_full
    train "${seed}" full solverwithdensecrfloss.prototxt --set TRAIN_SET=train_full \
      --weights="$(model_of "${seed}" full_phase1)" --set DENSECRF_LOSS_WEIGHT=0
  fi
  for condition in ${CONDITIONS}; do
    for set in ${TEST_SETS}; do
      predictions=()  # the val label maps of the first seed, for the figure
      if [ "${set}" = val ] && [ "${seed}" = "${SEEDS%% *}" ]; then
        predictions=(--output_dir="${OUT}/predictions/${condition}")
      fi
      run "test ${condition} on ${set} (seed ${seed})" "${LOG_DIR}/seed${seed}/test_${condition}_${set}.log" \
        ${RLOSS} test --model="${CONFIG_DIR}/test.prototxt" --weights="$(model_of "${seed}" "${condition}")" \
        ${PRECISION_FLAG} "${VARS[@]}" --set TEST_SET="${set}" \
        --metrics_json="${LOG_DIR}/seed${seed}/metrics_${condition}_${set}.json" \
        ${predictions[@]+"${predictions[@]}"}
    done
  done
done

run report "${LOG_DIR}/report.log" ${PYTHON} exper/msrc21/report.py --out "${OUT}" --seeds "${SEEDS}" \
  --conditions "${CONDITIONS}" --data_root "${DATA_ROOT}" --list_dir "${LIST_DIR}" --figure_images "${FIGURE_IMAGES}" \
  --settings "MAX_ITER=${MAX_ITER} MAX_ITER2=${MAX_ITER2} BATCH_SIZE=${BATCH_SIZE} CROP_SIZE=${CROP_SIZE}
  BASE_LR=${BASE_LR} BASE_LR2=${BASE_LR2} DENSECRF_LOSS_WEIGHT=${DENSECRF_LOSS_WEIGHT} BI_XY_STD=${BI_XY_STD}
  BI_RGB_STD=${BI_RGB_STD} DENSECRF_SCALE=${DENSECRF_SCALE} NORMALIZED_CUT_LOSS_WEIGHT=${NORMALIZED_CUT_LOSS_WEIGHT}
  NC_XY_STD=${NC_XY_STD} NC_RGB_STD=${NC_RGB_STD} GATED_CRF_LOSS_WEIGHT=${GATED_CRF_LOSS_WEIGHT}
  SIZE_CONSTRAINT_LOSS_WEIGHT=${SIZE_CONSTRAINT_LOSS_WEIGHT} PRECISION=${PRECISION:-fp32} QUICK=${QUICK}"
cat "${OUT}/results/summary.md"
echo
echo "test net: ${REPO}/${CONFIG_DIR}/test.prototxt (score another split with:" \
     "${RLOSS} test --model=${CONFIG_DIR}/test.prototxt --weights=MODEL --set DATA_ROOT=${DATA_ROOT}" \
     "--set LIST_DIR=${DATA_ROOT}list --set TEST_SET=SPLIT" \
     "--set TEST_CROP_SIZE=${TEST_CROP_SIZE} --set NUM_LABELS=${NUM_LABELS})"
for seed in ${SEEDS}; do
  for condition in ${CONDITIONS}; do echo "model ${condition} seed ${seed}: $(model_of "${seed}" "${condition}")"; done
done
echo "results: ${OUT}/results/summary.json (${OUT}/results/summary.md, ${OUT}/results/summary.png)"
