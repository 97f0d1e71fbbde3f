"""Continuous batching (trd_jax/continuous.py) against the static sampler on a long-tailed length mix: useful
tokens per second at equal rows in flight.

    python bench/continuous.py [--rows 128] [--slots 32] [--max-new 256] [--rounds 3]

Each row's length is drawn once from a fixed distribution, ceil(max_new x Beta(0.7, 1.3)) (mean/max 0.35),
and enforced as the row's budget with no EOS (the same as an EOS forced at the drawn length), so both decode
exactly the same tokens. The static sampler runs the rows in groups of --slots (max_rows: one cache of that
many rows, as the recipes' rollout.max_rows_per_call), each group until its longest row ends; continuous
batching keeps --slots rows in flight, refilling a slot as soon as its row ends. Useful tokens: the sum of
the drawn lengths. Runs alternate static, continuous, ... so that a noisy machine slows both alike; the
figures are medians over rounds after a warm-up call of each.
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

    stats = {}

    def continuous():
        return generate(graphdef, params, prompts, a.max_new, slots=a.slots, segment=a.segment, sampling=sampling,
                        key=1, budgets=budgets, stats=stats)

    runs = {"static": static, "continuous": continuous}
    outs = {name: fn() for name, fn in runs.items()}  # warm-up: compiles
    same = bool(np.array_equal(outs["static"].tokens, outs["continuous"].tokens))
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
          f"useful tokens {useful}; identical tokens: {same}")
    for name in runs:
        print(f"{name:>10}: {med[name]:.3f} s median of {a.rounds}, {useful / med[name]:,.0f} useful tokens/s")
    print(f"continuous / static useful tokens per second: {med['static'] / med['continuous']:.2f}x "
          f"(continuous ran {stats['slot_steps']} slot-steps in {stats['segments']} segments, "
          f"{stats['admissions']} admissions)")


if __name__ == "__main__":
    main()
