"""Our update step against the equivalent PyTorch step on this CPU, side by side.

    python bench/update_vs_torch.py [--batch 8 --seq 512 --repeats 5]

Both: the ~22M-parameter Llama-style student of bench/update_step.py (same config), float32, batch x seq
tokens with a 64-token prompt, forward KL on the response tokens against a fixed teacher distribution
(softmax of given teacher hidden states times the student's tied head at step 0), token mean, AdamW with
global-norm clipping. Ours: trd_jax.steps.update (fused chunked loss, one jitted donated step). Theirs:
the transformers LlamaForCausalLM with the same shapes, full logits, torch.nn.functional.kl_div, one
optimizer step. The PyTorch side runs in a child process with the same thread count as XLA's CPU
client, so neither sees the other's threads. MFU uses bench/update_step.py's model FLOPs and the f32
matmul throughput measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CTX = 64


def theirs(args) -> dict:
    import torch
    import transformers

    from update_step import CFG

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = transformers.LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size,
                                   intermediate_size=CFG.intermediate_size, num_hidden_layers=CFG.num_layers,
                                   num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
                                   head_dim=CFG.head_dim, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.005)
    b, t = args.batch, args.seq
    ids = torch.randint(0, CFG.vocab_size, (b, t))
    r = t - CTX
    teacher_hidden = torch.randn(b, r, CFG.hidden_size)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher_hidden @ model.get_input_embeddings().weight.T, dim=-1)

    def step():
        logits = model(input_ids=ids).logits[:, CTX - 1:t - 1]  # position CTX-1+i predicts response token i
        logp = torch.log_softmax(logits.float(), dim=-1)
        kl = torch.nn.functional.kl_div(logp, teacher_logp, log_target=True, reduction="none").sum(-1)
        loss = kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(theirs(args)), flush=True)
        return

    import jax

    from update_step import CFG, matmul_peak, model_flops

    ours = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "update_step.py"),
                           "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)],
                          capture_output=True, text=True, check=True).stdout
    def step_ms(prefix):  # "one pass (gradient in the forward): 5703 ms median of 5 ..."
        line = next(line for line in ours.splitlines() if line.startswith(prefix))
        return float(line.split("):")[1].split()[0])
    ours_ms, two_pass_ms = step_ms("one pass"), step_ms("two passes")
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch),
                            "--seq", str(args.seq), "--repeats", str(args.repeats)],
                           capture_output=True, text=True, check=True).stdout
    their = json.loads(next(line for line in child.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    peak, shape = matmul_peak(args.repeats)
    flops = model_flops(CFG, args.batch, args.seq, args.seq - CTX)
    their_ms = their["seconds"] * 1e3
    print(f"jax {jax.__version__} CPU vs torch {their['torch']} ({their['threads']} threads); "
          f"{CFG.num_params / 1e6:.1f}M "
          f"params, batch {args.batch} x {args.seq}, float32, forward KL + AdamW; median of {args.repeats}")
    print("| step | ms | tokens/s | MFU vs measured f32 matmul |")
    print("|---|---:|---:|---:|")
    for name, ms in (("trd_jax (fused loss, gradient in the forward, jit)", ours_ms),
                     ("trd_jax (fused loss, two passes: the backward recomputes logits)", two_pass_ms),
                     ("PyTorch + transformers (full logits)", their_ms)):
        print(f"| {name} | {ms:.0f} | {args.batch * args.seq / (ms / 1e3):,.0f} | {flops / (ms / 1e3) / peak:.1%} |")
    print(f"ratio (PyTorch / ours): {their_ms / ours_ms:.2f}x; f32 matmul {peak / 1e9:.1f} GFLOP/s ({shape})")


if __name__ == "__main__":
    main()
