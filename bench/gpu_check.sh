#!/usr/bin/env bash
# One prepared GPU check (issue: scale-out and proof of speed): the rollout and update benchmarks on a
# ~0.5B random model in bf16, tokens/s against transformers' generate and MFU against the card's peak.
# Runs with the machine's own jax / flax / optax / torch / transformers and this checkout on PYTHONPATH;
# output also goes to $OUT/gpu_check.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  python3 bench/gpu_check.py "$@"
  # continuous batching against static groups on a long-tailed mix (issue 19), small model: per-step overheads
  python3 bench/continuous.py --rows 128 --slots 32 --max-new 256 --rounds 2
  # dense against blockwise attention alone, forward + backward, at the lengths where dense starts to hurt
  python3 bench/attention.py --dtype bfloat16 --heads 16 --kv-heads 8 --head-dim 128 --lengths 4096 16384 --repeats 3
} 2>&1 | tee "$log"
