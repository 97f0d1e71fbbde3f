#!/usr/bin/env bash
# jax.distributed environment without SLURM: for machines started by hand, by ssh, or by another
# scheduler. Given the coordinator (process 0's host and a free port), the number of processes and this
# process's index, it prints the exports that trd_jax/distributed.py reads -- JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES, JAX_PROCESS_ID (and, if asked, JAX_LOCAL_DEVICE_IDS, which jax.distributed.initialize
# reads itself) -- or, after `--`, runs a command with them set.
#
#   eval "$(launch/gpu_env.sh --coordinator node0:12321 --num-processes 2 --process-id 1)"
#   launch/gpu_env.sh --coordinator node0:12321 --num-processes 2 --process-id 1 -- \
#       .venv/bin/python -m trd_jax.main --config configs/default.py --workdir /shared/runs/x
#
# Run one such process per machine (it drives all of that machine's GPUs), process 0 on the coordinator's
# host: jax.distributed starts the coordinator service inside process 0.
set -euo pipefail

PROG=launch/gpu_env.sh
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_env.sh --coordinator HOST:PORT --num-processes N --process-id I
                         [--local-device-ids 0,1,...] [--dry-run] [-- COMMAND...]

Without COMMAND: prints `export` lines for eval (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID: the names trd_jax/distributed.py reads). With `-- COMMAND...`: runs COMMAND with them set
(exec); with --dry-run it prints that command line instead of running it.

  --coordinator HOST:PORT   process 0's host and a free TCP port on it (e.g. node0:12321, 10.0.0.2:12321)
  --num-processes N         total number of processes, >= 1 (one per machine); N = 1 needs no coordinator
                            (trd_jax then starts no jax.distributed)
  --process-id I            this process's index, 0 <= I < N; 0 must run on the coordinator's host
  --local-device-ids LIST   GPUs of this machine that the process drives (JAX_LOCAL_DEVICE_IDS), e.g.
                            0,1,2,3. Default: all it sees -- except inside a SLURM or Open MPI job, where
                            JAX would then give each process a single GPU (its local rank): pass the list.
  --dry-run                 print the command that -- would run, and run nothing
  -h, --help                this text

Example, two machines:
  node0$ launch/gpu_env.sh --coordinator node0:12321 --num-processes 2 --process-id 0 -- \
             .venv/bin/python -m trd_jax.main --config configs/default.py --workdir /shared/runs/x
  node1$ launch/gpu_env.sh --coordinator node0:12321 --num-processes 2 --process-id 1 -- \
             .venv/bin/python -m trd_jax.main --config configs/default.py --workdir /shared/runs/x
EOF
}

COORDINATOR="" NUM="" PID="" LOCAL_IDS="" DRY_RUN=0
COMMAND=()
ARGS=("$@")
i=0
ARG="" VAL=""

while ((i < ${#ARGS[@]})); do
  ARG=${ARGS[$i]}
  FLAG=${ARG%%=*}
  case $FLAG in
    -h|--help) usage; exit 0 ;;
    --dry-run) [[ $ARG != *=* ]] || die "--dry-run takes no value"; DRY_RUN=1 ;;
    --coordinator) take_value "$FLAG"; COORDINATOR=$VAL ;;
    --num-processes) take_value "$FLAG"; NUM=$VAL ;;
    --process-id) take_value "$FLAG"; PID=$VAL ;;
    --local-device-ids) take_value "$FLAG"; LOCAL_IDS=$VAL ;;
    --) COMMAND=("${ARGS[@]:$((i + 1))}"); i=${#ARGS[@]}
        ((${#COMMAND[@]})) || die "nothing after '--': give the command to run" ;;
    -*) die "unknown flag '$FLAG'" ;;
    *) die "unexpected argument '$ARG' (flags take the form --flag VALUE; the command goes after --)" ;;
  esac
  i=$((i + 1))
done

[[ -n $COORDINATOR ]] || die "--coordinator is required (HOST:PORT of process 0)"
# HOST: a name or an IPv4 address; PORT: what jax.distributed binds on process 0's host.
[[ $COORDINATOR =~ ^([A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?):([0-9]+)$ ]] \
  || die "--coordinator: '$COORDINATOR' is not HOST:PORT (e.g. node0:12321)"
PORT=${BASH_REMATCH[3]}
((10#$PORT >= 1 && 10#$PORT <= 65535)) || die "--coordinator: port $PORT is not in 1-65535"
[[ -n $NUM ]] || die "--num-processes is required"
[[ $NUM =~ ^[0-9]+$ ]] && ((10#$NUM >= 1)) || die "--num-processes: '$NUM' is not a whole number >= 1"
[[ -n $PID ]] || die "--process-id is required"
[[ $PID =~ ^[0-9]+$ ]] || die "--process-id: '$PID' is not a whole number (0 .. N-1)"
NUM=$((10#$NUM)) PID=$((10#$PID))
((PID < NUM)) || die "--process-id: $PID is not below --num-processes $NUM"

[[ -z $LOCAL_IDS || $LOCAL_IDS =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--local-device-ids: '$LOCAL_IDS' is not a comma-separated list of GPU indices (e.g. 0,1,2,3)"

VARS=(JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM" JAX_PROCESS_ID="$PID")
[[ -z $LOCAL_IDS ]] || VARS+=(JAX_LOCAL_DEVICE_IDS="$LOCAL_IDS")

if ((${#COMMAND[@]} == 0)); then
  # Nothing runs here, so --dry-run prints the same lines.
  for v in "${VARS[@]}"; do echo "export ${v%%=*}=$(q "${v#*=}")"; done
  exit 0
fi
if ((DRY_RUN)); then
  out="env"
  for w in "${VARS[@]}" "${COMMAND[@]}"; do out+=" $(q "$w")"; done
  printf '%s\n' "$out"
  exit 0
fi
exec env "${VARS[@]}" "${COMMAND[@]}"
