"""The host controller: the loop around the jitted steps (rollout, refine, score, update), with data,
grading, metrics, per-phase cost, checkpoints and export; the score phase's forwards are scoring.py's, evaluation
is evaluator.py's, and the models are roles.py's.

One step (TRD_SPEC §3):
    prompts (data) -> rollout y_o (student sampler) -> grade y_o
    -> [TRD] refine prompts -> y_r (teacher sampler) -> validate -> grade y_r
    -> layouts (student x + y, teacher c + y) -> score (teacher, no grad) -> [diagnostics] -> update
Every phase is timed (wall seconds after block_until_ready), its tokens counted and its FLOPs estimated,
so that summary.json shows what refinement costs next to plain OPD.

Determinism: every random stream is a pure function of (seed, step): rollout and refine keys are
fold_in(train_key, step), eval keys fold_in(eval_key, step), and the data order is a per-epoch
permutation whose position is checkpointed. A run interrupted and resumed therefore ends with the
same parameters, bit for bit, as an uninterrupted one (tests/test_controller.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from trd_jax import evaluation, multihost, row_groups, trajectories
from trd_jax.evaluator import Evaluator
from trd_jax.phase_sampling import draft_metrics, sample_rows
from trd_jax.checkpointing import Checkpointer, PreemptionGuard, multihost_should_stop
from trd_jax.config import Settings, resolve
from trd_jax.errors import ConfigError, TrainingError
from trd_jax.data.registry import make_task_once
from trd_jax.data.task import NoUsableExamples
from trd_jax.layouts import DistillBatch, distill_batch
from trd_jax.metrics import MetricsWriter, PhaseTimer, ProgressBar, atomic_write_json, estimate_flops, quantiles
from trd_jax.scoring import Scorer
from trd_jax.roles import build_roles, converted, prepared_sources, tokenizer_home
from trd_jax.run_checkpoint import check_resume_config, checkpoint_steps, is_run_dir
from trd_jax.run_summary import training_summary
from trd_jax.offline import shards
from trd_jax.offline.batches import offline_batch
from trd_jax.offline.rounds import RoundRows
from trd_jax.sampling import Sampler
from trd_jax.sharding import make_mesh, replicated
from trd_jax.bucketed_update import BucketedUpdate
from trd_jax.steps import (ScoreOutput, TeacherSignal, UpdateBatch, init_sharded_state, jit_update,
                           learning_rate_schedule,
                           make_optimizer, to_micro_batches)
from trd_jax.tokenization import Tokenizer

log = logging.getLogger(__name__)

class StepTargets(NamedTuple):
    """What a step distils on: the rows (trajectories, grades, contexts), their batch layouts, the teacher's
    scores, the teacher weights that scored them, and the vanilla contexts (diagnostics)."""

    rows: trajectories.StepRows
    batch: DistillBatch
    scored: Any
    teacher_params: Any
    vanilla: list


class Trainer:
    """Owns one run in `workdir`. `halt_after` stops (checkpointing) once that many steps are done, as a
    preemption would: the hook tests use to interrupt a run at an exact step."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, *, settings: Settings | None = None,
                 halt_after: int | None = None):
        """`settings`: resolve(cfg), when the caller (main.py) has already resolved it; the Trainer never
        rewrites them. The models' preparation (SmolLM2 conversion, bootstrap, teacher SFT) yields
        `self.sources`, where the weights actually come from."""
        self.cfg = cfg
        self.workdir = os.path.abspath(workdir)
        self.halt_after = halt_after
        s = settings if settings is not None else resolve(cfg)
        self.s: Settings = s
        os.makedirs(self.workdir, exist_ok=True)
        self.evaluating = s.evaluate_only
        student, teacher = (converted(src, side, self.workdir) for side, src in (("student", s.student),
                                                                               ("teacher", s.teacher)))
        self.task = make_task_once(s.task, os.path.join(self.workdir, "data"), student_dir=tokenizer_home(student))
        if self.task.kind != s.refine.task:
            raise ValueError(f"task {self.task.name!r} has kind {self.task.kind!r}, config.TASK_KINDS says "
                             f"{s.refine.task!r}")
        if not self.evaluating:  # an eval workdir holds no training state to resume
            check_resume_config(self.workdir, cfg)
        self.host0 = jax.process_index() == 0
        if self.host0:
            # configs/eval.py's `model` is the student section under another name: written once.
            atomic_write_json(os.path.join(self.workdir, "config.json"),
                              {k: v for k, v in cfg.to_dict().items() if k != "model"})
        self.tok = Tokenizer.from_dir(self.task.tokenizer_dir)
        self.sources = prepared_sources(s, student, teacher, self.task, self.tok, self.workdir)
        # JSON results kept across resumes (teacher eval, bootstrap, teacher SFT)
        self.extra: dict[str, Any] = dict(self.sources.records)
        try:
            self.mesh = make_mesh(s.mesh)
        except ValueError as e:  # axis sizes these devices cannot form
            raise ConfigError("mesh", f"{e} (mesh.data={s.mesh.data}, mesh.fsdp={s.mesh.fsdp}, "
                                      f"mesh.tensor={s.mesh.tensor}; {jax.device_count()} devices)") from None
        row_groups.check_group(s.train.max_score_rows, self.mesh)
        base = jax.random.key(s.seed)
        self.train_key, self.eval_key = jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
        if multihost.multi_process():  # the same keys on every process, as arrays replicated over the mesh
            self.train_key, self.eval_key = (multihost.to_global(k, replicated(self.mesh))
                                             for k in (self.train_key, self.eval_key))
        self.timer = PhaseTimer()
        self.evaluator = Evaluator(s, self.task, self.tok, self.eval_key, self.timer, self.workdir, self.host0)
        self.counters: dict[str, float] = {}
        self.evals: list[dict] = []
        self._update_fn = None
        self._warm = False
        self._setup_models()

    # ------------------------------------------------------------------------------------------ setup

    def _setup_models(self) -> None:
        """The roles (trd_jax/roles.py), the TrainState over the student's trainable parameters, the samplers and
        the data."""
        s, tok = self.s, self.tok
        self.roles, params = build_roles(s, self.sources, tok, self.mesh, self.workdir, self.task.tokenizer_dir,
                                         evaluating=self.evaluating)
        self._score = self.scorer = Scorer(s, self.roles, self.mesh, self._add_flops)  # _score: what experiments call
        eos, pad = tok.eos_ids, tok.pad_id
        self.eval_sampler = Sampler(self.roles.student_graph, eos_ids=eos, pad_id=pad,
                                    continuous=s.rollout.continuous)
        if self.evaluating:  # the student alone: no teacher, no optimizer state
            self.state, self.eval_params, self.data = None, params, None
            return
        self.optimizer = make_optimizer(s.optim)
        self.lr_schedule = learning_rate_schedule(s.optim)
        ema = s.distill.mode == "opsd" and s.distill.opsd_teacher == "ema"
        self.state = init_sharded_state(params, self.roles.trainable_shardings, self.optimizer, self.mesh, ema=ema)
        del params
        self.rollout_sampler = Sampler(self.roles.student_graph, eos_ids=eos, pad_id=pad,
                                       continuous=s.rollout.continuous)
        # Refine through the rollouts' continuous batching too (kept states and speculative refine included), with a
        # paged pool sized for its own rows: a pool sized for rollouts cannot hold refine prompts.
        self.refine_sampler = Sampler(self.roles.teacher_graph, eos_ids=eos, pad_id=pad,
                                      continuous=dataclasses.replace(s.rollout.continuous, pool_tokens=0))
        self.memory = self.roles.persistent_bytes(self.state)
        if self.host0 and s.lora is not None:
            trainable = self.memory["trainable_params"]
            frozen = self.roles.student_count - trainable  # the base's parameters
            log.info("LoRA r=%d alpha=%g on %s: %s trainable parameters (%.2f%% of %s); persistent bytes %s",
                     s.lora.rank, s.lora.alpha, ",".join(s.lora.targets), f"{trainable:,}", 100 * trainable / frozen,
                     f"{frozen:,}", self.memory["bytes"])
        # Prompts over task.max_prompt_tokens are skipped (local datasets count them, as [code-trd] drops
        # them); local datasets stream through grain, generated tasks hold their examples in memory.
        self.task.set_filter(
            lambda ex: len(tok.encode_prompt(ex.prompt(), s.task.prompt_mode)) <= s.task.max_prompt_tokens)
        if s.targets_dir and s.offline.rounds:  # each round's rows, generated by the run or by a teacher job
            self.data = RoundRows(self, s.offline, seed=s.seed)
            return
        if s.targets_dir:  # stored targets: their rows, not the task's prompts, are the training data
            try:
                self.data = shards.open_rows(s.targets_dir, seed=s.seed)
            except ValueError as e:
                raise ConfigError("offline.dir", str(e)) from None
            return
        with self._usable_prompts():
            self.data = self.task.prompt_iterator(s.seed)

    @contextlib.contextmanager
    def _usable_prompts(self):
        """A training stream left empty by the prompt-length filter is a configuration problem: one line naming
        the key."""
        try:
            yield
        except NoUsableExamples as e:
            raise ConfigError("task.max_prompt_tokens", f"{e}; every training prompt may be longer than "
                                                        f"{self.s.task.max_prompt_tokens} tokens") from None

    # What tests and experiments read on the Trainer: the roles' graphs and fixed weights.
    s_graph = property(lambda self: self.roles.student_graph)
    t_graph = property(lambda self: self.roles.teacher_graph)
    base_params = property(lambda self: self.roles.base_params)
    teacher_params = property(lambda self: self.roles.frozen_teacher)

    def _student_params(self):
        return self.roles.student_params(self.eval_params if self.evaluating else self.state.params)

    def _teacher_params(self):
        return self.roles.teacher_params(self.state)

    def _checkpoint_tree(self) -> dict:
        return {"train": self.state, "rng": jax.random.key_data(self.train_key),
                "teacher_ref": self.roles.checkpointed_teacher()}

    # ------------------------------------------------------------------------------------------ compiled steps

    def _update(self, batch: DistillBatch, scored, dropout_key=None):
        if self.s.train.length_buckets and self.s.train.micro_batches > 1:  # one micro-batch: nothing to sort
            return self._bucketed_update(batch, scored, dropout_key)
        if self._update_fn is None:  # compiled once per context width (Layout's static field)
            state_sh = jax.tree.map(lambda x: x.sharding, self.state)
            self._update_fn = jit_update(self.roles.student_graph, self.optimizer, self.s.loss, state_sh, self.mesh,
                                         ema_decay=self.s.distill.ema_decay,
                                         teacher_head_source=self.roles.teacher_head_source,
                                         frozen_shardings=self.roles.base_shardings)
        seq, targets, mask, hidden, logp = to_micro_batches(
            (batch.student, batch.targets, batch.response_mask, scored.hidden, scored.logp),
            self.s.train.micro_batches, self.mesh)
        self.state, metrics = self._update_fn(self.state, UpdateBatch(seq, targets, mask),
                                              TeacherSignal(hidden, self.roles.frozen_head, logp),
                                              self.roles.base_params, dropout_key)
        return metrics

    def _bucketed_update(self, batch: DistillBatch, scored, dropout_key=None):
        """The update with rows sorted by length into micro-batches of their own widths (train.length_buckets)."""
        if self._update_fn is None:
            state_sh = jax.tree.map(lambda x: x.sharding, self.state)
            self._update_fn = BucketedUpdate(self.roles.student_graph, self.optimizer, self.s.loss, state_sh, self.mesh,
                                             ema_decay=self.s.distill.ema_decay,
                                             teacher_head_source=self.roles.teacher_head_source)
        self.state, metrics = self._update_fn(
            self.state, UpdateBatch(batch.student, batch.targets, batch.response_mask),
            TeacherSignal(scored.hidden, self.roles.frozen_head, scored.logp), self.roles.base_params, dropout_key,
            num_micro=self.s.train.micro_batches)
        return metrics

    # ------------------------------------------------------------------------------------------ one step

    @property
    def reuses_refine_states(self) -> bool:
        """The score phase takes y_r's teacher states from the refine pass (score_reuse): refine-context
        scoring with refine.reuse_states, on one process."""
        s = self.s
        return (s.distill.trajectory == "y_r" and s.distill.teacher_context == "refine" and s.refine.reuse_states
                and not multihost.multi_process())

    def _count(self, metrics: dict, key: str, value: float) -> None:
        metrics[f"rows/{key}"] = value
        self.counters[key] = self.counters.get(key, 0) + value

    def train_step(self, step: int, bar: ProgressBar) -> dict[str, float]:
        """Runs step `step` (0-based) and returns its metrics."""
        s, timer = self.s, self.timer
        if s.targets_dir:
            return self._offline_step(step, bar)
        with self._usable_prompts():
            examples = self.data.next(s.train.batch_size)
        metrics: dict[str, float] = {}
        rows, batch, scored, teacher_params, vanilla = self.distill_targets(step, examples, metrics, bar)
        y_o = rows.y_o

        if s.log.diagnostics and step % s.log.diagnostics_every == 0:
            with timer.phase("diagnostics"):
                metrics.update(self.scorer.diagnostics(rows, batch, scored, self._student_params(), teacher_params,
                                                       vanilla, pad_id=self.tok.pad_id))
        return self._finish_step(step, bar, rows, batch, scored, y_o, metrics)

    def distill_targets(self, step: int, examples, metrics: dict, bar: ProgressBar | None = None) -> StepTargets:
        """The first half of a step (TRD_SPEC §3): rollouts y_o of `examples` by the current student, for TRD the
        teacher's rewrites y_r, grading, the trajectories and teacher contexts, and the teacher's scores of the
        trained batch. Random streams are those of step `step`. Fills `metrics` with the phases' counters."""
        s, tok, timer = self.s, self.tok, self.timer
        bar = bar or ProgressBar(0, enabled=False)
        k_rollout, k_refine = jax.random.split(jax.random.fold_in(self.train_key, step))
        n = s.rollout.n

        bar.update(step, phase="rollout")
        with timer.phase("rollout") as span:
            prompts = trajectories.encode_prompts(tok, examples, s.task.prompt_mode, s.task.max_prompt_tokens)
            y_o = sample_rows(s, self.rollout_sampler, self._student_params(), prompts, s.rollout.max_new,
                              s.rollout.sampling, n, k_rollout, s.task.max_prompt_tokens, lookup=True)
            span.tokens = sum(map(len, y_o))
        if s.rollout.prompt_lookup_tokens:
            metrics.update(draft_metrics(self.rollout_sampler.last_draft_stats, span.tokens, "rollout"))
        elif s.rollout.continuous.slots and self.rollout_sampler.last_continuous_stats:
            # generated tokens per slot-step
            metrics["rollout/slot_occupancy"] = span.tokens / max(self.rollout_sampler.last_continuous_stats[
                "slot_steps"], 1)
        if s.rollout.release_kv_cache:  # each sampler's cache is freed as its phase ends
            self.rollout_sampler.release()
        row_examples = [ex for ex in examples for _ in range(n)]
        rows = trajectories.StepRows(row_examples, [prompts[i // n] for i in range(len(y_o))], y_o,
                                     np.zeros(len(y_o), np.float32),
                                     trajectories.capped(y_o, tok.eos_ids, s.rollout.max_new))
        self._add_flops("rollout", self.roles.student_count, sum(map(len, rows.prompts)) + sum(map(len, y_o)))
        with timer.phase("grade") as span:
            rows.y_o_reward = trajectories.grade(self.task, tok, y_o, row_examples)
            span.tokens = sum(map(len, y_o))

        teacher_params = self._teacher_params()
        kept: dict = {}  # the refine pass's states, when the score phase reuses them
        if s.distill.trajectory == "y_r":
            bar.update(step, phase="refine")
            with timer.phase("refine") as span:
                trajectories.refine(rows, tok, s.refine, lambda ids, drafts: sample_rows(
                    s, self.refine_sampler, teacher_params, ids, s.refine.rewrite_budget, s.refine_sampling, 1,
                    k_refine, s.refine.prompt_budget, drafts=drafts if s.refine.speculative else None,
                    draft_tokens=s.refine.draft_tokens, kept=kept if self.reuses_refine_states else None))
                span.tokens = sum(map(len, rows.y_r))
            if s.refine.speculative and rows.y_r:
                metrics.update(draft_metrics(self.refine_sampler.last_draft_stats, span.tokens))
            if s.rollout.release_kv_cache:
                self.refine_sampler.release()
            sent = rows.refine_prompts.generate_rows
            self._add_flops("refine", self.roles.teacher_count,
                            sum(len(rows.refine_prompts.ids[b]) for b in sent) + sum(map(len, rows.y_r)))
            with timer.phase("grade") as span:
                rows.y_r_reward = trajectories.grade(self.task, tok, rows.y_r, [row_examples[b] for b in sent])
                span.tokens = sum(map(len, rows.y_r))
            # Before the teacher contexts are chosen: a row that falls back to y_o is scored in the vanilla context.
            wrong = trajectories.apply_wrong_rewrites(rows, s.refine.on_wrong_rewrite)
            counts, refined = trajectories.refine_outcomes(rows, wrong, tok.eos_ids, s.refine.rewrite_budget)
            for key, value in counts.items():
                self._count(metrics, key, value)
            metrics.update(refined)
        else:
            trajectories.use_rollouts(rows)
        vanilla = trajectories.vanilla_contexts(tok, row_examples, rows.prompts, mode=s.distill.mode,
                                                task_kind=self.task.kind,
                                                prompt_mode=s.task.prompt_mode)
        trajectories.choose_teacher_contexts(rows, vanilla, s.distill.teacher_context)
        batch = distill_batch(rows.prompts, rows.responses, rows.teacher_contexts, pad_id=tok.pad_id)

        bar.update(step, phase="score")
        with timer.phase("score") as span:
            scored = self.scorer.batch(teacher_params, batch, rows, kept, metrics)
            span.block, span.tokens = scored, int(batch.teacher.mask.sum())
        kept.clear()  # the states are in `scored` now
        return StepTargets(rows, batch, scored, teacher_params, vanilla)

    def _offline_step(self, step: int, bar: ProgressBar) -> dict[str, float]:
        """A step on stored targets (offline.dir): rows from the shards in grain's order, no teacher."""
        if self.s.offline.rounds:  # a new round's targets (offline/rounds.py): generated here, or waited for while
            # a teacher job writes them; instant inside a round
            with self.timer.phase("wait_targets" if self.s.offline.teacher_job else "generate"):
                self.data.prepare(step)
        with self.timer.phase("load"):
            stored = self.data.next(self.s.train.batch_size * self.s.rollout.n)
            batch, targets = offline_batch(stored, pad_id=self.tok.pad_id)
        sources = [r["source"] for r in stored]
        grades = [r["y_r_reward"] if r["source"] == "y_r" else r["y_o_reward"] for r in stored]
        metrics = {"accuracy/stored": float(np.mean(grades)), "rows/y_r": float(sum(src == "y_r" for src in sources)),
                   "length/stored": float(np.mean([len(r["response"]) for r in stored]))}
        if self.s.offline.teacher_job:
            metrics["offline/blocked_s"] = self.data.take_blocked()
        self._count(metrics, "total", len(stored))
        self._count(metrics, "stored_correct", float(np.sum(grades)))
        return self._finish_step(step, bar, None, batch, ScoreOutput(targets, targets.token_logp), None, metrics)

    def _finish_step(self, step, bar, rows, batch, scored, y_o, metrics):
        """update, then the step's metrics (train_step's second half)."""
        s, timer = self.s, self.timer
        bar.update(step, phase="update")
        lr = float(self.lr_schedule(step))
        dropout_key = None
        if s.lora is not None and s.lora.dropout > 0:  # its own stream: the rollout and refine keys stay as they were
            dropout_key = jax.random.fold_in(jax.random.fold_in(self.train_key, step), 2)
        with timer.phase("update") as span:
            out = self._update(batch, scored, dropout_key)
            span.block, span.tokens = out, int(batch.student.mask.sum())
        self._add_flops("update", self.roles.student_count, int(batch.student.mask.sum()), kind="train")

        mask = batch.response_mask.reshape(np.shape(out.per_token))
        metrics.update({"loss": float(out.loss), "grad_norm": float(out.grad_norm), "learning_rate": lr,
                        "tokens": int(out.num_tokens), "skipped": bool(out.skipped)})
        if out.skipped:
            self.counters["skipped_steps"] = self.counters.get("skipped_steps", 0) + 1
            log.warning("step %d skipped: loss %s, gradient norm %s (the weights are unchanged; %d skipped so far)",
                        step, float(out.loss), float(out.grad_norm), self.counters["skipped_steps"])
        metrics.update({f"divergence/{k}": v for k, v in quantiles(multihost.to_host(out.per_token), mask).items()})
        if rows is not None:  # None: stored targets (their metrics are _offline_step's)
            self._count(metrics, "y_o_correct", float(rows.y_o_reward.sum()))
            metrics.update({"accuracy/y_o": float(rows.y_o_reward.mean()),
                            "length/y_o": float(np.mean([len(r) for r in y_o])),
                            "capped/y_o": float(rows.y_o_capped.mean())})
            self._count(metrics, "total", rows.num_rows)
            self._count(metrics, "trained", sum(src != "dropped" for src in rows.sources))
            self._count(metrics, "dropped", sum(src == "dropped" for src in rows.sources))
        snapshot = timer.snapshot()
        if self._warm:  # the first step of a process includes compilation: kept out of the steady-state cost
            for key, value in snapshot.items():
                if key.startswith("phase_s/"):
                    self.counters[f"warm_s/{key[8:]}"] = self.counters.get(f"warm_s/{key[8:]}", 0.0) + value
            self.counters["warm_steps"] = self.counters.get("warm_steps", 0) + 1
        self._warm = True
        metrics.update(snapshot)
        return metrics

    def _add_flops(self, phase: str, num_params: int, tokens: int, kind: str = "forward") -> None:
        key = f"flops/{phase}"
        self.counters[key] = self.counters.get(key, 0.0) + estimate_flops(num_params, tokens, kind=kind)

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, step: int, params=None, *, teacher: bool = False) -> dict:
        """The student (`params`, default its current weights) or, `teacher`, the teacher in its vanilla context,
        evaluated on the eval split (evaluator.Evaluator: Avg@n, Pass@k, greedy; reports in workdir/eval)."""
        if teacher:
            params = self.roles.teacher_eval_params(self._student_params())
            return self.evaluator(step, self.refine_sampler, params, teacher=True)
        return self.evaluator(step, self.eval_sampler, self._student_params() if params is None else params)

    # ------------------------------------------------------------------------------------------ the loop

    def _restore(self, ckpt: Checkpointer) -> int:
        step, aside = ckpt.verified_latest()  # CheckpointError when checkpoints exist but none verifies
        if step is None:
            return 0
        tree, meta = ckpt.restore(step, abstract_state=self._checkpoint_tree())
        self.state = tree["train"]
        self.roles.restore_teacher(tree["teacher_ref"])
        self.train_key = jax.random.wrap_key_data(tree["rng"])
        if self.data is not None:
            self.data.restore(meta["data"])
        self.timer.restore(meta["timer"])
        self.counters = dict(meta["counters"])
        self.evals = list(meta["evals"])
        # The model sources found by this process (bootstrap, teacher SFT) over what the checkpoint recorded.
        self.extra = {**dict(meta.get("extra", {})),
                      **{k: v for k, v in self.extra.items() if k in ("bootstrap", "teacher_sft")}}
        if aside:  # summary.json says which steps were set aside and why
            self.extra["checkpoints_set_aside"] = [*self.extra.get("checkpoints_set_aside", []), *aside]
            log.warning("resuming from step %d, the newest checkpoint that verifies (%d newer set aside)", step,
                        len(aside))
        log.info("resumed from %s at step %d", ckpt.directory, step)
        return int(meta["step"])

    def _meta(self, step: int) -> dict:
        return {"step": step, "data": self.data.state(), "timer": self.timer.totals(), "counters": self.counters,
                "evals": self.evals, "extra": self.extra}

    def run(self) -> dict:
        """Trains (resuming from the workdir's latest checkpoint), evaluates, exports; returns the summary."""
        s = self.s
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), save_every=s.checkpoint.every,
                            keep=s.checkpoint.keep,
                            async_save=s.checkpoint.async_save)
        writer = MetricsWriter(self.workdir, enabled=self.host0, wandb=s.log.wandb, run_config=self.cfg.to_dict())
        try:
            start = self._restore(ckpt)
            if start == 0 and s.eval.initial and not self.evals:
                self.evals.append(self.evaluate(0))
            # Every run that holds a teacher evaluates it (a multi-round offline run generating its own rounds too)
            if s.eval.teacher and self.roles.teacher_mode != "offline" and "teacher_eval" not in self.extra:
                self.extra["teacher_eval"] = self.evaluate(start, teacher=True)
            bar = ProgressBar(s.train.steps, enabled=self.host0 and s.log.progress, initial=start)
            status, done = "completed", start
            with PreemptionGuard() as guard:
                for step in range(start, s.train.steps):
                    metrics = self.train_step(step, bar)
                    done = step + 1
                    stop = multihost_should_stop(guard.requested or done == self.halt_after, done)
                    with self.timer.phase("checkpoint"):
                        ckpt.save(done, self._checkpoint_tree(), self._meta(done), force=stop or done == s.train.steps)
                    if s.eval.every and done % s.eval.every == 0 and done < s.train.steps:
                        self.evals.append(self.evaluate(done))
                        metrics.update(evaluation.brief_metrics(self.evals[-1]))
                    metrics.update({k: v for k, v in self.timer.snapshot().items() if k.startswith("phase_s/")})
                    writer.write(done, metrics)
                    tps = metrics.get("tokens_per_s/rollout")
                    bar.update(done, phase="done", tokens_per_s=tps)
                    if self.counters.get("skipped_steps", 0) > s.train.max_skipped_fraction * s.train.steps:
                        status = "failed"
                        break
                    if stop and done < s.train.steps:
                        status = "preempted"
                        log.warning("stopping at step %d (checkpoint saved); rerun the same command to resume", done)
                        break
            bar.close()
            ckpt.wait()
            summary = self._finish(done, status)
        finally:
            ckpt.close()
            writer.close()
            self.task_close()
        if status == "failed":
            raise TrainingError(f"{summary['skipped_steps']} of {done} steps were skipped as non-finite, more than "
                                f"train.max_skipped_fraction={s.train.max_skipped_fraction} of "
                                f"train.steps={s.train.steps}: "
                                f"training stopped (checkpoints and {self.workdir}/summary.json kept)", summary)
        return summary

    def evaluate_only(self) -> dict:
        """config.mode "eval": the student (student.path, alias model.path: a Hugging Face folder or a run's
        workdir, then its latest checkpoint) evaluated on the task's eval split."""
        src = self.sources.student
        step = checkpoint_steps(src.path)[-1] if src.source == "path" and is_run_dir(src.path) else 0
        try:
            result = self.evaluate(step)
        finally:
            self.task_close()
        summary = {"status": "evaluated", "steps": step, "model": src.path or "random", "task": self.task.name,
                   "final_eval": result, **self._grading()}
        if self.host0:
            atomic_write_json(os.path.join(self.workdir, "summary.json"), summary)
        return summary

    def task_close(self) -> None:
        """Stops the task's grading workers (a later grade starts them again)."""
        self.task.close()

    def _grading(self) -> dict:
        """Answers per grading status (math: exact, match, timeout, ...), for tasks that count them."""
        return {"grading": dict(self.task.stats)} if self.task.stats else {}

    def _finish(self, done: int, status: str) -> dict:
        s = self.s
        final = None
        if status == "completed":
            final = next((e for e in self.evals if e["step"] == done), None)
            if final is None:
                final = self.evaluate(done)
                self.evals.append(final)
            if s.export.enabled:
                self.roles.export_student(self.state.params, self.workdir, self.sources.student,
                                          dtype=s.export.dtype or None,
                                          tokenizer_dir=self.task.tokenizer_dir)
        summary = training_summary(s, status=status, done=done, evals=self.evals, final=final,
                                   totals=self.timer.totals(), counters=self.counters, memory=self.memory,
                                   extra={**self._grading(), **self.extra})
        if self.host0:
            atomic_write_json(os.path.join(self.workdir, "summary.json"), summary)
        return summary


def train(cfg: ml_collections.ConfigDict, workdir: str, **kw) -> dict:
    return Trainer(cfg, workdir, **kw).run()
