#!/usr/bin/env bash
# Cloud TPU launcher for trd_jax: create a TPU VM (or a queued resource), install this repo on every worker,
# run `python -m trd_jax.main` on every worker at once, follow host 0's log, stop the run, delete the TPU.
#
# Every command takes --dry-run: it prints the commands it would run, in order, and runs none of them, so
# the whole flow can be read (and tested) without a Google Cloud account.
#
# Kept to bash 3.2 features (macOS laptops launch from the stock bash): no associative arrays, no mapfile,
# and empty arrays are expanded with the ${a[@]+"${a[@]}"} guard that `set -u` needs there.
set -euo pipefail

PROG=launch/tpu.sh
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND --name NAME --zone ZONE [--project PROJECT] [options] [--dry-run]

Commands
  create   Create the TPU: a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a queued
           resource (gcloud compute tpus queued-resources create) that waits for capacity.
             --accelerator-type TYPE    v5litepod-{1,4,8,16,32,64,128,256} (v5e),
                                        v5p-{8,16,32,...,8192,12288} (v5p: the number is TensorCores,
                                        2 per chip), v6e-{1,4,8,16,32,64,128,256} (Trillium)
             --runtime-version V        default per generation: v2-alpha-tpuv5-lite (v5e),
                                        v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
             --queued                   request a queued resource (id: --qr-id, default NAME)
             --valid-until-duration D   queued only: give up on the request after D (e.g. 6h)
             --spot                     spot capacity (preemptible at any time, much cheaper)
             --preemptible              legacy preemptible TPU VM (not with --queued: use --spot)
  install  Put the repo on every worker (--worker=all) and `pip install -e . jax[tpu]` into
           ~/trd_jax/.venv (Python 3.11 through uv: the TPU images ship Python 3.10, trd_jax needs 3.11).
             (default)                  copy this checkout (tracked + untracked, not ignored files)
             --git-url URL [--git-ref REF]   git clone/fetch URL on every worker instead (REF: default HEAD)
             --python-version X.Y       default 3.11
             --no-gcsfuse               skip installing gcsfuse (needed for gs:// paths in `run`)
  run      Start `python -m trd_jax.main` on every worker (--worker=all) in the background (nohup, its own
           session), logs per worker in ~/trd_jax/logs/RUN.workerI.log, pid in ~/trd_jax/logs/RUN.pid.
             --config FILE[:ARGS]       recipe, relative to the repo root (e.g. configs/qwen3.py:opd,4b,trd,v5p-8)
             --workdir gs://BUCKET/PATH | PATH
                                        gs:// is mounted with gcsfuse at ~/gcs/BUCKET on every worker
                                        (trd_jax writes through the local file system); a multi-host
                                        slice needs it: a plain PATH is each worker's own disk
             --config.KEY=VALUE ...     overrides, passed through (gs:// values are mounted the same way)
             --env KEY=VALUE ...        extra environment for the run (repeatable)
             --run-name N               names the log and pid files (default trd)
             -- ARGS...                 anything after -- goes to trd_jax.main verbatim
  logs     Follow one worker's log (tail -F; default --worker 0, the host that logs).  [--run-name N]
  status   Describe the TPU VM, or with --queued the queued resource (its state: WAITING_FOR_RESOURCES,
           PROVISIONING, ACTIVE, ...).
  stop     Stop the run on every worker (SIGTERM to its process group: trd_jax checkpoints on SIGTERM).
           The TPU keeps billing until `delete`.
  delete   Delete the TPU VM, or with --queued the queued resource and its nodes (--force).
             --yes                      do not ask for confirmation (passes --quiet to gcloud)
  cost     Print the estimated on-demand cost of --accelerator-type (needs no --name/--zone).

Common flags
  --name NAME          TPU node name (lowercase letters, digits, hyphens)
  --zone ZONE          e.g. us-west4-a (v5e), us-east5-a (v5p), us-east1-d (v6e); required
  --project PROJECT    default: gcloud's configured project
  --qr-id ID           queued resource id (default: NAME)
  --remote-dir DIR     repo folder on the workers, relative to the home directory (default trd_jax)
  --dry-run            print every command, in order, and run none
  -h, --help           this text

Costs printed by `create` and `cost` are estimates from approximate on-demand list prices (2025); spot,
reserved and committed-use prices are lower and all prices vary by region: see
https://cloud.google.com/tpu/pricing.

Examples
  launch/tpu.sh create  --name trd-v5e --zone us-west4-a --accelerator-type v5litepod-16 --queued --spot
  launch/tpu.sh status  --name trd-v5e --zone us-west4-a --queued
  launch/tpu.sh install --name trd-v5e --zone us-west4-a
  launch/tpu.sh run     --name trd-v5e --zone us-west4-a --config configs/qwen3.py:opsd,4b,trd,v5e-16 \
      --workdir gs://my-bucket/runs/qwen3-4b-trd --config.student.path=gs://my-bucket/models/Qwen3-4B
  launch/tpu.sh logs    --name trd-v5e --zone us-west4-a
  launch/tpu.sh delete  --name trd-v5e --zone us-west4-a --queued
EOF
}

DRY_RUN=0
note() { printf '# %s\n' "$*"; }  # information lines: '#' so that the output stays a valid shell script

# ------------------------------------------------------------------------------------------ TPU catalogue
# Known accelerator types, per generation. Validated here because gcloud's own error for a wrong type
# comes only after the request (or, for a queued resource, when the queue rejects it much later).
#   v5litepod-N (v5e) and v6e-N: N chips; 8 chips per host up to N = 8, then 4-chip hosts.
#   v5p-N: N TensorCores = N / 2 chips, 4 chips per host.
V5E_SIZES="1 4 8 16 32 64 128 256"
V5P_SIZES="8 16 32 64 128 256 512 1024 2048 4096 8192 12288"
V6E_SIZES="1 4 8 16 32 64 128 256"

# Approximate on-demand list prices, USD per chip-hour, as published for US regions in 2025. ESTIMATES:
# they vary by region and change over time; spot / reserved / committed-use are cheaper.
PRICE_DATE=2025
PRICE_URL=https://cloud.google.com/tpu/pricing

generation() {  # TYPE -> v5litepod | v5p | v6e, or die naming --accelerator-type
  local t=$1 gen=${1%-*} n=${1##*-} sizes
  case $gen in
    v5litepod) sizes=$V5E_SIZES ;;
    v5p) sizes=$V5P_SIZES ;;
    v6e) sizes=$V6E_SIZES ;;
    *) die "--accelerator-type: unknown accelerator type '$t' (known: v5litepod-N, v5p-N, v6e-N; see --help)" ;;
  esac
  [[ " $sizes " == *" $n "* ]] \
    || die "--accelerator-type: unknown accelerator type '$t' (known $gen sizes: $sizes)"
  echo "$gen"
}

default_runtime() {
  case $1 in
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

price_per_chip_hour() {
  case $1 in
    v5litepod) echo 1.20 ;;
    v5p) echo 4.20 ;;
    v6e) echo 2.70 ;;
  esac
}

chips() {  # TYPE -> number of chips
  local gen=${1%-*} n=${1##*-}
  if [[ $gen == v5p ]]; then echo $((n / 2)); else echo "$n"; fi
}

hosts() {  # TYPE -> number of TPU VM hosts (workers)
  local gen=${1%-*} c
  c=$(chips "$1")
  if [[ $gen != v5p ]] && ((c <= 8)); then echo 1; else echo $(((c + 3) / 4)); fi
}

cost_line() {
  local t=$1 gen c h p
  gen=$(generation "$t")
  c=$(chips "$t"); h=$(hosts "$t"); p=$(price_per_chip_hour "$gen")
  awk -v t="$t" -v c="$c" -v h="$h" -v p="$p" -v d="$PRICE_DATE" -v u="$PRICE_URL" 'BEGIN {
    printf "# cost estimate: %s = %d chips (%d host%s) x ~$%.2f/chip-hour = ~$%.2f/hour, ~$%.0f/day on demand (approximate %s list price; spot/reserved are cheaper; check %s)\n",
      t, c, h, (h == 1 ? "" : "s"), p, c * p, 24 * c * p, d, u }'
}

# ------------------------------------------------------------------------------------------ arguments
COMMAND=${1:-}
case $COMMAND in
  -h|--help|help) usage; exit 0 ;;
  ""|-*) die "missing COMMAND${COMMAND:+ before '$COMMAND'} (create, install, run, logs, status, stop, delete, cost)" ;;
  create|install|run|logs|status|stop|delete|cost) shift ;;
  *) die "unknown command '$COMMAND' (create, install, run, logs, status, stop, delete, cost)" ;;
esac

NAME="" ZONE="" PROJECT="" QR_ID="" ACCEL="" RUNTIME="" QUEUED=0 SPOT=0 PREEMPTIBLE=0 VALID_UNTIL=""
GIT_URL="" GIT_REF="" PY_VERSION=3.11 GCSFUSE=1 CONFIG="" WORKDIR="" RUN_NAME=trd WORKER=0 YES=0
REMOTE_DIR=trd_jax
OVERRIDES=() ENVS=() PASSTHROUGH=()
SEEN=" "  # flags given, to refuse those that do not apply to COMMAND

ARGS=("$@")
i=0
ARG="" VAL=""
# The value of the flag in $ARG: '--flag=value' or the next word (which must not look like a flag).
no_value() { [[ $ARG != *=* ]] || die "$1 takes no value"; }

while ((i < ${#ARGS[@]})); do
  ARG=${ARGS[$i]}
  FLAG=${ARG%%=*}
  case $FLAG in
    -h|--help) usage; exit 0 ;;
    --dry-run) no_value "$FLAG"; DRY_RUN=1 ;;
    --name) take_value "$FLAG"; NAME=$VAL ;;
    --zone) take_value "$FLAG"; ZONE=$VAL ;;
    --project) take_value "$FLAG"; PROJECT=$VAL ;;
    --qr-id) take_value "$FLAG"; QR_ID=$VAL ;;
    --remote-dir) take_value "$FLAG"; REMOTE_DIR=$VAL ;;
    --accelerator-type) take_value "$FLAG"; ACCEL=$VAL ;;
    --runtime-version|--version) FLAG=--runtime-version; take_value "$FLAG"; RUNTIME=$VAL ;;
    --queued) no_value "$FLAG"; QUEUED=1 ;;
    --valid-until-duration) take_value "$FLAG"; VALID_UNTIL=$VAL ;;
    --spot) no_value "$FLAG"; SPOT=1 ;;
    --preemptible) no_value "$FLAG"; PREEMPTIBLE=1 ;;
    --git-url) take_value "$FLAG"; GIT_URL=$VAL ;;
    --git-ref) take_value "$FLAG"; GIT_REF=$VAL ;;
    --python-version) take_value "$FLAG"; PY_VERSION=$VAL ;;
    --no-gcsfuse) no_value "$FLAG"; GCSFUSE=0 ;;
    --config) take_value "$FLAG"; CONFIG=$VAL ;;
    --workdir) take_value "$FLAG"; WORKDIR=$VAL ;;
    --config.*)
      # Only the '=' form: '--config.a.b VALUE' cannot be told apart from a flag followed by a stray word.
      [[ $ARG == *=* ]] || die "$FLAG: write overrides as $FLAG=VALUE"
      FLAG=--config.KEY; OVERRIDES+=("$ARG") ;;
    --env)
      take_value "$FLAG"
      [[ $VAL =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env: expected KEY=VALUE, got '$VAL'"
      ENVS+=("$VAL") ;;
    --run-name) take_value "$FLAG"; RUN_NAME=$VAL ;;
    --worker) take_value "$FLAG"; WORKER=$VAL ;;
    --yes) no_value "$FLAG"; YES=1 ;;
    --)
      PASSTHROUGH=("${ARGS[@]:$((i + 1))}"); FLAG=--; i=${#ARGS[@]}
      # A --dry-run meant for this script but written after -- would go to trd_jax.main, and the real
      # commands would run.
      for VAL in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do
        [[ $VAL != --dry-run ]] || die "--dry-run after '--' would be passed to trd_jax.main: put it before '--'"
      done ;;
    -*) die "unknown flag '$FLAG' for '$COMMAND'" ;;
    *) die "unexpected argument '$ARG' (flags take the form --flag VALUE)" ;;
  esac
  SEEN+="$FLAG "
  i=$((i + 1))
done

# Refuse flags that COMMAND would silently ignore: a --spot given to `run` is a mistake worth naming.
allow() {
  local f
  for f in $SEEN; do
    case " --dry-run $* " in *" $f "*) ;; *) die "$f does not apply to '$COMMAND'" ;; esac
  done
}
case $COMMAND in
  create) allow --name --zone --project --qr-id --accelerator-type --runtime-version --queued \
            --valid-until-duration --spot --preemptible ;;
  install) allow --name --zone --project --remote-dir --git-url --git-ref --python-version --no-gcsfuse ;;
  run) allow --name --zone --project --remote-dir --config --workdir --config.KEY --env --run-name -- ;;
  logs) allow --name --zone --project --remote-dir --run-name --worker ;;
  status) allow --name --zone --project --qr-id --queued ;;
  stop) allow --name --zone --project --remote-dir --run-name ;;
  delete) allow --name --zone --project --qr-id --queued --yes ;;
  cost) allow --accelerator-type ;;
esac

if [[ $COMMAND == cost ]]; then
  [[ -n $ACCEL ]] || die "--accelerator-type is required for 'cost'"
  cost_line "$ACCEL"
  exit 0
fi

# Names go into gcloud resource paths and remote shell commands: check them here, with the flag named.
[[ -n $NAME ]] || die "--name is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
  || die "--name: '$NAME' is not a valid TPU name (lowercase letters, digits and hyphens, starting with a letter)"
[[ -n $ZONE ]] || die "--zone is required (e.g. us-west4-a)"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone: '$ZONE' does not look like a zone (e.g. us-west4-a)"
[[ -z $PROJECT || $PROJECT =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$|^[a-z][-a-z0-9.]*:[a-z][-a-z0-9]*$ ]] \
  || die "--project: '$PROJECT' is not a valid project id"
QR_ID=${QR_ID:-$NAME}
[[ $QR_ID =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die "--qr-id: '$QR_ID' is not a valid queued resource id"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && $REMOTE_DIR != *..* ]] \
  || die "--remote-dir: '$REMOTE_DIR' must be a plain path relative to the workers' home directory"
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name: '$RUN_NAME' may hold only letters, digits, '.', '_', '-'"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker: '$WORKER' is not a worker index (0, 1, ...)"

# gcloud flags shared by every call.
WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")

ssh_workers() {  # WORKERS REMOTE_COMMAND: run one shell command on the given workers
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

LOG_DIR=$REMOTE_DIR/logs
PID_FILE=$LOG_DIR/$RUN_NAME.pid
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes

# gs://BUCKET/PATH -> the gcsfuse mount point of BUCKET on a worker ("$HOME" expands there); sets BUCKET.
gcs_local() {
  local rest=${1#gs://}
  BUCKET=${rest%%/*}
  local path=${rest#"$BUCKET"}
  [[ $BUCKET =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] || die "$2: '$1' does not name a valid bucket"
  GCS_LOCAL="\"\$HOME\"/gcs/$BUCKET${path:+$(q "$path")}"
}

# ------------------------------------------------------------------------------------------ commands
cmd_create() {
  [[ -n $ACCEL ]] || die "--accelerator-type is required for 'create' (e.g. v5litepod-16, v5p-8, v6e-8)"
  local gen expected
  gen=$(generation "$ACCEL")
  expected=$(default_runtime "$gen")
  if [[ -z $RUNTIME ]]; then
    RUNTIME=$expected
  elif [[ $RUNTIME != "$expected" ]]; then
    # Google's "TPU software versions" page names one JAX runtime per generation; another is a mistake,
    # named here rather than by the API (or, for a queued resource, by the queue much later).
    die "--runtime-version: '$RUNTIME' is not the runtime for $gen ($ACCEL); use $expected"
  fi
  ((SPOT + PREEMPTIBLE <= 1)) || die "--spot and --preemptible exclude each other"
  cost_line "$ACCEL"
  if ((QUEUED)); then
    ((PREEMPTIBLE == 0)) || die "--preemptible does not apply to a queued resource: use --spot"
    local extra=()
    ((SPOT == 0)) || extra+=(--spot)
    [[ -z $VALID_UNTIL ]] || extra+=(--valid-until-duration="$VALID_UNTIL")
    run_cmd gcloud compute tpus queued-resources create "$QR_ID" --node-id="$NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" ${extra[@]+"${extra[@]}"}
    note "the request waits for capacity; '$PROG status --queued ...' shows its state, ACTIVE = ready"
  else
    [[ -z $VALID_UNTIL ]] || die "--valid-until-duration needs --queued"
    local extra=()
    ((SPOT == 0)) || extra+=(--spot)
    ((PREEMPTIBLE == 0)) || extra+=(--preemptible)
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCEL" --version="$RUNTIME" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_install() {
  [[ $PY_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version: '$PY_VERSION' is not a Python version like 3.11"
  [[ -z $GIT_REF || -n $GIT_URL ]] || die "--git-ref needs --git-url"
  local get
  if [[ -n $GIT_URL ]]; then
    # fetch + detached checkout of FETCH_HEAD works the same for a branch, a tag or a commit, and for a
    # first install or an update.
    get="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --quiet $(q "$GIT_URL") $(q "${GIT_REF:-HEAD}"); else git clone --quiet $(q "$GIT_URL") $REMOTE_DIR && git -C $REMOTE_DIR fetch --quiet origin $(q "${GIT_REF:-HEAD}"); fi && git -C $REMOTE_DIR checkout --quiet --detach FETCH_HEAD"
  else
    # The working tree as it is (uncommitted edits included), without .venv, runs/ and other ignored files;
    # tracked files deleted in the working tree are left out (tar would stop on them).
    local tarball=${TMPDIR:-/tmp}/trd_jax-$NAME.tar.gz
    run_cmd bash -c "cd $(q "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d \"\" f; do if [ -e \"\$f\" ]; then printf \"%s\\0\" \"\$f\"; fi; done | tar --null -czf $(q "$tarball") -T -"
    run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:trd_jax-src.tar.gz" "${WHERE[@]}" --worker=all
    get="mkdir -p $REMOTE_DIR && tar -xzf trd_jax-src.tar.gz -C $REMOTE_DIR && rm trd_jax-src.tar.gz"
  fi
  local fuse=""
  if ((GCSFUSE)); then
    # gcsfuse from Google's apt repository (the documented install): gs:// workdirs are mounted with it.
    fuse="if ! command -v gcsfuse >/dev/null; then echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi && "
  fi
  # uv gives a Python 3.11 venv on the Python 3.10 TPU images without touching the system Python (the
  # --break-system-packages retry is for images whose pip refuses --user installs, PEP 668).
  ssh_workers all "set -euo pipefail && $get && ${fuse}cd $REMOTE_DIR && (python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv) && ([ -x .venv/bin/python ] || python3 -m uv venv --quiet --python $PY_VERSION .venv) && python3 -m uv pip install --quiet --python .venv/bin/python -e . \"jax[tpu]\" && .venv/bin/python -c \"import jax, jaxlib, trd_jax; print(jax.__version__)\""
}

cmd_run() {
  [[ -n $CONFIG ]] || die "--config is required for 'run' (e.g. configs/default.py)"
  [[ -n $WORKDIR ]] || die "--workdir is required for 'run' (gs://BUCKET/PATH or a path)"
  local cfg_file=${CONFIG%%:*}
  [[ $cfg_file != /* ]] || die "--config: '$CONFIG' must be relative to the repo root (e.g. configs/default.py)"
  [[ -f $REPO_ROOT/$cfg_file ]] || die "--config: no file '$cfg_file' in $REPO_ROOT"
  [[ $WORKDIR != gs:/* || $WORKDIR == gs://?* ]] || die "--workdir: '$WORKDIR' is not gs://BUCKET/PATH"

  local mounts=" " main_args w o
  main_args="--config $(q "$CONFIG")"
  if [[ $WORKDIR == gs://* ]]; then
    gcs_local "$WORKDIR" --workdir; mounts+="$BUCKET "; w=$GCS_LOCAL
  else
    note "--workdir $WORKDIR is on each worker's own disk: fine on one host; a multi-host slice needs gs://"
    w=$(q "$WORKDIR")
  fi
  main_args+=" --workdir $w"
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    if [[ ${o#*=} == gs://* ]]; then
      gcs_local "${o#*=}" "${o%%=*}"; mounts+="$BUCKET "
      main_args+=" $(q "${o%%=*}=")$GCS_LOCAL"
    else
      main_args+=" $(q "$o")"
    fi
  done
  for o in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do main_args+=" $(q "$o")"; done

  local envs="" e
  for e in ${ENVS[@]+"${ENVS[@]}"}; do envs+="export ${e%%=*}=$(q "${e#*=}"); "; done

  local mount_cmds="" b
  for b in $mounts; do
    # --implicit-dirs: see folders made by other writers; --rename-dir-limit: orbax commits a checkpoint
    # by renaming its temporary folder, which gcsfuse refuses by default.
    mount_cmds+="mkdir -p \"\$HOME\"/gcs/$b; mountpoint -q \"\$HOME\"/gcs/$b || gcsfuse --implicit-dirs --rename-dir-limit=200000 $b \"\$HOME\"/gcs/$b; "
  done
  [[ -z $mount_cmds ]] || mount_cmds="command -v gcsfuse >/dev/null || { echo \"gcsfuse missing: run $PROG install first\" >&2; exit 1; }; $mount_cmds"

  # trd_jax.distributed starts jax.distributed only when TPU_WORKER_HOSTNAMES lists several hosts, and an
  # ssh session on a TPU VM is not promised to have it, so it is set here from the worker's metadata (the
  # source JAX's own Cloud TPU detection reads, so the values agree), with the worker's index
  # (TPU_WORKER_ID), which also names the log. worker-network-endpoints is "name:id:ip,..." or plain
  # hostnames: keep the last field.
  # Steps are joined with ';' under `set -e` (not '&&'): an '&&' list ending in '&' would put the whole
  # list, checks included, in the background.
  local remote
  remote="set -euo pipefail; cd $REMOTE_DIR; mkdir -p logs"
  remote+="; if [ -f logs/$RUN_NAME.pid ] && kill -0 \"\$(cat logs/$RUN_NAME.pid)\" 2>/dev/null; then echo \"run $RUN_NAME is still running on \$(hostname): $PROG stop first\" >&2; exit 1; fi"
  remote+="; TPU_WORKER_ID=\$(curl -sf -H Metadata-Flavor:Google $METADATA/agent-worker-number)"
  remote+="; TPU_WORKER_HOSTNAMES=\$(curl -sf -H Metadata-Flavor:Google $METADATA/worker-network-endpoints | tr , \"\\n\" | sed \"s/.*://\" | paste -sd, -)"
  remote+="; export TPU_WORKER_ID TPU_WORKER_HOSTNAMES; $envs$mount_cmds"
  remote+="LOG=logs/$RUN_NAME.worker\$TPU_WORKER_ID.log"
  # setsid: the run gets its own process group (what `stop` signals) and outlives the ssh session.
  remote+="; setsid nohup .venv/bin/python -m trd_jax.main $main_args > \"\$LOG\" 2>&1 < /dev/null &"
  remote+=" echo \$! > logs/$RUN_NAME.pid; echo \"worker \$TPU_WORKER_ID: pid \$! log ~/$REMOTE_DIR/\$LOG\""
  ssh_workers all "$remote"
  note "follow host 0: $PROG logs --name $NAME --zone $ZONE${PROJECT:+ --project $PROJECT} --run-name $RUN_NAME"
}

cmd_logs() {
  # Host 0 is the one that logs (the others log warnings only); tail -F waits for a log not yet written.
  ssh_workers "$WORKER" "tail -n 200 -F $LOG_DIR/$RUN_NAME.worker$WORKER.log"
}

cmd_status() {
  if ((QUEUED)); then
    run_cmd gcloud compute tpus queued-resources describe "$QR_ID" "${WHERE[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}"
  fi
}

cmd_stop() {
  # SIGTERM to the run's process group (setsid made the run its leader): trd_jax saves a checkpoint on
  # SIGTERM, and grading workers started by the run stop with it.
  ssh_workers all "if [ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; then kill -TERM -- \"-\$(cat $PID_FILE)\" && echo \"\$(hostname): stopped $RUN_NAME\"; else echo \"\$(hostname): $RUN_NAME is not running\"; fi"
  note "the TPU keeps billing until: $PROG delete --name $NAME --zone $ZONE${PROJECT:+ --project $PROJECT}"
}

cmd_delete() {
  local extra=()
  ((YES == 0)) || extra+=(--quiet)
  if ((QUEUED)); then
    # --force deletes the queued resource's nodes first; without it an ACTIVE request cannot be deleted.
    run_cmd gcloud compute tpus queued-resources delete "$QR_ID" "${WHERE[@]}" --force ${extra[@]+"${extra[@]}"}
  else
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" ${extra[@]+"${extra[@]}"}
  fi
}

((DRY_RUN == 0)) || note "dry run: nothing below is executed"
"cmd_$COMMAND"
