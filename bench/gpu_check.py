"""GPU check: rollout tokens/s (ours against transformers' generate) and update-step MFU on a ~0.5B random
model in bfloat16, against the card's bf16 dense peak. Run by bench/gpu_check.sh on a GPU machine.

    python bench/gpu_check.py [--batches 64 256] [--prompt 128] [--new 512] [--update-batch 8 --seq 2048]
        [--attentions dense blockwise fused]

The model is Qwen2.5-0.5B-shaped (d=896, 24 layers, 14 heads, 2 KV heads, vocab 151936, tied embeddings:
494M parameters) with random weights; transformers builds the same architecture with its own random
weights (speed does not depend on the values). MFU counts model FLOPs as bench/update_step.py does
(6 x non-embedding params x tokens + causal attention + the lm_heads the loss reads), recomputation not
included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from trd_jax.models.config import ModelConfig  # noqa: E402
from trd_jax.models.transformer import Transformer  # noqa: E402
from trd_jax.sampling import Sampler, SamplingConfig  # noqa: E402
from trd_jax.layouts import Layout  # noqa: E402
from trd_jax.losses import LossConfig  # noqa: E402
from trd_jax.steps import OptimConfig, TeacherSignal, UpdateBatch, init_state, make_optimizer, update  # noqa: E402
from update_step import median_seconds, model_flops  # noqa: E402

# bf16 dense tensor-core peaks (FLOP/s) from the vendors' data sheets (sparsity not counted).
PEAKS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12}
SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
             num_kv_heads=2, head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096,
             rope_theta=1000000.0, qkv_bias=True)


def peak_flops() -> tuple[float, str]:
    kind = jax.devices()[0].device_kind
    for name, value in PEAKS.items():
        if name in kind:
            return value, kind
    return float("nan"), kind


def model_config() -> ModelConfig:
    fields = {f: v for f, v in SHAPE.items() if f in ModelConfig.__dataclass_fields__}
    return ModelConfig(**fields, dtype="bfloat16", param_dtype="bfloat16", architecture="Qwen2ForCausalLM")


def rollout_ours(cfg: ModelConfig, batch: int, prompt: int, new: int, repeats: int,
                 segment: int = 1) -> tuple[float, float]:
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    sampler = Sampler(graphdef, eos_ids=(), pad_id=0, decode_segment=segment)
    sampling = SamplingConfig(temperature=1.0)
    prompts = np.random.default_rng(batch).integers(1, cfg.vocab_size, (batch, prompt)).tolist()
    t0 = time.perf_counter()
    sampler(params, prompts, new, sampling=sampling, key=0)
    compile_s = time.perf_counter() - t0

    def run():
        out = sampler(params, prompts, new, sampling=sampling, key=1)
        assert out.tokens.shape == (batch, new)

    return batch * new / median_seconds(run, repeats), compile_s


def rollout_transformers(batch: int, prompt: int, new: int, repeats: int) -> float:
    import torch
    import transformers

    hf_cfg = transformers.Qwen2Config(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                                      intermediate_size=SHAPE["intermediate_size"],
                                      num_hidden_layers=SHAPE["num_layers"], num_attention_heads=SHAPE["num_heads"],
                                      num_key_value_heads=SHAPE["num_kv_heads"], tie_word_embeddings=True,
                                      max_position_embeddings=4096, rope_theta=1000000.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(1, SHAPE["vocab_size"], (batch, prompt), device="cuda")

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=True, temperature=1.0, top_k=None, top_p=None, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape == (batch, prompt + new)

    seconds = median_seconds(run, repeats)
    model = None  # drop the reference so that empty_cache frees the weights
    torch.cuda.empty_cache()
    return batch * new / seconds


def update_mfu(cfg: ModelConfig, batch: int, seq: int, chunk: int, repeats: int) -> dict:
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-5, warmup_steps=10, total_steps=1000))
    state = init_state(params, optimizer)
    ctx = 128  # a 128-token prompt, the rest response
    r = seq - ctx
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq)), jnp.int32)
    seqs = Layout(tokens, jnp.broadcast_to(jnp.arange(seq), (1, batch, seq)), jnp.ones((1, batch, seq), bool), ctx)
    targets = tokens[:, :, ctx:]
    mask = jnp.ones((1, batch, r), bool)
    teacher_hidden = jax.random.normal(jax.random.key(2), (1, batch, r, cfg.hidden_size), jnp.bfloat16)
    teacher_head = nnx.merge(graphdef, params).lm_head_weight()
    step = jax.jit(update, static_argnames=("graphdef", "optimizer", "cfg", "ema_decay"),
                   donate_argnums=(0,))
    loss_cfg = LossConfig("forward_kl", chunk_size=chunk)

    def run():
        nonlocal state
        state, metrics = step(state, UpdateBatch(seqs, targets, mask), TeacherSignal(teacher_hidden, teacher_head),
                              graphdef=graphdef, optimizer=optimizer, cfg=loss_cfg)
        jax.block_until_ready(metrics.loss)

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    seconds = median_seconds(run, repeats)
    flops = model_flops(cfg, batch, seq, r)
    return dict(seconds=seconds, compile_s=compile_s, flops=flops, tokens_per_s=batch * seq / seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--update-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attentions", nargs="+", default=["dense", "blockwise", "fused"],
                    choices=["dense", "blockwise", "fused"],
                    help="attention kernels of the update step, one measurement each")
    ap.add_argument("--segments", type=int, nargs="+", default=[8, 1],
                    help="decode steps between stop checks (Sampler(decode_segment=)), one rollout each; 8 is the "
                         "accelerator default")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, to check the script on a CPU")
    args = ap.parse_args()
    if args.smoke:
        SHAPE.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=32)

    cfg = model_config()
    peak, kind = peak_flops()
    print(f"device: {kind} ({jax.devices()[0].platform}), jax {jax.__version__}; bf16 dense peak "
          f"{peak / 1e12:.0f} TFLOP/s (data sheet)", flush=True)
    print(f"model: {cfg.num_params / 1e6:.0f}M params, Qwen2.5-0.5B shape, random weights, bfloat16", flush=True)
    for batch in args.batches:
        rates = {seg: rollout_ours(cfg, batch, args.prompt, args.new, args.repeats, seg) for seg in args.segments}
        ours, compile_s = rates[args.segments[0]]
        line = (f"rollout batch {batch}, {args.prompt} prompt + {args.new} new tokens, T=1: ours {ours:,.0f} tok/s "
                f"(compile {compile_s:.1f} s; decode segment {args.segments[0]}"
                + "".join(f"; segment {seg}: {rate:,.0f} tok/s" for seg, (rate, _) in list(rates.items())[1:]) + ")")
        if not args.skip_transformers:
            theirs = rollout_transformers(batch, args.prompt, args.new, args.repeats)
            line += f"; transformers generate {theirs:,.0f} tok/s; ratio {ours / theirs:.2f}x"
        print(line, flush=True)
    for attention in args.attentions:
        u = update_mfu(cfg.replace(attention=attention), args.update_batch, args.seq, args.chunk, args.repeats)
        achieved = u["flops"] / u["seconds"]
        print(f"update step (fused forward KL + AdamW, bf16, {attention} attention) batch {args.update_batch} x "
              f"{args.seq}: {u['seconds'] * 1e3:.0f} ms median of {args.repeats} (compile {u['compile_s']:.1f} s), "
              f"{u['tokens_per_s']:,.0f} tok/s, {achieved / 1e12:.1f} TFLOP/s of model FLOPs, "
              f"MFU {achieved / peak:.1%}",
              flush=True)


if __name__ == "__main__":
    main()
