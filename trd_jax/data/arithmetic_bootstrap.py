"""Bootstrap of the embedded task: a strong teacher and a weaker student trained from scratch by SFT, so that
the default run needs no downloads.

- Teacher (OPD): solves problems (x -> y*) and, given TRD's OPD refine prompt with an attempt, writes the
  corrected solution. Attempts are correct or flawed (an early wrong step carried forward): the correction
  keeps the attempt's line structure, fixing the first wrong step and everything after it.
- Student: a smaller model trained on noisy solutions (a fraction of its targets are flawed), so it makes
  early mistakes that propagate. For OPSD, where the student is its own teacher, it also learns to use a
  reference solution in context: the vanilla OPSD context (x + y*) and the OPSD refine prompt, both -> y*.

Both are written as Hugging Face folders under the bootstrap directory with a bootstrap.json recording
the settings; a later run with the same settings reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np

from trd_jax.data.arithmetic import ArithmeticTask, continuation_after_error, corrupted_attempt, flawed_solution
from trd_jax.metrics import atomic_write_json
from trd_jax.models.hf_io import save_hf
from trd_jax.models.transformer import Transformer, init_for_tokenizer
from trd_jax.refine import refine_prompt_text, vanilla_teacher_context
from trd_jax.sft import SFTSet, train_sft
from trd_jax.tokenization import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    teacher: ModelShape = ModelShape(128, 384, 2, 4, 2, 32)
    student: ModelShape = ModelShape(96, 256, 2, 4, 2, 24)
    # Two phases each: solving alone first (the arithmetic is learned fastest without attempts in context,
    # whose flawed lines would contradict it), then the full mixture.
    teacher_solve_steps: int = 300
    # 1000 mixed steps: with fewer (450) the repair skill below costs the teacher most of its rewriting
    # accuracy (16% of student rollouts repaired instead of 85%).
    teacher_mixed_steps: int = 1000
    student_solve_steps: int = 300
    # 800 steps with the reference sets weighted up: with 200 steps at weight 0.5 the student shown the
    # reference (OPSD's teacher) solved 9% of problems, worse than alone; with these 93%.
    student_mixed_steps: int = 800
    batch_tokens: int = 4096  # tokens per SFT batch (rows = this // padded row width)
    learning_rate: float = 3e-3
    # Fraction of the student's solve targets that are flawed. 0.8 rather than less because the reference
    # sets also teach it to solve: with 0.6 it ended at 62% alone, leaving little for distillation.
    student_noise: float = 0.8
    student_reference_weight: float = 4.0  # sampling weight of x + y* -> y* against 2 for the noisy solutions
    # The teacher also learns to go on after a flawed prefix: repairing (this fraction) or continuing
    # consistently with the error, like a real model that sometimes backtracks, so its next-token
    # distribution after a wrong step is the bimodal mixture of prefix failure (TRD_SPEC §2). With 0 it
    # always continues consistently and token-level targets on flawed rollouts are not fragmented.
    repair_fraction: float = 0.5
    seed: int = 0


def _model(shape: ModelShape, tok: Tokenizer, seed: int) -> Transformer:
    return init_for_tokenizer(tok, seed=seed, max_position_embeddings=1024, tie_word_embeddings=True,
                              **dataclasses.asdict(shape))


def _attempt(task: ArithmeticTask, ex, rng: np.random.Generator, p_flawed: float, *, varied: bool = False) -> str:
    """The reference, or (with probability p_flawed) a flawed attempt: an early wrong step carried forward,
    or with `varied` any of corrupted_attempt's kinds half of the time."""
    if rng.random() >= p_flawed:
        return ex.reference
    if varied and rng.random() < 0.5:
        return corrupted_attempt(task.problem_of(ex), rng)
    return flawed_solution(task.problem_of(ex), rng)[0]


def sft_sets(task: ArithmeticTask, tok: Tokenizer, role: str, cfg: BootstrapConfig, *, prompt_mode: str = "chat",
             refine_mode: str = "chat") -> list[SFTSet]:
    """The SFT mixture of the teacher ("teacher") or the student ("student") over the train split."""
    rng = np.random.default_rng([cfg.seed, 1 if role == "teacher" else 2])
    train = list(task.split("train"))
    x = [tok.encode_prompt(ex.problem, prompt_mode) for ex in train]
    correct = [tok.encode_response(ex.reference, append_eos=True) for ex in train]
    if role == "teacher":
        refine = [tok.encode_prompt(refine_prompt_text(ex.problem, _attempt(task, ex, rng, 0.7, varied=True),
                                                       mode="opd", task="math"), refine_mode) for ex in train]
        sets = [SFTSet("solve", x, correct, 1.0), SFTSet("refine_opd", refine, correct, 1.0)]
        if cfg.repair_fraction > 0:
            prefixes, continuations = [], []
            for ex, ids in zip(train, x):
                prefix, rest = continuation_after_error(task.problem_of(ex), rng,
                                                        repair=rng.random() < cfg.repair_fraction)
                prefixes.append(ids + tok.encode(prefix))
                continuations.append(tok.encode_response(rest, append_eos=True))
            sets.append(SFTSet("after_error", prefixes, continuations, 0.5))
        return sets
    noisy = [tok.encode_response(_attempt(task, ex, rng, cfg.student_noise), append_eos=True) for ex in train]
    vanilla = [vanilla_teacher_context(ex.problem, ex.reference, mode="opsd", task="math", tokenizer=tok,
                                       prompt_mode=prompt_mode) for ex in train]
    refine = [tok.encode_prompt(refine_prompt_text(ex.problem, _attempt(task, ex, rng, 0.7, varied=True), ex.reference,
                                                   mode="opsd", task="math"), refine_mode) for ex in train]
    return [SFTSet("solve_noisy", x, noisy, 2.0), SFTSet("vanilla_opsd", vanilla, correct, cfg.student_reference_weight),
            SFTSet("refine_opsd", refine, correct, 1.0)]


def bootstrap(task: ArithmeticTask, tok: Tokenizer, cfg: BootstrapConfig, directory: str, *,
              prompt_mode: str = "chat", refine_mode: str = "chat") -> dict[str, str]:
    """Trains (or reuses) the teacher and the student; returns {"teacher": dir, "student": dir}."""
    record = {"config": dataclasses.asdict(cfg), "task": dataclasses.asdict(task.cfg), "prompt_mode": prompt_mode,
              "refine_mode": refine_mode}
    dirs = {role: os.path.join(directory, role) for role in ("teacher", "student")}
    meta_file = os.path.join(directory, "bootstrap.json")
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in record} == record and all(os.path.isfile(os.path.join(d, "config.json"))
                                                               for d in dirs.values()):
            log.info("bootstrap: reusing the teacher and student in %s", directory)
            return dirs
    os.makedirs(directory, exist_ok=True)
    timings = {}
    phases = {"teacher": (cfg.teacher, cfg.teacher_solve_steps, cfg.teacher_mixed_steps),
              "student": (cfg.student, cfg.student_solve_steps, cfg.student_mixed_steps)}
    for i, (role, (shape, solve_steps, mixed_steps)) in enumerate(phases.items()):
        start = time.perf_counter()
        seed = cfg.seed * 2 + 11 + i
        sets = sft_sets(task, tok, role, cfg, prompt_mode=prompt_mode, refine_mode=refine_mode)
        model = _model(shape, tok, seed)
        for phase, (steps, subset) in enumerate(((solve_steps, sets[:1]), (mixed_steps, sets))):
            if steps:
                model = train_sft(model, subset, steps=steps, batch_tokens=cfg.batch_tokens,
                                  learning_rate=cfg.learning_rate, seed=seed * 10 + phase,
                                  on_log=lambda step, m, role=role: log.info(
                                      "bootstrap %s step %d: %s", role, step, {k: round(v, 4) for k, v in m.items()}))
        save_hf(model, dirs[role], tokenizer_dir=task.tokenizer_dir)
        timings[role] = time.perf_counter() - start
        log.info("bootstrap: %s trained in %.0f s", role, timings[role])
    atomic_write_json(meta_file, {**record, "seconds": timings})
    return dirs
