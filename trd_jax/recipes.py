"""Recipes that code (the reproduction, tests) builds on; configs/*.py expose them to the command line."""

from __future__ import annotations

import json

import ml_collections

from trd_jax.config import base_config


def default_config() -> ml_collections.ConfigDict:
    """The embedded running-arithmetic task, the paper's TRD in the OPD setting (method `trd`, TRD_SPEC §3a):
    forward KL on the teacher's rewrites y_r, scored by the teacher under the refine prompt that produced
    them. The teacher and student come from the bootstrap shipped in the package (trd_jax/data/
    bootstrap_models; `bootstrap.from_scratch=true` trains them here, about 15 minutes on 2 cores).

    Sampling follows the paper's protocol (TRD_SPEC §5): rollouts and rewrites at temperature 0.6, top-p 0.95,
    top-k 20; evaluation at temperature 0.6, top-p 0.95, n = 16 on the 512 held-out problems. Budgets fit the
    task: solutions are at most 99 tokens, OPSD's refine prompts at most about 450."""
    cfg = base_config()
    cfg.bootstrap.enabled = True
    cfg.distill.teacher_context = "refine"
    cfg.train.steps = 40
    cfg.train.batch_size = 32
    cfg.rollout.update(max_new_tokens=128, temperature=0.6, top_k=20, top_p=0.95)
    cfg.refine.update(prompt_budget=640, rewrite_budget=128)
    cfg.optim.update(learning_rate=5e-4, warmup_ratio=0.1)
    # Full fine-tuning (lora.enabled stays off): the models are small, trained from scratch by the bootstrap.
    cfg.eval.update(n=16, max_new_tokens=128, temperature=0.6, top_k=0, top_p=0.95)
    cfg.checkpoint.every = 10
    return cfg


# The paper's comparison (TRD_SPEC §4): TRD and the token-level baselines, as overrides of a recipe.
METHODS: dict[str, dict[str, object]] = {
    "trd": {"distill.trajectory": "y_r", "distill.teacher_context": "vanilla", "loss.name": "forward_kl"},
    "trd_refine_context": {"distill.trajectory": "y_r", "distill.teacher_context": "refine", "loss.name": "forward_kl"},
    # [code-ob]'s TRD trains y_r with its OPD loss, the sampled-token k1 reverse KL in PG form (TRD_SPEC §3).
    "trd_k1_pg": {"distill.trajectory": "y_r", "distill.teacher_context": "vanilla", "loss.name": "k1_policy_gradient"},
    # Full reverse KL on y_r: mode-seeking, it can pick one mode of a bimodal teacher instead of averaging.
    "trd_reverse_kl": {"distill.trajectory": "y_r", "distill.teacher_context": "vanilla", "loss.name": "reverse_kl"},
    "reverse_kl_k1_pg": {"loss.name": "k1_policy_gradient"},
    "reverse_kl": {"loss.name": "reverse_kl"},
    "forward_kl": {"loss.name": "forward_kl"},
    "forward_kl_clip0.1": {"loss.name": "forward_kl_clipped", "loss.kl_clip": 0.1},
    "reverse_kl_top32": {"loss.name": "reverse_kl_topk", "loss.top_k": 32},
    "jsd0.5": {"loss.name": "jsd", "loss.jsd_beta": 0.5},
}
BASELINE_DEFAULTS = {"distill.trajectory": "y_o", "distill.teacher_context": "vanilla"}


def parse_overrides(items: list[str]) -> dict[str, object]:
    """["key=value", ...] from a command line; values parsed as JSON when they can be (numbers, booleans)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, object]) -> ml_collections.ConfigDict:
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def method_config(method: str, setting: str, seed: int, base: ml_collections.ConfigDict | None = None
                  ) -> ml_collections.ConfigDict:
    """`base` (default: default_config()) with the method's overrides, the setting (opd | opsd) and the seed."""
    cfg = apply_overrides(base if base is not None else default_config(), dict(BASELINE_DEFAULTS))
    apply_overrides(cfg, METHODS[method])
    cfg.distill.mode = setting
    cfg.seed = seed
    return cfg
