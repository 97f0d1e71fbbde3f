"""Memory of OPSD with the frozen initial teacher (TRD_SPEC §7.9): full fine-tuning against LoRA (r 64, alpha 128
on q/k/v/o/gate/up/down) at SmolLM2-135M scale (the planner's smollm2-135m shape: vocab 49152, d 576, 30
layers, 9 / 3 heads, MLP 1536, tied), with random weights.

    python bench/lora_memory.py                    # float32; --param-dtype bfloat16 for a bf16 base

1. Persistent state, allocated the way the controller holds it and measured as the bytes of the distinct live
   device buffers (jax.live_arrays): student parameters, AdamW state, the teacher's weights, the fixed head.
   Full fine-tuning keeps a frozen copy of the initial weights for the teacher (init_state copies the
   parameters); LoRA's teacher is the student's own base with the adapters off.
2. The update step compiled (not run) for each, XLA's memory_analysis on this CPU with the memory-minimising
   scheduler (memory_plan.measure_in_subprocess): its temporaries, and its arguments (LoRA: the frozen base
   is an argument, not part of the donated state).
3. The planner's per-device plan of configs/smollm2.py:opsd,trd on one 80 GB device, LoRA on and off.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import jax
from flax import nnx

from trd_jax import memory_plan as mp
from trd_jax.models import lora
from trd_jax.models.transformer import Transformer
from trd_jax.steps import OptimConfig, init_state, make_optimizer

LORA = lora.LoRAConfig(rank=64, alpha=128.0)
MiB = 2**20


def live_bytes() -> int:
    seen, total = set(), 0
    for x in jax.live_arrays():
        if id(x) not in seen and not x.is_deleted():
            seen.add(id(x))
            total += x.nbytes
    return total


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def persistent(cfg, use_lora: bool) -> dict:
    """Builds the run's persistent state as trd_jax.controller does for OPSD with the initial teacher and
    returns its parts' bytes and the live-buffer total (all freed on return)."""
    before = live_bytes()
    optimizer = make_optimizer(OptimConfig())
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    head_fn = jax.jit(lambda graphdef, p: nnx.merge(graphdef, p).lm_head_weight(), static_argnums=0)
    if use_lora:
        plain_graph, _ = nnx.split(model)
        lora.add_lora(model, LORA, rngs=nnx.Rngs(1))
        _, adapters, base = lora.split_lora(model)
        state = init_state(adapters, optimizer)  # a copy, as the controller places its own
        del adapters  # the controller keeps only the state's copy
        teacher, teacher_graph = base, plain_graph  # the same buffers: nothing allocated
        parts = dict(base=tree_bytes(base), trainable=tree_bytes(state.params), optimizer=tree_bytes(state.opt_state),
                     teacher_copy=0)
    else:
        graph, params = nnx.split(model)
        state = init_state(params, optimizer)  # copies params: the originals are the frozen teacher
        teacher, teacher_graph = params, graph
        parts = dict(base=0, trainable=tree_bytes(state.params), optimizer=tree_bytes(state.opt_state),
                     teacher_copy=tree_bytes(teacher))
    del model
    head = head_fn(teacher_graph, teacher)
    parts["fixed_head"] = head.nbytes
    parts["total"] = sum(parts.values())
    jax.block_until_ready((state, teacher, head))
    gc.collect()
    parts["live_measured"] = live_bytes() - before
    parts["trainable_params"] = sum(x.size for x in jax.tree.leaves(state.params))
    return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rows", type=int, default=2, help="rows per micro-batch of the compiled update")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    cfg = mp.builtin_model("smollm2-135m", dtype="float32", param_dtype=args.param_dtype)
    print(f"SmolLM2-135M shape: vocab {cfg.vocab_size}, d {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads x {cfg.head_dim}, MLP {cfg.intermediate_size}, tied; "
          f"{cfg.num_params:,} params, {args.param_dtype} base; LoRA r {LORA.rank} alpha {LORA.alpha:g} on "
          f"{','.join(LORA.targets)}\n")

    print("1. persistent state of OPSD (initial teacher), MiB")
    rows = {name: persistent(cfg, use_lora) for name, use_lora in (("full FT", False), ("LoRA", True))}
    keys = ("base", "trainable", "optimizer", "teacher_copy", "fixed_head", "total", "live_measured")
    print(f"| {'':<8} | " + " | ".join(f"{k:>13}" for k in keys) + " | trainable params |")
    for name, r in rows.items():
        print(f"| {name:<8} | " + " | ".join(f"{r[k] / MiB:>13.1f}" for k in keys) + f" | {r['trainable_params']:,} |")
    full, small = rows["full FT"]["live_measured"], rows["LoRA"]["live_measured"]
    print(f"LoRA / full FT: {small / full:.3f} ({(full - small) / MiB:.1f} MiB saved)\n")

    if not args.skip_compile:
        print(f"2. update step compiled on this CPU: 2 micro-batches of {args.rows} rows x ({args.context} + "
              f"{args.response}) tokens, fused forward KL, AdamW; MiB")
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        case = dict(model=fields, rows=args.rows, context=args.context, response=args.response, chunk_size=128,
                    teacher_hidden=cfg.hidden_size)
        cases = [dict(case, remat=remat, **({"lora": dataclasses.asdict(LORA)} if use else {}))
                 for remat in ("none", "full") for use in (False, True)]
        start = time.perf_counter()
        results = mp.measure_in_subprocess(cases, timeout=3000)
        print(f"| remat | variant | temp | arguments (state + frozen base + batch) | donated state | "
              f"temp + arguments |   ({time.perf_counter() - start:.0f} s to compile)")
        for c, r in zip(cases, results):
            print(f"| {c['remat']} | {'LoRA' if 'lora' in c else 'full FT'} | {r['temp'] / MiB:.1f} | "
                  f"{r['argument'] / MiB:.1f} | {r['state'] / MiB:.1f} | {(r['temp'] + r['argument']) / MiB:.1f} |")
        print()

    print("3. planner, configs/smollm2.py:opsd,trd on one h100-80gb (per device), MiB")
    from trd_jax.config import resolve
    from trd_jax.memory_plan.cli import load_config

    recipe, _, _, _ = load_config("configs/smollm2.py:opsd,trd")
    settings = resolve(recipe)
    work = mp.workload_from_settings(settings)
    models = {"student": mp.ModelInfo(cfg, "built-in smollm2-135m")}
    for name, opts in (("full FT", mp.PlanOptions()), ("LoRA", mp.PlanOptions(lora=LORA))):
        plan = mp.make_plan(work, models, dict(data=1, fsdp=1, tensor=1), mp.ACCELERATORS["h100-80gb"], opts)
        items = ", ".join(f"{i.name} {i.bytes / MiB:.1f}" for i in plan.persistent)
        print(f"{name}: persistent {plan.persistent_bytes / MiB:.1f} ({items}); update transients "
              f"{plan.update.total / MiB:.1f}; peak {plan.peak_phase.name} {plan.peak_bytes / MiB:.1f}")


if __name__ == "__main__":
    main()
