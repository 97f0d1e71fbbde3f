#!/usr/bin/env bash
# Starts the two jobs of offline TRD with a teacher job (trd_jax/offline/teacher_job.py): a teacher job
# (mode=generate) on its own nodes or TPU slice that writes each round's targets, and a training job that
# trains on them without loading the teacher. Both go through the existing launchers (gpu_slurm.sh: two
# sbatch jobs; tpu.sh run: two TPUs), with the same offline settings, so that neither can be started with
# settings the other would refuse. --dry-run is passed to both: every command is printed, none runs.
#
# Kept to bash 3.2 features, like tpu.sh.
set -euo pipefail

PROG=launch/offline_pair.sh
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<'EOF'
Usage: launch/offline_pair.sh slurm|tpu --config FILE --workdir DIR --rounds R --steps-per-round S
                              [--max-lag L] [--offline-dir D] [--top-k K]
                              [--teacher=OPT ...] [--student=OPT ...] [--config.KEY=VALUE ...] [--dry-run]

Starts a teacher job (python -m trd_jax.main --config.mode=generate) and a training job on one offline.dir:
R rounds of S steps (train.steps = R x S); the teacher job writes round r from the student the training job
publishes at the start of round r - L, so it runs up to L rounds ahead (L = 0: the jobs take turns).

Backends
  slurm   two jobs through launch/gpu_slurm.sh (job names trd_teacher and trd_train); give each its
          resources with --teacher=/--student= options, e.g. --teacher=--nodes=1 --teacher=--gpus-per-node=8
  tpu     `launch/tpu.sh run` on two existing TPUs (created and installed with tpu.sh create / install);
          name each: --teacher=--name=trd-teacher --teacher=--zone=us-east5-a (and the same for --student=)

Required
  --config FILE[:ARGS]    recipe, relative to the repo root, for both jobs
  --workdir DIR           the teacher job runs in DIR/teacher, the training job in DIR/train (a shared file
                          system, or gs:// with tpu)
  --rounds R              rounds of targets (>= 1)
  --steps-per-round S     training steps per round (>= 1)
Options
  --max-lag L             rounds the teacher job may run ahead (0 <= L < R; default 0)
  --offline-dir D         where the targets and the published students go (default DIR/targets)
  --top-k K               teacher log-probs kept per position (default: the recipe's offline.top_k)
  --teacher=OPT           one more word for the teacher job's launcher (repeatable; the = form)
  --student=OPT           one more word for the training job's launcher (repeatable; the = form)
  --config.KEY=VALUE      overrides for both jobs (repeatable)
  --dry-run               print every command of both launchers, in order, and run none
  -h, --help              this text

Cost: both jobs' resources for as long as they hold them; the teacher job ends when it has written the
last round, the training job when it has trained it. Each job logs when it waits for the other.

Example
  launch/offline_pair.sh slurm --config configs/qwen3.py:opd,1.7b,trd,h100x8 --workdir /shared/runs/q-off \
      --rounds 4 --steps-per-round 50 --max-lag 1 \
      --teacher=--nodes=1 --teacher=--gpus-per-node=8 --student=--nodes=1 --student=--gpus-per-node=8 \
      --config.student.path=/shared/models/Qwen3-1.7B --config.teacher.path=/shared/models/Qwen3-8B
EOF
}

DRY_RUN=0
BACKEND="" CONFIG="" WORKDIR="" ROUNDS="" PER_ROUND="" MAX_LAG=0 OFFLINE_DIR="" TOP_K=""
TEACHER_OPTS=() STUDENT_OPTS=() OVERRIDES=()

ARGS=("$@")
i=0
ARG="" VAL=""
while ((i < ${#ARGS[@]})); do
  ARG=${ARGS[$i]}
  FLAG=${ARG%%=*}
  case $FLAG in
    -h|--help) usage; exit 0 ;;
    --dry-run) [[ $ARG != *=* ]] || die "--dry-run takes no value"; DRY_RUN=1 ;;
    slurm|tpu) [[ -z $BACKEND ]] || die "one backend only (got '$BACKEND' and '$ARG')"; BACKEND=$ARG ;;
    --config) take_value "$FLAG"; CONFIG=$VAL ;;
    --workdir) take_value "$FLAG"; WORKDIR=$VAL ;;
    --rounds) take_value "$FLAG"; ROUNDS=$VAL ;;
    --steps-per-round) take_value "$FLAG"; PER_ROUND=$VAL ;;
    --max-lag) take_value "$FLAG"; MAX_LAG=$VAL ;;
    --offline-dir) take_value "$FLAG"; OFFLINE_DIR=$VAL ;;
    --top-k) take_value "$FLAG"; TOP_K=$VAL ;;
    --teacher|--student)
      [[ $ARG == *=?* ]] || die "$FLAG takes its launcher option in the = form, e.g. $FLAG=--nodes=2"
      if [[ $FLAG == --teacher ]]; then TEACHER_OPTS+=("${ARG#*=}"); else STUDENT_OPTS+=("${ARG#*=}"); fi ;;
    --config.*)
      [[ $ARG == *=* ]] || die "$ARG needs a value (--config.KEY=VALUE)"
      case ${FLAG#--config.} in
        mode|offline.*|train.steps) die "$FLAG is set by $PROG (use its own flags: --rounds, --steps-per-round, ...)" ;;
      esac
      OVERRIDES+=("$ARG") ;;
    -*) die "unknown flag '$FLAG'" ;;
    *) die "unexpected argument '$ARG' (the backend is slurm or tpu)" ;;
  esac
  i=$((i + 1))
done

whole() {  # NAME VALUE MIN: VALUE is a whole number >= MIN, or die naming NAME
  [[ $2 =~ ^[0-9]+$ ]] && ((10#$2 >= $3)) || die "$1: '$2' is not a whole number >= $3"
}
[[ -n $BACKEND ]] || die "the backend is required: slurm or tpu"
[[ -n $CONFIG ]] || die "--config is required (e.g. configs/default.py)"
[[ -n $WORKDIR ]] || die "--workdir is required"
[[ -n $ROUNDS ]] || die "--rounds is required"
[[ -n $PER_ROUND ]] || die "--steps-per-round is required"
whole --rounds "$ROUNDS" 1
whole --steps-per-round "$PER_ROUND" 1
whole --max-lag "$MAX_LAG" 0
ROUNDS=$((10#$ROUNDS)) PER_ROUND=$((10#$PER_ROUND)) MAX_LAG=$((10#$MAX_LAG))
((MAX_LAG < ROUNDS)) || die "--max-lag: $MAX_LAG must be < --rounds $ROUNDS"
[[ -z $TOP_K ]] || whole --top-k "$TOP_K" 1
if [[ $BACKEND == slurm && $WORKDIR != /* ]]; then WORKDIR=$PWD/$WORKDIR; fi  # as gpu_slurm.sh does
WORKDIR=${WORKDIR%/}
OFFLINE_DIR=${OFFLINE_DIR:-$WORKDIR/targets}
if [[ $BACKEND == slurm && $OFFLINE_DIR != /* ]]; then OFFLINE_DIR=$PWD/$OFFLINE_DIR; fi

# The settings both jobs must share (the training job refuses rounds written with others).
SHARED=(--config.offline.dir="$OFFLINE_DIR" --config.offline.teacher_job=true --config.offline.rounds="$ROUNDS"
        --config.offline.steps_per_round="$PER_ROUND" --config.offline.max_lag="$MAX_LAG"
        --config.train.steps=$((ROUNDS * PER_ROUND)))
[[ -z $TOP_K ]] || SHARED+=(--config.offline.top_k="$TOP_K")
DRY=()
((DRY_RUN == 0)) || DRY=(--dry-run)

start() {  # ROLE WORKDIR NAME [LAUNCHER OPTIONS...] -- [trd_jax.main overrides...]
  local role=$1 workdir=$2 name=$3
  shift 3
  local opts=() overrides=()
  while (($#)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
  shift
  overrides=("$@")
  echo "# --- the $role job ---"
  if [[ $BACKEND == slurm ]]; then
    "$HERE/gpu_slurm.sh" --job-name "$name" ${opts[@]+"${opts[@]}"} --config "$CONFIG" --workdir "$workdir" \
      ${overrides[@]+"${overrides[@]}"} ${DRY[@]+"${DRY[@]}"}
  else
    "$HERE/tpu.sh" run --run-name "$name" ${opts[@]+"${opts[@]}"} --config "$CONFIG" --workdir "$workdir" \
      ${overrides[@]+"${overrides[@]}"} ${DRY[@]+"${DRY[@]}"}
  fi
}

# The teacher job first: it waits for the training job's round-0 student, and so is ready when it appears.
start teacher "$WORKDIR/teacher" trd_teacher ${TEACHER_OPTS[@]+"${TEACHER_OPTS[@]}"} -- \
  --config.mode=generate "${SHARED[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
start training "$WORKDIR/train" trd_train ${STUDENT_OPTS[@]+"${STUDENT_OPTS[@]}"} -- \
  "${SHARED[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
echo "# targets and published students: $OFFLINE_DIR"
