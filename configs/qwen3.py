"""The paper's Qwen3 recipes (TRD_SPEC §5, [code-trd]): OPD with a Qwen3-8B teacher and a Qwen3-1.7B or
Qwen3-4B student, and OPSD with the student as its own (frozen initial) teacher; TRD or any baseline of
the reproduction (trd_jax.recipes.METHODS); meshes for a TPU v5p-8, a TPU v5e-16 or one 8 x H100 node.

    python -m trd_jax.main --config configs/qwen3.py:SETTING,STUDENT,METHOD,HARDWARE --workdir DIR \\
        --config.student.path=/models/Qwen3-1.7B --config.teacher.path=/models/Qwen3-8B \\
        --config.task.train_files=/data/deepscaler/deepscaler.json --config.task.eval_files=/data/aime24.jsonl

    SETTING   opd | opsd                      (default opd)
    STUDENT   1.7b | 4b                       (default 1.7b; only names the recipe: the path is the model)
    METHOD    a name of trd_jax.recipes.METHODS (default trd): trd | trd_vanilla_context | trd_reverse_kl |
              trd_k1_pg | trd_refine_wrong_only | trd_fallback_wrong | reverse_kl_k1_pg | reverse_kl |
              forward_kl | forward_kl_clip0.1 | reverse_kl_top32 | jsd0.5
    HARDWARE  v5p-8 | v5e-16 | h100x8         (default h100x8)

e.g. configs/qwen3.py:opsd,4b,trd,v5p-8. "trd" is [code-trd]'s TRD: forward KL on y_r, scored by the
teacher under the refine prompt; "trd_vanilla_context" scores y_r in the teacher's vanilla context.
Models and data are local folders and files (no hub downloads).
Sources: [code-trd] = the TRD authors' launcher (TRD_SPEC §5); where it differs, [code-ob] or [opsd] is named.
"""

from trd_jax.config import base_config
from trd_jax.recipes import METHODS, apply_overrides

# Devices, and how 128 sequences per step are split: the whole mesh is FSDP (parameters, gradients and
# optimizer state sharded over every device; the 8B teacher in bf16 is 16 GB, more than a v5e chip holds),
# and micro-batches of one sequence per device accumulate to the step's 128 ([code-trd]: per-GPU batch
# 1 x grad_accum 16 x 8 GPUs).
# Memory (python -m trd_jax.memory_plan --config configs/qwen3.py:...): rows per sampler call (rollout, refine,
# eval) and per scoring forward, so that 16k-token rollouts and 40k-token refine contexts fit beside the
# weights; the 4B student's update also recomputes attention (remat "dots"). The planner's figures per
# combination are in the README.
HARDWARE = {
    "h100x8": dict(devices=8, micro_batches=16, sampler_rows=32, score_rows=64),  # 80 GB per GPU
    "v5p-8": dict(devices=4, micro_batches=32, sampler_rows=16, score_rows=32),  # 4 chips (megacore), 95 GB each
    # 16 chips, 16 GB HBM each: full remat; OPSD with the 4B student still does not fit (the planner says by how much)
    "v5e-16": dict(devices=16, micro_batches=8, sampler_rows=16, score_rows=16, remat="full"),
}
STUDENTS = ("1.7b", "4b")


def parse(spec: str) -> tuple[str, str, str, str]:
    parts = [p.strip() for p in spec.split(",")] if spec else []
    values = dict(zip(("setting", "student", "method", "hardware"), parts + [""] * (4 - len(parts))))
    setting = values["setting"] or "opd"
    student = values["student"] or "1.7b"
    method = values["method"] or "trd"
    hardware = values["hardware"] or "h100x8"
    for name, value, valid in (("SETTING", setting, ("opd", "opsd")), ("STUDENT", student, STUDENTS),
                               ("METHOD", method, tuple(METHODS)), ("HARDWARE", hardware, tuple(HARDWARE))):
        if value not in valid:
            raise ValueError(f"configs/qwen3.py:{spec}: {name} {value!r} is not one of {', '.join(valid)}")
    if len(parts) > 4:
        raise ValueError(f"configs/qwen3.py:{spec}: expected SETTING,STUDENT,METHOD,HARDWARE")
    return setting, student, method, hardware


def get_config(spec: str = ""):
    setting, student, method, hardware = parse(spec)
    hw = HARDWARE[hardware]
    cfg = base_config()
    cfg.task.update(
        name="math",  # DeepScaleR-Preview (problem / answer / solution) [code-trd]; DAPO-Math-17k [code-ob]
        # [code-trd] rolls out through the Qwen3 thinking template; Qwen3-4B-Instruct-2507 has no thinking mode.
        prompt_mode="thinking" if student == "1.7b" else "chat",
        max_prompt_tokens=2048,  # longer problems are skipped (counted), as [code-trd] drops them
        grade_timeout_s=5.0, grade_workers=8,
    )
    for side in ("student", "teacher"):
        # bf16 parameters and compute [code-trd]; the paths are the user's local folders. Blockwise (flash)
        # attention: dense scores of a 40k-token refine context alone would be tens of GiB per row and layer.
        cfg[side].update(source="path", dtype="bfloat16", param_dtype="bfloat16", attention="blockwise")
    cfg.distill.update(mode=setting, opsd_teacher="initial")  # OPSD: frozen θ0 [code-trd]
    # Rollouts: T 0.6, top_p 0.95, top_k 20, n = 1, 16384 new tokens [code-trd]
    cfg.rollout.update(n=1, max_new_tokens=16384, temperature=0.6, top_k=20, top_p=0.95,
                       release_kv_cache=True,  # the KV caches of 16k-token rollouts do not fit beside the update
                       max_rows_per_call=hw["sampler_rows"])
    # Refine prompt <= 18432 (OPD) / 22528 (OPSD) tokens, y_r <= 16384 [code-trd]
    cfg.refine.update(prompt_budget=18432 if setting == "opd" else 22528, rewrite_budget=16384,
                      on_prompt_over_budget="drop", on_empty_rewrite="error", on_capped_rewrite="keep")
    cfg.loss.update(temperature=1.0, chunk_size=1024)  # KL softmax τ = 1.0 [code-trd] ([opsd]: 1.1)
    # AdamW (0.9, 0.95), lr 5e-6 (launcher default), wd 0.005, cosine, 10% warmup, min lr ratio 0.1, clip 1.0
    cfg.optim.update(learning_rate=5e-6, b1=0.9, b2=0.95, weight_decay=0.005, warmup_ratio=0.1, min_lr_ratio=0.1,
                     clip_norm=1.0)
    # 128 sequences per step, 1 epoch of DeepScaleR-Preview (40,315 problems) = 315 steps [code-trd]
    cfg.train.update(steps=315, batch_size=128, micro_batches=hw["micro_batches"], max_score_rows=hw["score_rows"],
                     remat=hw.get("remat", "dots" if student == "4b" else "none"))
    # Avg@16 / Pass@16 at T 0.6, top_p 0.95, top_k off, up to 38912 new tokens [code-trd]
    cfg.eval.update(every=50, n=16, k=16, temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=38912)
    cfg.checkpoint.update(every=25, keep=2, async_save=True)
    cfg.mesh.update(data=1, fsdp=hw["devices"], tensor=1)
    # LoRA r 64, α 128 on q/k/v/o/gate/up/down, no dropout [code-trd] (its lr 5e-6 above is for LoRA): the bf16
    # base stays frozen, the adapters train in float32, and OPSD's initial teacher is that base with the adapters
    # off (no second copy). --config.lora.enabled=false fine-tunes every weight instead.
    cfg.lora.update(enabled=True, rank=64, alpha=128.0, targets="q,k,v,o,gate,up,down", dropout=0.0)
    apply_overrides(cfg, METHODS[method].overrides)  # loss, trajectory and teacher context, by the method's name
    return cfg
