"""Update-step model FLOP utilisation (MFU) on this machine.

    python bench/update_step.py [--batch 8 --seq 512 --repeats 5]

One jitted, donated update step (trd_jax.steps.update: student forward and backward through the fused
forward-KL loss against given teacher hidden states, AdamW) on a ~20M-parameter Llama-style student.
MFU = model FLOPs per step / step time / the float32 matmul throughput measured in the same run (the
best of a few large matmuls shaped like the model's), so the figure says how much of what this CPU
can do in float32 the step achieves.

Model FLOPs, the MaxText convention: 6 x non-embedding parameters x tokens for the student's forward
and backward, plus causal attention 6 x layers x T x heads x head_dim per token (half of the full
square), plus the lm_heads on the response tokens the loss reads (6 x d x V for the student, 2 x d x V
for the teacher's logits inside the loss). Recomputation
(the two-pass loss recomputes logits in its backward pass) is not counted: that is hardware, not model,
utilisation.

The step is timed twice, alternating, in one run: with the loss's gradient computed in the forward pass
(trd_jax.onepass_loss, what the update uses) and with the two-pass path it replaced (the per-token losses
under a custom VJP whose backward recomputes both models' logits), and the ratio is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trd_jax import onepass_loss
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.layouts import Layout
from trd_jax.losses import LossConfig
from trd_jax.steps import OptimConfig, TeacherSignal, UpdateBatch, init_state, make_optimizer, update

CFG = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
                  num_kv_heads=4, head_dim=64, tie_word_embeddings=True)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(repeats: int) -> tuple[float, str]:
    """Best float32 matmul FLOP/s over shapes like the step's (tokens x d x mlp, tokens x d x vocab)."""
    best, label = 0.0, ""
    for m, k, n in [(4096, 512, 1408), (4096, 1408, 512), (4096, 512, 8192), (2048, 2048, 2048)]:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        rate = 2 * m * k * n / median_seconds(lambda: f(a, b), repeats)
        if rate > best:
            best, label = rate, f"{m}x{k}x{n}"
    return best, label


def model_flops(cfg: ModelConfig, batch: int, seq: int, response: int) -> float:
    """Student body on every token; student and teacher lm_heads on the response tokens only (the loss
    reads no logits elsewhere)."""
    d, L = cfg.hidden_size, cfg.num_layers
    attn_params = d * cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * cfg.head_dim * d
    body = L * (attn_params + 3 * d * cfg.intermediate_size)
    tokens, scored = batch * seq, batch * response
    # q.k and p.v: 4 T H hd per token forward, halved by causality, x3 with the backward pass
    attention = 6 * L * seq * cfg.num_heads * cfg.head_dim * tokens
    heads = 6 * d * cfg.vocab_size * scored + 2 * d * cfg.vocab_size * scored  # student fwd+bwd, teacher fwd
    return 6 * body * tokens + attention + heads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024, help="positions per fused-loss chunk")
    ap.add_argument("--vocab", type=int, default=CFG.vocab_size)
    args = ap.parse_args()

    cfg = dataclasses.replace(CFG, vocab_size=args.vocab)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000))
    b, t, ctx = args.batch, args.seq, 64  # a 64-token prompt, the rest response
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, b, t)), jnp.int32)
    seq = Layout(tokens, jnp.broadcast_to(jnp.arange(t), (1, b, t)), jnp.ones((1, b, t), bool), ctx)
    r = t - ctx
    targets = tokens[:, :, ctx:]
    targets = jnp.pad(targets, ((0, 0), (0, 0), (0, r - targets.shape[-1])))
    mask = jnp.ones((1, b, r), bool)
    teacher_hidden = jax.random.normal(jax.random.key(2), (1, b, r, cfg.hidden_size), jnp.float32)
    teacher_head = nnx.merge(graphdef, params).lm_head_weight()
    loss_cfg = LossConfig("forward_kl", chunk_size=args.chunk)
    batch, teacher = UpdateBatch(seq, targets, mask), TeacherSignal(teacher_hidden, teacher_head)

    def compiled(one_pass: bool):
        """The jitted step, traced with or without the one-pass loss (the switch is read at trace time)."""
        saved = onepass_loss.one_pass_applies
        onepass_loss.one_pass_applies = saved if one_pass else (lambda cfg: False)
        try:
            step = jax.jit(lambda state, batch, teacher: update(state, batch, teacher, graphdef=graphdef,
                                                                optimizer=optimizer, cfg=loss_cfg), donate_argnums=(0,))
            state = init_state(jax.tree.map(jnp.copy, params), optimizer)  # its own buffers: the step donates them
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(step(state, batch, teacher))
            return (lambda s: step(s, batch, teacher)), state, time.perf_counter() - t0
        finally:
            onepass_loss.one_pass_applies = saved

    variants = {"one pass (gradient in the forward)": compiled(True),
                "two passes (backward recompute)": compiled(False)}
    states = {name: v[1] for name, v in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternating, so both see the same machine
        for name, (fn, _, _) in variants.items():
            t0 = time.perf_counter()
            states[name], metrics = fn(states[name])
            jax.block_until_ready(metrics.loss)
            times[name].append(time.perf_counter() - t0)
    peak, peak_shape = matmul_peak(args.repeats)
    flops = model_flops(cfg, b, t, r)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform})")
    print(f"student: {cfg.num_params / 1e6:.1f}M params ({cfg.num_layers} layers, d={cfg.hidden_size}, "
          f"vocab={cfg.vocab_size}), batch {b} x {t} tokens ({r} response), float32, fused forward KL, AdamW")
    print(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP; f32 matmul throughput measured now: "
          f"{peak / 1e9:.1f} GFLOP/s (best shape {peak_shape})")
    medians = {}
    for name, (_, _, compile_s) in variants.items():
        step_s = medians[name] = statistics.median(times[name])
        print(f"{name}: {step_s * 1e3:.0f} ms median of {args.repeats} (compile {compile_s:.1f} s), "
              f"{b * t / step_s:.0f} tokens/s, {flops / step_s / 1e9:.1f} GFLOP/s, MFU {flops / step_s / peak:.1%}")
    one, two = medians.values()
    print(f"two passes / one pass: {two / one:.3f}x step time")


if __name__ == "__main__":
    main()
