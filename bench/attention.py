"""Dense against blockwise (flash) attention: compiled temporary memory (XLA's buffer assignment) and median
time of forward + backward, side by side in one run, for causal self-attention over T tokens.

    python bench/attention.py                      # T = 1024, 2048, 4096; 8 heads / 4 kv heads x 64; f32
    python bench/attention.py --lengths 8192 --block 512 --repeats 3

The memory figures are the backend's (CPU here). Dense holds f32 scores [B, heads, T, T] (and the backward
two more); blockwise holds one [block x block] tile per head and a log-sum-exp per query.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from update_step import median_seconds  # noqa: E402

from trd_jax.models.attention import blockwise_attention, dense_attention, dense_mask  # noqa: E402


def kernels(block: int):
    def dense(q, k, v, key_mask):
        return dense_attention(q, k, v, dense_mask(key_mask, 0, q.shape[3]))

    def blockwise(q, k, v, key_mask):
        return blockwise_attention(q, k, v, key_mask, 0, block_q=block, block_k=block)

    return {"dense": dense, "blockwise": blockwise}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dt = jnp.dtype(args.dtype)
    kh, g = args.kv_heads, args.heads // args.kv_heads
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {args.batch}, heads "
          f"{args.heads}/{kh} x {args.head_dim}, {args.dtype}, block {args.block}; forward + backward of "
          f"sum(out * w)")
    print(f"{'T':>6} {'kernel':>10} {'temp MiB':>10} {'median ms':>10} {'max |d out|':>12}")
    rng = np.random.default_rng(0)
    for t in args.lengths:
        q = jnp.asarray(rng.normal(size=(args.batch, kh, g, t, args.head_dim)), dt)
        k, v = (jnp.asarray(rng.normal(size=(args.batch, kh, t, args.head_dim)), dt) for _ in range(2))
        key_mask = jnp.ones((args.batch, t), bool)
        w = jnp.asarray(rng.normal(size=q.shape), dt)
        results = {}
        for name, fn in kernels(args.block).items():
            step = jax.jit(jax.value_and_grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, key_mask) * w),
                                              argnums=(0, 1, 2)))
            temp = step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
            seconds = median_seconds(lambda step=step: step(q, k, v), args.repeats)
            results[name] = (temp, seconds, fn(q, k, v, key_mask))
        diff = float(jnp.max(jnp.abs(results["dense"][2] - results["blockwise"][2])))
        for name, (temp, seconds, _) in results.items():
            print(f"{t:>6} {name:>10} {temp / 2**20:>10.1f} {seconds * 1e3:>10.1f} "
                  f"{diff if name == 'blockwise' else 0.0:>12.2e}")
        (dm, ds, _), (bm, bs, _) = results["dense"], results["blockwise"]
        print(f"{t:>6} {'ratio':>10} {bm / dm:>10.3f} {bs / ds:>10.2f}   (blockwise / dense)")


if __name__ == "__main__":
    main()
