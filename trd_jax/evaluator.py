"""A run's evaluation (TRD_SPEC §5): n samples per eval problem at eval.temperature / top_p, graded; Avg@n, Pass@k
and the Pass@k curve, and with eval.greedy one temperature-0 sample per problem; reports in workdir/eval.
The teacher is evaluated the same way in its vanilla context (x for OPD; x + y* for OPSD's initial weights)."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from trd_jax import evaluation, trajectories
from trd_jax.phase_sampling import sample_rows
from trd_jax.sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)

GREEDY = SamplingConfig(temperature=0.0)  # eval.greedy: argmax decoding (top-k / top-p are moot)
BRIEF = ("step", "avg_at_k", "pass_at_k", "pass_at", "k", "n", "num_problems", "mean_length", "correct_counts",
         "greedy")


class Evaluator:
    """s: the run's Settings; eval_key: the run's evaluation stream (step `step` samples with fold_in(eval_key,
    step)); timer: the run's PhaseTimer (phase "eval")."""

    def __init__(self, s, task, tok, eval_key, timer, workdir: str, host0: bool):
        self.s, self.task, self.tok, self.eval_key, self.timer = s, task, tok, eval_key, timer
        self.workdir, self.host0 = workdir, host0

    def __call__(self, step: int, sampler: Sampler, params, *, teacher: bool = False) -> dict:
        """Evaluates `params` through `sampler`; writes workdir/eval/step_<step>.{json,md} (teacher:
        workdir/eval/teacher.{json,md}). Returns the brief kept in summary.json (initial_eval, final_eval,
        evals): step, avg_at_k, pass_at_k, pass_at, k, n, num_problems, mean_length, correct_counts (per
        problem, for per-problem statistics and broadening) and, with greedy decoding, greedy."""
        s, tok = self.s, self.tok
        examples = list(self.task.split("eval"))
        if s.eval.problems:
            examples = examples[: s.eval.problems]
        prompts = trajectories.encode_prompts(tok, examples, s.task.prompt_mode, s.task.max_prompt_tokens)
        max_prompt_len = s.task.max_prompt_tokens
        if teacher:
            prompts = trajectories.vanilla_contexts(tok, examples, prompts, mode=s.distill.mode,
                                                    task_kind=self.task.kind,
                                                    prompt_mode=s.task.prompt_mode)
            if s.distill.mode != "opd":  # OPSD's vanilla context x + y* has no configured bound
                max_prompt_len = None
        greedy = s.eval.greedy and not teacher
        chunk = max(1, s.train.batch_size)
        # One sampler call per decoding rule: chunks of batch_size problems, each drawing with its own key
        # (fold_in(eval_key at step, chunk start)); the static sampler runs the chunks one by one (its cache holds
        # a chunk), continuous batching streams every row of the evaluation through its slots.
        starts = list(range(0, len(examples), chunk))
        sizes = [min(chunk, len(examples) - c) for c in starts]
        keys = [jax.random.fold_in(jax.random.fold_in(self.eval_key, step), c) for c in starts]
        greedy_correct = greedy_lengths = None
        with self.timer.phase("eval") as span:
            try:
                rows = sample_rows(s, sampler, params, prompts, s.eval.max_new, s.eval.sampling, s.eval.n, keys,
                                   max_prompt_len, lookup=True, key_groups=sizes)
                exs = [ex for ex in examples for _ in range(s.eval.n)]
                correct = trajectories.grade(self.task, tok, rows, exs).reshape(-1, s.eval.n) > 0.5
                lengths = [len(r) for r in rows]
                if greedy:  # after the samples, so that a static cache changes shape (n -> 1 row per prompt) once
                    rows = sample_rows(s, sampler, params, prompts, s.eval.max_new, GREEDY, 1, keys, max_prompt_len,
                                       lookup=True, key_groups=sizes)  # the keys are unused at temperature 0
                    greedy_correct = trajectories.grade(self.task, tok, rows, examples) > 0.5
                    greedy_lengths = [len(r) for r in rows]
            finally:
                sampler.release()  # evaluations are rare: their cache (eval, or teacher eval's) is not kept
            span.tokens = sum(lengths) + sum(greedy_lengths or [])
        summary = evaluation.summarize(correct, s.eval.k, problem_ids=[ex.id for ex in examples])
        summary.update(step=step, mean_length=float(np.mean(lengths)))
        if greedy:
            summary.update(greedy=float(greedy_correct.mean()),
                           greedy_mean_length=float(np.mean(greedy_lengths)))
        who = "teacher" if teacher else "student"
        if self.host0:
            evaluation.write_report(os.path.join(self.workdir, "eval"), "teacher" if teacher else f"step_{step:06d}",
                                    summary, rows=10, title=f"{self.task.name}: {who} at step {step}")
        brief = {k: summary[k] for k in BRIEF if k in summary}
        log.info("eval of the %s at step %d: Avg@%d %.2f%%, Pass@%d %.2f%%%s", who, step, brief["n"],
                 100 * brief["avg_at_k"], brief["k"], 100 * brief["pass_at_k"],
                 f", greedy {100 * brief['greedy']:.2f}%" if greedy else "")
        return brief
