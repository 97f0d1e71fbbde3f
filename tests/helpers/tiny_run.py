"""A run configuration small enough for tests: a 2-layer d=32 student, 4 prompts per step, short budgets."""

from trd_jax.config import base_config
from trd_jax.recipes import apply_overrides


def tiny_config(**overrides):
    """base_config() shrunk; overrides are dotted keys, e.g. tiny_config(**{"distill.mode": "opsd"})."""
    cfg = base_config()
    cfg.task.update(train_size=64, eval_size=8, min_steps=3, max_steps=5)  # short problems: fast tests
    for side in (cfg.student, cfg.teacher):
        side.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                          head_dim=16, max_position_embeddings=512)
    cfg.teacher.model.hidden_size = 48
    cfg.train.update(steps=2, batch_size=4)
    cfg.rollout.update(n=1, max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)
    cfg.refine.update(prompt_budget=400, rewrite_budget=12, on_empty_rewrite="drop")
    cfg.eval.update(num_problems=4, n=2, max_new_tokens=12)
    cfg.optim.update(learning_rate=1e-2, warmup_ratio=0.0)
    cfg.loss.chunk_size = 16
    cfg.checkpoint.update(every=1, keep=3)
    cfg.log.progress = False
    return apply_overrides(cfg, overrides)
