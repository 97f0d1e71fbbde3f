"""Default CPU recipe: the embedded running-arithmetic task, TRD (OPD, forward KL on y_r)."""

from trd_jax.config import base_config


def get_config():
    cfg = base_config()
    cfg.train.steps = 20
    cfg.train.batch_size = 8
    cfg.rollout.max_new_tokens = 48
    cfg.refine.prompt_budget = 512
    cfg.refine.rewrite_budget = 48
    cfg.refine.on_empty_rewrite = "drop"
    cfg.eval.max_new_tokens = 48
    cfg.eval.num_problems = 32
    cfg.optim.learning_rate = 1e-3
    cfg.checkpoint.every = 10
    return cfg
