"""The planner's inputs besides the model shapes, read from a run config (config.Settings): the workload (the
run's shape) and the options (the config settings that decide memory besides the model shapes)."""

from __future__ import annotations

import dataclasses

from trd_jax.models.config import REMAT, ModelConfig
from trd_jax.models.lora import LoRAConfig
from trd_jax.shapes import bucket
from trd_jax.losses import LossConfig

KV_CACHE = ("replicated", "sharded")


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """Everything but the workload and the model shapes (whose ModelConfig.attention picks the kernel) that
    decides memory; options_from_settings reads them from a run config."""

    # Rematerialisation of each decoder layer in the update's backward pass: the config's train.remat
    # (ModelConfig.remat, transformer.py). "none": every activation kept. "full": nnx.remat per layer, only the
    # layer input is saved. "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, which saves the
    # projection matmuls' outputs and recomputes attention (plain dots_saveable would also keep the
    # [heads, T, S] score matrices, the very thing remat should drop).
    remat: str = "none"
    # Sampler KV caches: "sharded" splits rows over (data, fsdp) and kv heads over tensor (Sampler, where they
    # divide the rows of a call); "replicated": every device holds every row (Sampler(shard_cache=False)).
    kv_cache: str = "sharded"
    sampler_rows: int = 0  # rollout.max_rows_per_call: rows per sampler call; 0: all of a call's rows at once
    # rollout.continuous_slots: the student's samplers (rollout, eval) hold this many rows in flight (continuous.py),
    # sharded like the static sampler's rows where the batch shards divide them; 0: the static sampler
    continuous_slots: int = 0
    # rollout.kv_page_size / kv_pool_tokens: those slots' cache as pages (models/paged.py): a pool of kv_pool_tokens
    # tokens (0: every slot's longest row), kv heads over tensor, the pool split over the batch shards where they
    # divide the slots (else whole on each)
    kv_page_size: int = 0
    kv_pool_tokens: int = 0
    score_rows: int = 0  # train.max_score_rows: rows per scoring forward; 0: all of a step's rows at once
    # The config's lora section (models/lora.py), None: full fine-tuning. Under LoRA the student's base is frozen
    # and shared with OPSD's initial teacher (no copy); gradients, AdamW moments and the EMA exist for the
    # adapters only.
    lora: LoRAConfig | None = None
    headroom: float = 0.10  # fraction of the accelerator kept free for the runtime, fragmentation, code

    def __post_init__(self):
        for name, valid in (("remat", REMAT), ("kv_cache", KV_CACHE)):
            if getattr(self, name) not in valid:
                raise ValueError(f"PlanOptions.{name}={getattr(self, name)!r}: expected one of {valid}")
        if min(self.sampler_rows, self.score_rows, self.continuous_slots, self.kv_page_size, self.kv_pool_tokens) < 0:
            raise ValueError("PlanOptions.sampler_rows, score_rows, continuous_slots, kv_page_size and kv_pool_tokens "
                             "must be >= 0")


def options_from_settings(s, **overrides) -> PlanOptions:
    """The PlanOptions a run config (config.Settings) sets; `overrides`: PlanOptions fields."""
    fields = dict(remat=s.train.remat, sampler_rows=s.rollout.max_rows_per_call, score_rows=s.train.max_score_rows,
                  lora=s.lora, continuous_slots=s.rollout.continuous.slots, kv_page_size=s.rollout.continuous.page_size,
                  kv_pool_tokens=s.rollout.continuous.pool_tokens)
    return PlanOptions(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    config: ModelConfig
    source: str  # where the shape came from: a path, a built-in name, the config's random shape


@dataclasses.dataclass(frozen=True)
class Workload:
    """The run's shape: everything of the config that decides memory."""

    mode: str  # opd | opsd
    trajectory: str  # y_r | y_o
    teacher_context: str
    opsd_teacher: str  # initial | live | ema
    rows: int  # rows per step: batch_size * n
    batch_size: int
    n: int
    micro_batches: int
    prompt: int  # bucketed prompt width (sampler and student layout)
    max_new: int  # bucketed rollout budget
    refine_prompt: int  # bucketed refine-prompt budget
    rewrite: int  # bucketed rewrite budget
    response: int  # bucketed response width of the distill layouts
    teacher_ctx: int  # bucketed teacher context width
    eval_rows: int  # rows of one eval sampler call
    eval_n: int  # samples per eval prompt (the prefill repeats each prompt's cache n times)
    eval_prompt: int
    eval_new: int
    eval_teacher: bool  # the teacher is evaluated once before training, on the refine sampler
    teacher_eval_ctx: int  # bucketed vanilla context of the teacher's evaluation
    release_kv_cache: bool
    diagnostics: bool
    reuse_states: bool  # refine-context scoring takes y_r's states from the refine pass (score_reuse)
    # > 0: the run trains from stored top-k targets (offline.dir, trd_jax/offline): no teacher, no sampling
    offline_k: int
    loss: LossConfig
    notes: tuple[str, ...] = ()
    # Speculative decoding writes K draft positions past a row's budget into its cache (speculative.py): refine's
    # (refine.speculative, refine.draft_tokens) and the rollouts' prompt lookup (rollout.prompt_lookup_tokens).
    refine_draft: int = 0
    rollout_draft: int = 0


def workload_from_settings(s) -> Workload:
    """From config.Settings (the validated config). Widths are the worst case the budgets allow, bucketed the
    way the sampler and layouts.distill_batch bucket them."""
    notes = []
    prompt = bucket(s.task.max_prompt_tokens, 16)
    max_new = bucket(s.rollout.max_new, 8)
    refine_prompt = bucket(s.refine.prompt_budget, 16)
    rewrite = bucket(s.refine.rewrite_budget, 8)
    fallback = "fallback" in (s.refine.on_prompt_over_budget, s.refine.on_empty_rewrite, s.refine.on_capped_rewrite)
    if s.distill.trajectory == "y_r":
        response = bucket(max(s.refine.rewrite_budget, s.rollout.max_new if fallback else 0), 8)
    else:
        response = max_new
    if s.distill.teacher_context == "refine" and s.distill.trajectory == "y_r":
        teacher_ctx = refine_prompt
    elif s.distill.mode == "opd":
        teacher_ctx = prompt
    else:
        teacher_ctx = refine_prompt
        notes.append("OPSD's vanilla teacher context x + y* has no budget of its own: bounded by "
                     "refine.prompt_budget")
    rows = s.train.batch_size * s.rollout.n
    eval_rows = bucket(s.train.batch_size) * s.eval.n  # evaluate() samples batch_size prompts per call
    return Workload(mode=s.distill.mode, trajectory=s.distill.trajectory, teacher_context=s.distill.teacher_context,
                    opsd_teacher=s.distill.opsd_teacher, rows=rows, batch_size=s.train.batch_size, n=s.rollout.n,
                    micro_batches=s.train.micro_batches, prompt=prompt, max_new=max_new, refine_prompt=refine_prompt,
                    rewrite=rewrite, response=response, teacher_ctx=teacher_ctx, eval_rows=eval_rows,
                    eval_n=s.eval.n,
                    eval_prompt=prompt, eval_new=bucket(s.eval.max_new, 8),
                    eval_teacher=s.eval.teacher,
                    teacher_eval_ctx=prompt if s.distill.mode == "opd" else refine_prompt,
                    release_kv_cache=s.rollout.release_kv_cache, diagnostics=s.log.diagnostics,
                    reuse_states=(s.distill.trajectory == "y_r" and s.distill.teacher_context == "refine"
                                  and s.refine.reuse_states),
                    offline_k=s.offline.top_k if s.targets_dir and not s.offline.loads_teacher else 0,
                    loss=s.loss, notes=tuple(notes),
                    refine_draft=s.refine.draft_tokens if s.refine.speculative else 0,
                    rollout_draft=s.rollout.prompt_lookup_tokens)
