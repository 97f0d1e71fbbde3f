"""Continuous batching (trd_jax/continuous.py) against the static sampler on a long-tailed length mix: useful
tokens per second at equal rows in flight, with contiguous slots and with a paged KV cache (models/paged.py).

    python bench/continuous.py [--rows 128] [--slots 32] [--max-new 256] [--rounds 3] [--page-size 16]
        [--pool-fraction 0.5]

Each row's length is drawn once from a fixed distribution, ceil(max_new x Beta(0.7, 1.3)) (mean/max 0.35),
and enforced as the row's budget with no EOS (the same as an EOS forced at the drawn length), so both decode
exactly the same tokens. The static sampler runs the rows in groups of --slots (max_rows: one cache of that
many rows, as the recipes' rollout.max_rows_per_call), each group until its longest row ends; continuous
batching keeps --slots rows in flight, refilling a slot as soon as its row ends. Useful tokens: the sum of
the drawn lengths. "paged" keeps the same slots over a page pool that holds every slot's longest row (no
preemption); "paged-small" over a pool of --pool-fraction of that (rows preempted when the live rows outgrow it,
decoded again: slower, less memory). Cache bytes: what each variant allocates for the slots' keys and values.
Runs alternate static, continuous, ... so that a noisy machine slows all alike; the figures are medians over
rounds after a warm-up call of each.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trd_jax.continuous import generate  # noqa: E402
from trd_jax.models.config import ModelConfig  # noqa: E402
from trd_jax.models.transformer import Transformer  # noqa: E402
from trd_jax.sampling import Sampler, SamplingConfig  # noqa: E402
from trd_jax.shapes import bucket  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--segment", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--pool-fraction", type=float, default=0.5)
    a = p.parse_args()
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 3, num_layers=a.layers,
                      num_heads=8, num_kv_heads=2, head_dim=a.hidden // 8)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, a.vocab, size=int(n)).tolist() for n in rng.integers(16, 64, size=a.rows)]
    budgets = np.ceil(a.max_new * rng.beta(0.7, 1.3, size=a.rows)).astype(int).clip(1, a.max_new).tolist()
    useful = sum(budgets)
    sampling = SamplingConfig(1.0)
    sampler = Sampler(graphdef)

    def static():
        return sampler(params, prompts, a.max_new, sampling=sampling, key=1, eos_ids=(), budgets=budgets,
                       max_rows=a.slots)

    stats = {name: {} for name in ("continuous", "paged", "paged-small")}
    row_len = bucket(max(map(len, prompts)), 16) + bucket(a.max_new, 8)  # a slot: prompt bucket + budget
    full_pool = a.slots * -(-row_len // a.page_size) * a.page_size
    small_pool = int(full_pool * a.pool_fraction) // a.page_size * a.page_size

    def continuous(name="continuous", **paging):
        return generate(graphdef, params, prompts, a.max_new, slots=a.slots, segment=a.segment, sampling=sampling,
                        key=1, budgets=budgets, stats=stats[name], **paging)

    runs = {"static": static, "continuous": continuous,
            "paged": lambda: continuous("paged", page_size=a.page_size),
            "paged-small": lambda: continuous("paged-small", page_size=a.page_size, pool_tokens=small_pool)}
    token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # k and v, f32
    cache_bytes = {"static": a.slots * row_len * token_bytes, "continuous": a.slots * row_len * token_bytes,
                   "paged": (full_pool + a.page_size) * token_bytes,
                   "paged-small": (small_pool + a.page_size) * token_bytes}
    outs = {name: fn() for name, fn in runs.items()}  # warm-up: compiles
    ref = outs["static"]
    same_rows = {name: int(sum(np.array_equal(ref.tokens[r, :ref.lengths[r]], out.tokens[r, :out.lengths[r]])
                               for r in range(a.rows))) for name, out in outs.items()}
    seconds = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn().tokens)
            seconds[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; model d={a.hidden} layers={a.layers} "
          f"vocab={a.vocab}; {a.rows} rows, {a.slots} in flight, max_new {a.max_new}, segment {a.segment}")
    print(f"lengths: mean {np.mean(budgets):.1f}, max {max(budgets)}, mean/max {np.mean(budgets) / max(budgets):.2f}; "
          f"useful tokens {useful}; rows identical to the static sampler's: "
          + ", ".join(f"{name} {same_rows[name]}/{a.rows}" for name in runs))
    for name in runs:
        extra = ""
        if name.startswith("paged"):
            st = stats[name]
            extra = f"; pool {st['pages']} pages, at most {st['peak_pages']} in use, {st['preemptions']} preemptions"
        print(f"{name:>11}: {med[name]:.3f} s median of {a.rounds}, {useful / med[name]:,.0f} useful tokens/s "
              f"({med['static'] / med[name]:.2f}x static), cache {cache_bytes[name] / 2**20:.1f} MiB{extra}")
    st = stats["continuous"]
    print(f"continuous ran {st['slot_steps']} slot-steps in {st['segments']} segments, {st['admissions']} admissions")


if __name__ == "__main__":
    main()
