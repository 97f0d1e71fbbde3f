"""The plan: per-device bytes of everything a step holds, phase by phase (the order and the contents are in the
package docstring), and whether the peak fits the accelerator."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from trd_jax.memory_plan.formulas import (_F32, UpdateBreakdown, _b, decode_transient, forward_transient,
                                          kv_cache_bytes, loss_buffers, update_activations)
from trd_jax.memory_plan.hardware import Accelerator
from trd_jax.memory_plan.shards import StateBytes, sharded_bytes, state_bytes
from trd_jax.memory_plan.workload import ModelInfo, PlanOptions, Workload
from trd_jax.models.config import ModelConfig
from trd_jax.losses import LossConfig
from trd_jax.continuous import call_slots
from trd_jax.sampling import CONTINUOUS_CALL_ROWS_PER_SLOT


@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    items: tuple[Item, ...]

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclasses.dataclass(frozen=True)
class Plan:
    workload: Workload
    models: dict[str, ModelInfo]
    mesh: dict[str, int]
    accelerator: Accelerator
    options: PlanOptions
    student_state: StateBytes
    teacher_state: StateBytes | None
    persistent: tuple[Item, ...]
    phases: tuple[Phase, ...]
    update: UpdateBreakdown
    micro_rows_per_device: int
    warnings: tuple[str, ...]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def persistent_bytes(self) -> int:
        return sum(i.bytes for i in self.persistent)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_bytes(self) -> int:
        return self.persistent_bytes + self.peak_phase.bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.accelerator.hbm_bytes * (1.0 - self.options.headroom))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes and not self.errors

    @property
    def errors(self) -> tuple[str, ...]:
        return tuple(w for w in self.warnings if w.startswith("error:"))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class _Step:
    """What every phase of make_plan reads: the workload, the mesh, the options, both models and their states."""

    work: Workload
    mesh: dict[str, int]
    options: PlanOptions
    student: ModelConfig
    teacher: ModelConfig  # the student itself under OPSD
    s_state: StateBytes
    t_state: StateBytes | None  # None under OPSD

    @property
    def batch_shards(self) -> int:
        return self.mesh["data"] * self.mesh["fsdp"]

    @property
    def param_shards(self) -> int:
        return self.mesh["fsdp"] * self.mesh["tensor"]

    @property
    def rows_dev(self) -> int:
        return _ceil_div(self.work.rows, self.batch_shards)

    @property
    def score_rows(self) -> int:
        """Rows per device of one scoring forward (train.max_score_rows)."""
        total = min(self.work.rows, self.options.score_rows) if self.options.score_rows else self.work.rows
        return _ceil_div(total, self.batch_shards)

    @property
    def scored(self) -> int:
        """The ScoreOutput of all rows: hidden [rows, R, d_teacher] and f32 log-probs."""
        return self.rows_dev * self.work.response * (self.teacher.hidden_size * _b(self.teacher) + _F32)

    @property
    def kept_states(self) -> int:
        """refine.reuse_states: the refine pass's final-layer states of every row, [rows, rewrite, d_teacher]."""
        if not self.work.reuse_states:
            return 0
        return self.rows_dev * self.work.rewrite * self.teacher.hidden_size * _b(self.teacher)

    @property
    def t_head_full(self) -> int:
        t = self.teacher
        return t.hidden_size * t.vocab_size * _b(t) if self.param_shards > 1 else 0

    @property
    def t_gather(self) -> int:
        """Two layers of the scoring model's weights, all-gathered."""
        layer = (self.t_state or self.s_state).layer_params_total
        return 2 * layer // max(1, self.mesh["tensor"]) if self.param_shards > 1 else 0

    # ---- sampler caches

    @property
    def kv_rows_div(self) -> int:
        return self.batch_shards if self.options.kv_cache == "sharded" else 1

    @property
    def kv_heads_div(self) -> int:
        return self.mesh["tensor"] if self.options.kv_cache == "sharded" else 1

    @property
    def cache_note(self) -> str:
        return ("replicated: every device holds every row" if self.options.kv_cache == "replicated"
                else f"rows over {self.batch_shards} (data, fsdp) shards")

    def call_rows(self, rows: int, continuous: bool = False) -> int:
        """Rows one sampler call holds: continuous (the student's rollout and eval with continuous_slots): the
        slots; else max_rows_per_call (or all), padded to the batch shards."""
        options = self.options
        if continuous and options.continuous_slots:
            return call_slots(options.continuous_slots, rows)
        per_call = min(rows, options.sampler_rows) if options.sampler_rows else rows
        if options.kv_cache == "sharded" and per_call % self.batch_shards:
            per_call = _ceil_div(per_call, self.batch_shards) * self.batch_shards  # padded to the batch shards
        return per_call

    @property
    def continuous(self) -> bool:
        """Whether the student's samplers (rollout, eval) run continuous batching (continuous_slots)."""
        return bool(self.options.continuous_slots)

    def slots_sharded(self, rows: int) -> bool:
        """Continuous batching shards its slots like the static sampler's rows, and a paged pool's parts with them,
        where the batch shards divide them (continuous.generate); otherwise every device holds every slot."""
        return self.options.kv_cache == "sharded" and self.call_rows(rows, True) % self.batch_shards == 0

    def slots_note(self, rows: int, prompt: int, new: int, own_pool: bool = False) -> str:
        slots = self.call_rows(rows, True)
        if self.options.kv_page_size:
            pool = self.pool_tokens(rows, prompt + new, own_pool)
            where = (f"split over {self.batch_shards} (data, fsdp) shards" if self.slots_sharded(rows) and
                     self.batch_shards > 1 else "whole on every batch shard")
            return (f"{slots} continuous slots over a paged pool of {pool} tokens per device "
                    f"(pages of {self.options.kv_page_size}), {where}")
        where = self.cache_note if self.slots_sharded(rows) else "on every device (the shards do not divide them)"
        return f"{slots} continuous slots, {where} x ({prompt} + {new})"

    def pool_tokens(self, rows: int, length: int, own_pool: bool = False) -> int:
        """A paged cache's tokens per device (continuous.generate): kv_pool_tokens, or every slot's longest row in
        whole pages (slots holding a row: a call's bucketed slots beyond its rows get no pages), split evenly over
        the batch shards where they divide the slots; plus the scratch page (one per part). own_pool: the latter
        whatever kv_pool_tokens says (the refine sampler sizes its own pool)."""
        page = self.options.kv_page_size
        configured = 0 if own_pool else self.options.kv_pool_tokens
        pool = configured or min(rows, self.call_rows(rows, True)) * _ceil_div(length, page) * page
        parts = self.batch_shards if self.slots_sharded(rows) else 1
        return _ceil_div(pool // page, parts) * page + page

    def cache(self, cfg: ModelConfig, rows: int, length: int, continuous: bool = False, own_pool: bool = False) -> int:
        """continuous: a sampler under continuous batching (slots x (prompt + budget), or its paged pool; own_pool:
        sized for its own rows, as the refine sampler's)."""
        if continuous and self.continuous and self.options.kv_page_size:
            return kv_cache_bytes(cfg, 1, self.pool_tokens(rows, length, own_pool), kv_shards=self.kv_heads_div)
        if continuous and self.continuous:
            sharded = self.slots_sharded(rows)
            return kv_cache_bytes(cfg, self.call_rows(rows, True) // (self.kv_rows_div if sharded else 1), length,
                                  kv_shards=self.kv_heads_div if sharded else 1)
        return kv_cache_bytes(cfg, _ceil_div(self.call_rows(rows), self.kv_rows_div), length,
                              kv_shards=self.kv_heads_div)

    def sampler_transient(self, cfg: ModelConfig, rows: int, prompt: int, n: int, new: int,
                          continuous: bool = False) -> list[Item]:
        """prefill: one forward over the prompts (and, unless it writes the full cache directly, a prompt-sized
        cache of its own); decode: vocab buffers; the outputs (tokens i32 and log-probs f32 per row and new token).
        Continuous batching: an admission prefills at most a slot's worth of prompts into a prompt-sized cache, and
        the outputs of a whole call (up to CONTINUOUS_CALL_ROWS_PER_SLOT x slots rows, plus a scratch row) sit on
        every device, not only the slots'."""
        continuous = continuous and self.continuous
        per_device_rows = (self.call_rows(rows, True) // (self.kv_rows_div if self.slots_sharded(rows) else 1)
                           if continuous else _ceil_div(self.call_rows(rows), self.kv_rows_div))
        prompt_rows = max(1, per_device_rows // n)
        head = sharded_bytes((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), self.mesh, _b(cfg))
        direct = n == 1 and cfg.blockwise_prefill and not continuous  # prefill writes into the full cache
        prompt_cache = 0 if direct else kv_cache_bytes(cfg, prompt_rows, prompt, kv_shards=self.kv_heads_div)
        prefill = prompt_cache + forward_transient(cfg, prompt_rows, prompt)
        label = "prefill (one forward)" if direct else "prefill (prompt cache + one forward)"
        if continuous:
            out_rows = min(rows, CONTINUOUS_CALL_ROWS_PER_SLOT * self.options.continuous_slots) + 1
            out_note = f"{out_rows} rows (a call's, replicated) x {new}"
        else:
            out_rows, out_note = per_device_rows, f"{per_device_rows} rows x {new}"
        return [Item(label, prefill, f"{prompt_rows} prompts x {prompt} tokens"),
                Item("decode temporaries", decode_transient(cfg, per_device_rows, head)),
                Item("sampled tokens and log-probs", out_rows * new * (4 + _F32), out_note)]


def _persistent(step: _Step) -> list[Item]:
    """What every phase holds: the student's parameters and optimizer state, EMA, the teacher or OPSD's initial
    copy, and the fixed teacher head."""
    work, options, student, teacher, s_state, t_state = (step.work, step.options, step.student, step.teacher,
                                                         step.s_state, step.t_state)
    moments = f"AdamW mu + nu in {'/'.join(d for d in s_state.optimizer_dtypes if d != 'int32')}"
    if options.lora is None:
        persistent = [Item("student parameters", s_state.params, f"{s_state.num_params:,} x {student.param_dtype}"),
                      Item("optimizer state", s_state.optimizer, f"{moments} (make_optimizer: the parameters' dtype)")]
    else:
        r = options.lora
        persistent = [Item("student base parameters (frozen)", s_state.params - s_state.trainable,
                           f"{s_state.num_params:,} x {student.param_dtype}"),
                      Item("LoRA adapters", s_state.trainable, f"{s_state.trainable_params:,} x float32, r={r.rank} "
                                                               f"on {','.join(r.targets)}"),
                      Item("optimizer state", s_state.optimizer, f"{moments}, adapters only")]
    if work.mode == "opsd" and work.opsd_teacher == "ema":
        if options.lora is None:
            ema = s_state.params * _F32 // jnp.dtype(student.param_dtype).itemsize
        else:
            ema = s_state.trainable
        persistent.append(Item("EMA of the parameters", ema, "float32 (init_state), sharded like the parameters"
                               + (" (adapters only)" if options.lora else "")))
    if work.offline_k:  # stored targets: no teacher of any kind
        return persistent
    if work.mode == "opd":
        persistent.append(Item("teacher parameters", t_state.params,
                               f"{t_state.num_params:,} x {teacher.param_dtype}"))
    elif work.opsd_teacher == "initial":
        # Under LoRA the teacher is the student's frozen base with the adapters off: the same buffers.
        copy = 0 if options.lora else s_state.params
        persistent.append(Item("OPSD frozen initial copy", copy, "none: the student's frozen base, adapters off"
                               if options.lora else "init_state copies the parameters; 0 with LoRA (lora.enabled)"))
    if work.mode == "opd" or work.opsd_teacher == "initial":
        # roles.frozen_head = the jitted lm_head_weight(): the transposed embedding when tied, and a copy of
        # lm_head otherwise (jit returns a new buffer even when the output is its input), sharded like it.
        tied = teacher.tie_word_embeddings
        head = sharded_bytes((teacher.hidden_size, teacher.vocab_size), ("embed", "vocab"), step.mesh, _b(teacher))
        persistent.append(Item("teacher lm_head (fixed_head)", head,
                               "transposed tied embedding" if tied else "a copy of lm_head"))
    return persistent


def _sampler_phases(step: _Step, rollout_cache: int, refine_cache: int) -> list[Phase]:
    """rollout, and refine for y_r: each sampler's cache and transients, and the other's cache if still held."""
    work = step.work
    # Which caches are still held in each phase (controller.train_step / evaluate). Evaluations free their
    # caches when they end; rollout.release_kv_cache frees the rollout cache after rollout and the refine cache
    # after refine, and without it both stay allocated between steps.
    keep_between_steps = not work.release_kv_cache
    rows_note = f"{step.call_rows(work.rows)} rows per call"
    phases = []
    rollout_note = (step.slots_note(work.rows, work.prompt, work.max_new) if step.continuous
                    else f"{rows_note} x ({work.prompt} + {work.max_new}), {step.cache_note}")
    rollout = [Item("rollout KV cache (student)", rollout_cache, rollout_note)]
    rollout += step.sampler_transient(step.student, work.rows, work.prompt, work.n, work.max_new, continuous=True)
    if keep_between_steps and refine_cache and not step.continuous:
        rollout.append(Item("refine KV cache (held from the last step)", refine_cache))
    phases.append(Phase("rollout", tuple(rollout)))

    if work.trajectory == "y_r":  # refine runs continuous batching when the rollouts do (its own pool when paged)
        refine_note = (step.slots_note(work.rows, work.refine_prompt, work.rewrite, own_pool=True) if step.continuous
                       else f"{rows_note} x ({work.refine_prompt} + {work.rewrite}), {step.cache_note}")
        refine = [Item("refine KV cache (teacher)", refine_cache, refine_note)]
        refine += step.sampler_transient(step.teacher, work.rows, work.refine_prompt, 1, work.rewrite, continuous=True)
        if keep_between_steps and not step.continuous:  # continuous batching frees its slots when a call ends
            refine.append(Item("rollout KV cache (held: release_kv_cache=False)", rollout_cache))
        if step.kept_states:  # one call's buffer in the decode loop, then all calls' rows side by side
            refine.append(Item("kept teacher states (refine.reuse_states)", 2 * step.kept_states,
                               f"[rows, {work.rewrite}, {step.teacher.hidden_size}] {step.teacher.dtype}, "
                               "the loop's buffer and the rows gathered"))
        phases.append(Phase("refine", tuple(refine)))
    return phases


def _held_after(step: _Step, rollout_cache: int, refine_cache: int) -> list[Item]:
    """The sampler caches the phases after sampling still hold (none with rollout.release_kv_cache)."""
    held_after = []
    if not step.work.release_kv_cache:
        if not step.continuous:  # continuous batching frees its slots when a call ends
            held_after = [Item("rollout KV cache (kept: release_kv_cache=False)", rollout_cache)]
        if refine_cache and not step.continuous:
            held_after.append(Item("refine KV cache (kept: release_kv_cache=False)", refine_cache))
    return held_after


def _score_phases(step: _Step, held_after: list[Item]) -> list[Phase]:
    """score: the teacher forward over all rows (or score_rows at a time); diagnostics (log.diagnostics)."""
    work, teacher, score_rows, scored = step.work, step.teacher, step.score_rows, step.scored
    score_loss = LossConfig(name="k3", chunk_size=work.loss.chunk_size, vocab_chunk=work.loss.vocab_chunk)
    score = [Item("teacher forward (no gradient)",
                  forward_transient(teacher, score_rows, work.teacher_ctx + work.response),
                  f"{score_rows} rows x ({work.teacher_ctx} + {work.response}) per device"),
             Item("token log-probs (fused, one chunk)", loss_buffers(teacher, 0, score_rows, work.response,
                                                                     score_loss) - teacher.hidden_size *
                  teacher.vocab_size * _F32),  # forward only: no head gradient
             Item("gathered weights (2 layers + lm_head)", step.t_gather + step.t_head_full),
             Item("ScoreOutput (hidden + logp, all rows)", scored, f"[rows, {work.response}, "
                                                                    f"{teacher.hidden_size}] {teacher.dtype}")]
    if step.kept_states:  # read by the assembly while it writes the ScoreOutput; the forward is kept above for
        # the rows scored anew (fallbacks), a bound
        score.append(Item("kept teacher states (refine.reuse_states)", step.kept_states,
                          f"[rows, {work.rewrite}, {teacher.hidden_size}] {teacher.dtype}"))
    if score_rows < step.rows_dev:  # a group's output until row_groups writes it into the ScoreOutput
        score.append(Item("one group's output", scored * score_rows // step.rows_dev,
                          f"train.max_score_rows={step.options.score_rows}"))
    phases = [Phase("score", tuple(score + held_after))]

    if work.diagnostics:
        # _diagnostics: the student scored on all rows, and for TRD the teacher again on y_o's vanilla layout.
        vanilla_ctx = work.prompt if work.mode == "opd" else work.teacher_ctx
        student_fwd = forward_transient(step.student, score_rows, work.prompt + work.response)
        teacher_fwd = (forward_transient(teacher, score_rows, vanilla_ctx + work.max_new)
                       if work.trajectory == "y_r" else 0)
        diag = [Item("diagnostics forwards (student; teacher on y_o)", max(student_fwd, teacher_fwd),
                     "log.diagnostics"),
                Item("ScoreOutputs (trained batch + y_o batch)", 2 * scored),
                Item("gathered weights (2 layers + lm_head)", step.t_gather + step.t_head_full)]
        phases.append(Phase("diagnostics", tuple(diag + held_after)))
    return phases


def _update_phase(step: _Step, held_after: list[Item],
                  warnings: list[str]) -> tuple[Phase, UpdateBreakdown, int]:
    """update: one micro-batch. Returns the phase, its breakdown and the micro-batch's rows per device; appends
    to `warnings` the errors of a micro-batch that does not split."""
    work, mesh, student, batch_shards = step.work, step.mesh, step.student, step.batch_shards
    micro_rows = work.rows // work.micro_batches
    if work.rows % work.micro_batches:
        warnings.append(f"error: train.micro_batches={work.micro_batches} does not divide {work.rows} rows")
    if micro_rows % batch_shards:
        warnings.append(f"error: a micro-batch of {micro_rows} rows does not split over the {batch_shards} "
                        "(data, fsdp) devices (to_micro_batches would fail): lower train.micro_batches")
    micro_dev = max(1, _ceil_div(micro_rows, batch_shards))
    s_gather = 2 * step.s_state.layer_params_total // max(1, mesh["tensor"]) if step.param_shards > 1 else 0
    s_head_full = student.hidden_size * student.vocab_size * _b(student) if step.param_shards > 1 else 0
    # Gradients and AdamW temporaries exist for the trainable parameters (LoRA: the adapters). The activations
    # are the full model's (XLA:CPU measures LoRA's at 0.6-1.1x full fine-tuning's: conservative).
    offline = work.offline_k > 0
    # Offline the loss reads stored targets, not the teacher's states: no teacher hidden chunks, no teacher head
    # (the student's chunked logits are still counted as the online loss's pair of them: conservative).
    update = update_activations(student, rows=micro_dev, context=work.prompt, response=work.response,
                                loss=work.loss, teacher_hidden=0 if offline else step.teacher.hidden_size,
                                params_bytes=step.s_state.trainable, remat=step.options.remat,
                                gathered=s_gather + s_head_full + (0 if offline else step.t_head_full))
    batch_arrays = step.rows_dev * ((work.prompt + work.response) * (4 + 4 + 1) + work.response * (4 + 1 + 4))
    upd = [Item("update transients (one micro-batch)", update.total,
                f"{micro_dev} rows x ({work.prompt} + {work.response}) per device, remat {step.options.remat}"),
           (Item("stored targets (top-k ids and log-probs, tail, token log-prob)",
                 step.rows_dev * work.response * (work.offline_k * 8 + 8), f"k={work.offline_k}") if offline
            else Item("ScoreOutput (held from score)", step.scored)),
           Item("batch arrays (tokens, positions, masks, targets)", batch_arrays)]
    return Phase("update", tuple(upd + held_after)), update, micro_dev


def _eval_phases(step: _Step, held_after: list[Item]) -> list[Phase]:
    """eval (between steps): the student's eval sampler, whose cache is freed when it ends; teacher eval: once,
    before training, the refine sampler on the vanilla contexts."""
    work, student, teacher = step.work, step.student, step.teacher
    eval_cache = step.cache(student, work.eval_rows, work.eval_prompt + work.eval_new, continuous=True)
    ev_note = (step.slots_note(work.eval_rows, work.eval_prompt, work.eval_new) if step.continuous
               else f"{step.call_rows(work.eval_rows)} rows per call x ({work.eval_prompt} + {work.eval_new}), "
                    f"{step.cache_note}")
    ev = [Item("eval KV cache (student)", eval_cache, ev_note)]
    ev += step.sampler_transient(student, work.eval_rows, work.eval_prompt, work.eval_n, work.eval_new,
                                 continuous=True)
    ev += held_after
    phases = [Phase("eval", tuple(ev))]
    if work.eval_teacher and not work.offline_k:
        teacher_eval_cache = step.cache(teacher, work.eval_rows, work.teacher_eval_ctx + work.eval_new)
        phases.append(Phase("teacher eval", tuple(
            [Item("teacher eval KV cache", teacher_eval_cache, f"{step.call_rows(work.eval_rows)} rows per call x "
                                                              f"({work.teacher_eval_ctx} + {work.eval_new})")]
            + step.sampler_transient(teacher, work.eval_rows, work.teacher_eval_ctx, work.eval_n, work.eval_new))))
    return phases


def make_plan(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int], accelerator: Accelerator,
              options: PlanOptions = PlanOptions()) -> Plan:  # noqa: B008 (a frozen dataclass)
    """Per-device bytes of every phase of a step (see the package docstring)."""
    student = models["student"].config
    teacher = models["teacher"].config if "teacher" in models else student
    sizes = tuple(sorted(mesh.items()))
    s_state = state_bytes(student, sizes, True, options.lora)
    t_state = state_bytes(teacher, sizes, False) if work.mode == "opd" and not work.offline_k else None
    step = _Step(work, mesh, options, student, teacher, s_state, t_state)
    if work.offline_k:  # training from stored targets (trd_jax/offline): the update and evaluation only
        warnings: list[str] = []
        update_phase, update, micro_dev = _update_phase(step, [], warnings)
        return Plan(workload=work, models=models, mesh=mesh, accelerator=accelerator, options=options,
                    student_state=s_state, teacher_state=None, persistent=tuple(_persistent(step)),
                    phases=(update_phase, *_eval_phases(step, [])), update=update, micro_rows_per_device=micro_dev,
                    warnings=tuple(warnings))

    rollout_cache = step.cache(student, work.rows, work.prompt + work.max_new + work.rollout_draft, continuous=True)
    refine_cache = (step.cache(teacher, work.rows, work.refine_prompt + work.rewrite + work.refine_draft,
                               continuous=True, own_pool=True) if work.trajectory == "y_r" else 0)
    held_after = _held_after(step, rollout_cache, refine_cache)
    warnings: list[str] = []
    phases = _sampler_phases(step, rollout_cache, refine_cache) + _score_phases(step, held_after)
    update_phase, update, micro_dev = _update_phase(step, held_after, warnings)
    phases += [update_phase] + _eval_phases(step, held_after)
    return Plan(workload=work, models=models, mesh=mesh, accelerator=accelerator, options=options,
                student_state=s_state, teacher_state=t_state, persistent=tuple(_persistent(step)),
                phases=tuple(phases), update=update, micro_rows_per_device=micro_dev, warnings=tuple(warnings))
