"""The update on long-tailed response lengths: rows sorted by length into micro-batches of their own widths
(train.length_buckets, trd_jax.bucketed_update) against the scan over equal-width micro-batches (steps.update).

    python bench/length_buckets.py [--rows 16 --micro 4 --max-response 384 --repeats 5]

Response lengths are drawn once from a fixed long-tailed distribution (lognormal, clipped to [8, max], the
longest row at max; mean / max about 0.3-0.35, as reasoning rollouts), prompts uniform in [16, 96]. Both paths
run the same rows through the same student (forward KL against fixed teacher states, AdamW); the two are timed
alternately in one run (medians of --repeats steady-state steps each) and their losses compared. Also printed:
the tokens each computes over (padding included) against the useful ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from trd_jax.bucketed_update import BucketedUpdate  # noqa: E402
from trd_jax.layouts import distill_batch  # noqa: E402
from trd_jax.losses import LossConfig  # noqa: E402
from trd_jax.models.config import ModelConfig  # noqa: E402
from trd_jax.models.transformer import Transformer  # noqa: E402
from trd_jax.sharding import MeshConfig, make_mesh  # noqa: E402
from trd_jax.steps import (OptimConfig, TeacherSignal, UpdateBatch, init_state, jit_update, make_optimizer,  # noqa: E402
                           shardings_of, to_micro_batches)


def lengths(rows: int, max_response: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    response = np.clip(np.round(np.exp(rng.normal(np.log(max_response / 5), 0.8, rows))), 8, max_response)
    response[rng.integers(rows)] = max_response
    prompt = rng.integers(16, 97, rows)
    return prompt.astype(int), response.astype(int)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--max-response", type=int, default=384)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32)
    graph, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    prompt_lens, response_lens = lengths(args.rows, args.max_response)
    rng = np.random.default_rng(1)
    batch = distill_batch([list(rng.integers(1, args.vocab, n)) for n in prompt_lens],
                          [list(rng.integers(1, args.vocab, n)) for n in response_lens])
    width = batch.targets.shape[1]
    hidden = jax.random.normal(jax.random.key(2), (args.rows, width, cfg.hidden_size)) * 0.5
    head = nnx.merge(graph, params).lm_head_weight() * 1.1
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    opt = make_optimizer(OptimConfig(learning_rate=1e-4, total_steps=1000))
    loss = LossConfig("forward_kl", chunk_size=256)
    fresh = lambda: jax.device_put(init_state(jax.tree.map(lambda x: x.copy(), params), opt))  # noqa: E731

    scan_state = fresh()
    scan_step = jit_update(graph, opt, loss, shardings_of(scan_state), mesh)
    placed = to_micro_batches((batch.student, batch.targets, batch.response_mask, hidden), args.micro, mesh)
    bucketed_state = fresh()
    bucketed = BucketedUpdate(graph, opt, loss, shardings_of(bucketed_state), mesh)
    host = UpdateBatch(batch.student, batch.targets, batch.response_mask)

    def run_scan():
        nonlocal scan_state
        scan_state, m = scan_step(scan_state, UpdateBatch(*placed[:3]), TeacherSignal(placed[3], head, None))
        return m.loss

    def run_bucketed():
        nonlocal bucketed_state
        bucketed_state, m = bucketed(bucketed_state, host, TeacherSignal(hidden, head, None), num_micro=args.micro)
        return m.loss

    first = (float(jax.block_until_ready(run_scan())), float(jax.block_until_ready(run_bucketed())))
    times = {"scan": [], "bucketed": []}
    for _ in range(args.repeats):
        for name, fn in (("scan", run_scan), ("bucketed", run_bucketed)):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    plan = bucketed.last_plan
    useful = int(batch.student.mask.sum())
    full = batch.student.tokens.size
    scan_s, bucketed_s = (statistics.median(times[k]) for k in ("scan", "bucketed"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"rows {args.rows} in {args.micro} micro-batches; response lengths mean {response_lens.mean():.0f}, max "
          f"{response_lens.max()} (mean / max {response_lens.mean() / response_lens.max():.2f}); prompts "
          f"{prompt_lens.min()}-{prompt_lens.max()}")
    print(f"micro-batch widths (context, response), longest first: {list(plan.widths)}")
    print(f"first step's loss: scan {first[0]:.6f}, bucketed {first[1]:.6f}")
    print("| update | tokens computed | useful fraction | median s | tokens/s (useful) |")
    print("|---|---:|---:|---:|---:|")
    for name, tokens, sec in (("scan, equal widths", full, scan_s), ("length-bucketed", plan.padded_tokens(),
                                                                      bucketed_s)):
        print(f"| {name} | {tokens:,} | {useful / tokens:.2f} | {sec:.3f} | {useful / sec:,.0f} |")
    print(f"speed-up (scan / bucketed): {scan_s / bucketed_s:.2f}x")


if __name__ == "__main__":
    main()
