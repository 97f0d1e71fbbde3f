#!/usr/bin/env bash
# SLURM launcher for trd_jax on GPU clusters: writes an sbatch script for N nodes x G GPUs (one process per
# node, driving that node's G GPUs) and submits it. With --dry-run it prints the commands it would run --
# mkdir, the script written through a heredoc, sbatch -- and runs none of them.
#
# Multi-process start: trd_jax/distributed.py calls jax.distributed.initialize with the explicit values
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when JAX_COORDINATOR_ADDRESS is set and
# JAX_NUM_PROCESSES > 1; the generated script sets exactly those (the explicit path wins over JAX's own
# SLURM detection, so the port and the coordinator host are ours to choose and to read in the log), and
# JAX_LOCAL_DEVICE_IDS, which jax.distributed.initialize reads itself (see the script).
set -euo pipefail

PROG=launch/gpu_slurm.sh
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --nodes N --gpus-per-node G --config FILE --workdir DIR [options]
                           [--config.KEY=VALUE ...] [-- MAIN_ARGS...] [--dry-run]

Writes DIR/slurm/JOB.sbatch and submits it with sbatch: N nodes, one task per node, each task running
`python -m trd_jax.main` over its node's G GPUs, all N processes joined by jax.distributed
(coordinator: the first host of the allocation, from `scontrol show hostnames $SLURM_JOB_NODELIST`).

Required
  --nodes N               number of nodes (>= 1)
  --gpus-per-node G       GPUs per node (>= 1)
  --config FILE[:ARGS]    recipe, relative to the repo root (e.g. configs/qwen3.py:opd,1.7b,trd,h100x8)
  --workdir DIR           run directory on a file system every node sees (a relative DIR is made
                          absolute against the current directory)
Options
  --partition P           SLURM partition
  --time T                time limit: MM, HH:MM:SS, D-HH, D-HH:MM:SS (default 24:00:00)
  --account A             SLURM account
  --job-name NAME         default trd_jax
  --cpus-per-task C       CPUs per task (= per node); set it to the node's core count where the cluster
                          would otherwise bind the task to 1 CPU
  --no-exclusive          share nodes (default: #SBATCH --exclusive, whole nodes)
  --port PORT             coordinator port on the first node (default 12321)
  --python PATH           interpreter on the nodes (default REPO/.venv/bin/python, with jax[cuda12])
  --env KEY=VALUE         extra environment for the run (repeatable)
  --sbatch-opt OPT        one more '#SBATCH OPT' line, e.g. --sbatch-opt=--qos=high (repeatable)
  --script-out PATH       where to write the sbatch script (default DIR/slurm/JOB.sbatch)
  --config.KEY=VALUE      overrides for trd_jax.main, passed through (repeatable)
  -- ARGS...              anything after -- goes to trd_jax.main verbatim
  --dry-run               print every command, in order, and run none
  -h, --help              this text

The repo (with its .venv) and DIR must be on a shared file system. Cost: the cluster's price of
N x G GPU-hours for the time the job holds the nodes (up to --time).

Example
  launch/gpu_slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00 \
      --config configs/qwen3.py:opd,1.7b,trd,h100x8 --workdir /shared/runs/qwen3-1.7b-trd \
      --config.student.path=/shared/models/Qwen3-1.7B --config.teacher.path=/shared/models/Qwen3-8B
EOF
}

DRY_RUN=0

# ------------------------------------------------------------------------------------------ arguments
NODES="" GPUS="" PARTITION="" TIME=24:00:00 ACCOUNT="" JOB_NAME=trd_jax CPUS="" EXCLUSIVE=1 PORT=12321
PYTHON="" CONFIG="" WORKDIR="" SCRIPT_OUT=""
OVERRIDES=() ENVS=() SBATCH_OPTS=() PASSTHROUGH=()

ARGS=("$@")
i=0
ARG="" VAL=""
no_value() { [[ $ARG != *=* ]] || die "$1 takes no value"; }

while ((i < ${#ARGS[@]})); do
  ARG=${ARGS[$i]}
  FLAG=${ARG%%=*}
  case $FLAG in
    -h|--help) usage; exit 0 ;;
    --dry-run) no_value "$FLAG"; DRY_RUN=1 ;;
    --nodes) take_value "$FLAG"; NODES=$VAL ;;
    --gpus-per-node) take_value "$FLAG"; GPUS=$VAL ;;
    --partition) take_value "$FLAG"; PARTITION=$VAL ;;
    --time) take_value "$FLAG"; TIME=$VAL ;;
    --account) take_value "$FLAG"; ACCOUNT=$VAL ;;
    --job-name) take_value "$FLAG"; JOB_NAME=$VAL ;;
    --cpus-per-task) take_value "$FLAG"; CPUS=$VAL ;;
    --no-exclusive) no_value "$FLAG"; EXCLUSIVE=0 ;;
    --port) take_value "$FLAG"; PORT=$VAL ;;
    --python) take_value "$FLAG"; PYTHON=$VAL ;;
    --config) take_value "$FLAG"; CONFIG=$VAL ;;
    --workdir) take_value "$FLAG"; WORKDIR=$VAL ;;
    --script-out) take_value "$FLAG"; SCRIPT_OUT=$VAL ;;
    --config.*)
      # Only the '=' form: '--config.a.b VALUE' cannot be told apart from a flag followed by a stray word.
      [[ $ARG == *=* ]] || die "$FLAG: write overrides as $FLAG=VALUE"
      OVERRIDES+=("$ARG") ;;
    --env)
      take_value "$FLAG"
      [[ $VAL =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env: expected KEY=VALUE, got '$VAL'"
      ENVS+=("$VAL") ;;
    --sbatch-opt)
      take_value "$FLAG"
      [[ $VAL == -* && $VAL != *$'\n'* ]] || die "--sbatch-opt: expected one sbatch option like --qos=high, got '$VAL'"
      SBATCH_OPTS+=("$VAL") ;;
    --)
      PASSTHROUGH=("${ARGS[@]:$((i + 1))}"); i=${#ARGS[@]}
      # A --dry-run written after -- would go to trd_jax.main, and the real commands would run.
      for VAL in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do
        [[ $VAL != --dry-run ]] || die "--dry-run after '--' would be passed to trd_jax.main: put it before '--'"
      done ;;
    -*) die "unknown flag '$FLAG'" ;;
    *) die "unexpected argument '$ARG' (flags take the form --flag VALUE)" ;;
  esac
  i=$((i + 1))
done

[[ -n $NODES ]] || die "--nodes is required"
[[ $NODES =~ ^[0-9]+$ ]] && ((10#$NODES >= 1)) || die "--nodes: '$NODES' is not a whole number >= 1"
[[ -n $GPUS ]] || die "--gpus-per-node is required"
[[ $GPUS =~ ^[0-9]+$ ]] && ((10#$GPUS >= 1)) || die "--gpus-per-node: '$GPUS' is not a whole number >= 1"
NODES=$((10#$NODES)) GPUS=$((10#$GPUS))
[[ -n $CONFIG ]] || die "--config is required (e.g. configs/default.py)"
[[ ${CONFIG%%:*} != /* ]] || die "--config: '$CONFIG' must be relative to the repo root (e.g. configs/default.py)"
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] || die "--config: no file '${CONFIG%%:*}' in $REPO_ROOT"
[[ -n $WORKDIR ]] || die "--workdir is required"
[[ $WORKDIR != *://* ]] || die "--workdir: '$WORKDIR' must be a path on a shared file system, not a URL"
[[ $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR  # the nodes start in other directories
[[ $WORKDIR != *[[:space:]]* ]] || die "--workdir: '$WORKDIR' holds whitespace, which #SBATCH --output cannot"
[[ $TIME =~ ^(([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}|UNLIMITED|infinite)$ ]] \
  || die "--time: '$TIME' is not a SLURM time (MM, HH:MM:SS, D-HH, D-HH:MM:SS)"
[[ -z $CPUS ]] || { [[ $CPUS =~ ^[0-9]+$ ]] && ((10#$CPUS >= 1)); } || die "--cpus-per-task: '$CPUS' is not a whole number >= 1"
[[ $PORT =~ ^[0-9]+$ ]] && ((10#$PORT >= 1024 && 10#$PORT <= 65535)) || die "--port: '$PORT' is not a port in 1024-65535"
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name: '$JOB_NAME' may hold only letters, digits, '.', '_', '-'"
[[ -z $PARTITION || $PARTITION =~ ^[A-Za-z0-9_.,-]+$ ]] || die "--partition: '$PARTITION' is not a partition name"
[[ -z $ACCOUNT || $ACCOUNT =~ ^[A-Za-z0-9_.-]+$ ]] || die "--account: '$ACCOUNT' is not an account name"
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
SCRIPT_OUT=${SCRIPT_OUT:-$WORKDIR/slurm/$JOB_NAME.sbatch}
LOG_DIR=$WORKDIR/slurm

# ------------------------------------------------------------------------------------------ the script
sbatch_script() {
  local o e
  echo "#!/bin/bash"
  echo "# Written by $PROG: trd_jax on $NODES node(s) x $GPUS GPU(s), one process per node."
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --time=$TIME"
  [[ -z $PARTITION ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z $ACCOUNT ]] || echo "#SBATCH --account=$ACCOUNT"
  [[ -z $CPUS ]] || echo "#SBATCH --cpus-per-task=$CPUS"
  ((EXCLUSIVE == 0)) || echo "#SBATCH --exclusive"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.out"  # sbatch does not expand variables here; the dir exists
  for o in ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"}; do echo "#SBATCH $o"; done
  cat <<'EOF'
set -euo pipefail

# jax.distributed's coordinator runs inside process 0, so its address is process 0's host: the first node
# of the allocation (srun --distribution=block below puts task 0 there). mapfile, not `| head -n 1`,
# which can kill scontrol with SIGPIPE and so fail the job under pipefail.
mapfile -t NODE_NAMES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
EOF
  echo "if [[ \${#NODE_NAMES[@]} -ne $NODES ]]; then"
  echo "  echo \"expected $NODES nodes in \$SLURM_JOB_NODELIST, got \${#NODE_NAMES[@]}\" >&2; exit 1"
  echo "fi"
  echo "# The names trd_jax/distributed.py reads; JAX_PROCESS_ID is set per task below, from SLURM_PROCID."
  echo "export JAX_COORDINATOR_ADDRESS=\"\${NODE_NAMES[0]}:$PORT\""
  echo "export JAX_NUM_PROCESSES=$NODES"
  echo "# Every GPU of the node to its one process. jax.distributed.initialize reads this itself; without it,"
  echo "# seeing SLURM, JAX would give each process only GPU number SLURM_LOCALID (one GPU per node here)."
  echo "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))"
  for e in ${ENVS[@]+"${ENVS[@]}"}; do echo "export ${e%%=*}=$(q "${e#*=}")"; done
  echo
  echo "cd $(q "$REPO_ROOT")"
  printf 'CMD=(%s -m trd_jax.main --config %s --workdir %s' "$(q "$PYTHON")" "$(q "$CONFIG")" "$(q "$WORKDIR")"
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"} ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do printf ' %s' "$(q "$o")"; done
  echo ")"
  echo "echo \"\$(date -Is) job \$SLURM_JOB_ID: \$JAX_NUM_PROCESSES process(es), coordinator \$JAX_COORDINATOR_ADDRESS: \${CMD[*]}\""
  echo
  echo "# One task per node; each exports its own JAX_PROCESS_ID (SLURM_PROCID exists only inside the task)."
  echo "# --kill-on-bad-exit: one process failing ends the others instead of leaving them in a collective."
  echo "srun --nodes=$NODES --ntasks=$NODES --ntasks-per-node=1 --gpus-per-node=$GPUS${CPUS:+ --cpus-per-task=$CPUS} \\"
  echo "  --distribution=block --kill-on-bad-exit=1 \\"
  echo "  bash -c 'export JAX_PROCESS_ID=\"\$SLURM_PROCID\"; exec \"\$@\"' trd_jax \"\${CMD[@]}\""
}

SCRIPT=$(sbatch_script)
# sbatch needs the --output folder to exist before the job starts; the script's folder, if elsewhere, too.
SCRIPT_DIR=$(dirname "$SCRIPT_OUT")
[[ $SCRIPT_DIR != "$LOG_DIR" ]] || SCRIPT_DIR=""
MKDIRS=("$(q "$LOG_DIR")")
[[ -z $SCRIPT_DIR ]] || MKDIRS+=("$(q "$SCRIPT_DIR")")
if ((DRY_RUN)); then
  echo "# dry run: nothing below is executed"
  echo "mkdir -p ${MKDIRS[*]}"
  echo "cat > $(q "$SCRIPT_OUT") <<'SBATCH_EOF'"
  printf '%s\n' "$SCRIPT"
  echo "SBATCH_EOF"
  echo "sbatch $(q "$SCRIPT_OUT")"
else
  run_cmd mkdir -p "$LOG_DIR" ${SCRIPT_DIR:+"$SCRIPT_DIR"}
  echo "# writing $SCRIPT_OUT"
  printf '%s\n' "$SCRIPT" > "$SCRIPT_OUT"
  run_cmd sbatch "$SCRIPT_OUT"
fi
echo "# job log: $LOG_DIR/$JOB_NAME-<jobid>.out (host 0 logs; the others log warnings only)"
