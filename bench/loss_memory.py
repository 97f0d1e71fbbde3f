"""Memory of the forward-KL loss + gradient: naive (f32[B, T, V] logits for student and teacher) against
trd_jax.losses.fused_divergence, from XLA's buffer assignment. Nothing is allocated or run: inputs are
jax.ShapeDtypeStructs and each program is only lowered and compiled.

    python bench/loss_memory.py                  # V=151936 (Qwen), T=4096, B=2, d=1024; bf16 and f32
    python bench/loss_memory.py --dtypes float32 --chunk-sizes 256 1024 --vocab-chunk 8192

The figures come from the backend this runs on (CPU here): other backends assign buffers differently,
so compare the rows with each other rather than with a device's capacity.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from trd_jax import losses


def naive_loss(hs, ws, ht, wt, mask):
    zs = jnp.einsum("btd,dv->btv", hs, ws, preferred_element_type=jnp.float32)
    zt = jnp.einsum("btd,dv->btv", ht, wt, preferred_element_type=jnp.float32)
    return losses.aggregate(losses.forward_kl(zs, zt), mask)


def fused_loss(chunk_size, vocab_chunk):
    def loss(hs, ws, ht, wt, mask):
        values = losses.fused_divergence("forward_kl", hs, ws, ht, wt, chunk_size=chunk_size, vocab_chunk=vocab_chunk)
        return losses.aggregate(values, mask)
    return loss


def memory(loss, args) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    stats = compiled.memory_analysis()
    return dict(temp=stats.temp_size_in_bytes, argument=stats.argument_size_in_bytes,
                output=stats.output_size_in_bytes, compile_s=time.perf_counter() - start)


def table(args, dt) -> float:
    """Prints one table for hidden/head dtype `dt`; returns the smallest naive / fused temp ratio."""
    b, t, v = args.batch, args.seq, args.vocab
    spec = jax.ShapeDtypeStruct
    inputs = (spec((b, t, args.d), dt), spec((args.d, v), dt), spec((b, t, args.teacher_d), dt),
              spec((args.teacher_d, v), dt), spec((b, t), jnp.bool_))
    print(f"\nforward_kl loss + grad wrt student hidden and head; B={b} T={t} V={v} d={args.d} "
          f"d_teacher={args.teacher_d}, hidden/head {dt.name}, logits float32; backend {jax.default_backend()}")
    rows = [("naive", memory(naive_loss, inputs))]
    for c in args.chunk_sizes:
        rows.append((f"fused chunk={c}", memory(fused_loss(c, None), inputs)))
        if args.vocab_chunk:
            rows.append((f"fused chunk={c} vocab_chunk={args.vocab_chunk}",
                         memory(fused_loss(c, args.vocab_chunk), inputs)))
    gib = 2.0**30
    naive_temp = rows[0][1]["temp"]
    print(f"{'variant':<36}{'temp GiB':>10}{'args GiB':>10}{'out GiB':>10}{'temp ratio':>12}{'compile s':>11}")
    for name, m in rows:
        print(f"{name:<36}{m['temp'] / gib:>10.3f}{m['argument'] / gib:>10.3f}{m['output'] / gib:>10.3f}"
              f"{naive_temp / max(m['temp'], 1):>11.1f}x{m['compile_s']:>11.1f}")
    if jax.default_backend() == "cpu" and dt.itemsize < 4:
        print(f"note: XLA:CPU has no {dt.name} matmul: it may hoist a float32 copy of a whole [d, V] head out of "
              f"the loops ({args.d * v * 4 / gib:.2f} GiB each; the tiled row holds both heads' copies). "
              f"GPU/TPU multiply {dt.name} natively")
    return min(naive_temp / max(m["temp"], 1) for _, m in rows[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--d", type=int, default=1024, help="student hidden size")
    parser.add_argument("--teacher-d", type=int, default=1024)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="hidden states and lm_head")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--vocab-chunk", type=int, default=16384, help="also measure vocabulary tiling (0: skip)")
    args = parser.parse_args()

    print(f"one f32[B, T, V] logits array: {args.batch * args.seq * args.vocab * 4 / 2**30:.2f} GiB")
    worst = min(table(args, jnp.dtype(dt)) for dt in args.dtypes)
    print(f"\ntarget: every fused variant needs >= 8x less temporary memory than naive: "
          f"{'met' if worst >= 8 else 'NOT met'} (smallest ratio {worst:.1f}x)")


if __name__ == "__main__":
    main()
