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
import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np

from trd_jax.config import BootstrapConfig, ConfigError, ModelShape
from trd_jax.data.arithmetic import (ArithmeticTask, buggy_values, continuation_after_error, corrupted_attempt,
                                     line_forms, misremembered_facts, random_forms, solution_text)
from trd_jax.metrics import atomic_write_json
from trd_jax.models.hf_io import save_hf
from trd_jax.models.transformer import Transformer, init_for_tokenizer
from trd_jax.prompts import refine_prompt_text, vanilla_teacher_context
from trd_jax.sft import SFTSet, train_sft
from trd_jax.tokenization import Tokenizer

log = logging.getLogger(__name__)


def _model(shape: ModelShape, tok: Tokenizer, seed: int) -> Transformer:
    return init_for_tokenizer(tok, seed=seed, max_position_embeddings=1024, tie_word_embeddings=True,
                              **dataclasses.asdict(shape))


def student_facts(cfg: BootstrapConfig) -> dict[tuple[int, str, int], int] | None:
    """The plain facts this bootstrap's student misremembers (None: none), drawn from its seed."""
    if cfg.student_wrong_fact_rate <= 0:
        return None
    return misremembered_facts(cfg.student_wrong_fact_rate, np.random.default_rng([cfg.seed, 3]))


def _attempt(task: ArithmeticTask, ex, rng: np.random.Generator, cfg: BootstrapConfig, facts) -> str:
    """An attempt to rewrite, as refine training shows it: half the student's kind (the wrap misconception and
    misremembered facts, its forms), a quarter varied corruptions (corrupted_attempt), a quarter correct (in
    random forms)."""
    p = task.problem_of(ex)
    forms = random_forms(len(p.ops), rng, cfg.student_alt_form_rate)
    kind = rng.random()
    if kind < 0.5:
        return solution_text(p, buggy_values(p, forms, rng, max(cfg.student_bug_rate, 0.5), facts), forms)
    if kind < 0.75:
        return corrupted_attempt(p, rng, forms)
    return solution_text(p, forms=forms)


def _rewrite(task: ArithmeticTask, ex, attempt: str) -> str:
    """The rewrite refine training asks for: every value right, each line in the attempt's own form
    (staying close to the attempt, TRD_SPEC §3c)."""
    p = task.problem_of(ex)
    return solution_text(p, forms=line_forms(attempt, p))


def sft_sets(task: ArithmeticTask, tok: Tokenizer, role: str, cfg: BootstrapConfig, *, prompt_mode: str = "chat",
             refine_mode: str = "chat") -> list[SFTSet]:
    """The SFT mixture of the teacher ("teacher") or the student ("student") over the train split."""
    rng = np.random.default_rng([cfg.seed, 1 if role == "teacher" else 2])
    train = list(task.split("train"))
    problems = [task.problem_of(ex) for ex in train]
    x = [tok.encode_prompt(ex.prompt(), prompt_mode) for ex in train]
    eos = dict(append_eos=True)
    facts = student_facts(cfg)
    attempts = [_attempt(task, ex, rng, cfg, facts) for ex in train]
    rewrites = [tok.encode_response(_rewrite(task, ex, a), **eos) for ex, a in zip(train, attempts)]
    if role == "teacher":
        solve = [tok.encode_response(solution_text(p, forms=random_forms(len(p.ops), rng, cfg.teacher_alt_form_rate)),
                                     **eos) for p in problems]
        refine = [tok.encode_prompt(refine_prompt_text(ex.problem, a, mode="opd", task="math"), refine_mode)
                  for ex, a in zip(train, attempts)]
        sets = [SFTSet("solve", x, solve, 1.0), SFTSet("refine_opd", refine, rewrites, 1.0)]
        if cfg.repair_fraction > 0:
            prefixes, continuations = [], []
            for p, ids in zip(problems, x):
                repair = rng.random() < cfg.repair_fraction
                forms = random_forms(len(p.ops), rng, cfg.teacher_alt_form_rate)
                # drawn only when set, so that bootstraps built before the setting keep their data
                at_wrap = cfg.repair_on_student_errors > 0 and rng.random() < cfg.repair_on_student_errors
                prefix, rest = continuation_after_error(p, rng, repair=repair, forms=forms, at_wrap=at_wrap)
                prefixes.append(ids + tok.encode(prefix))
                continuations.append(tok.encode_response(rest, **eos))
            sets.append(SFTSet("after_error", prefixes, continuations, 0.5))
        return sets
    noisy = []
    for p in problems:
        forms = random_forms(len(p.ops), rng, cfg.student_alt_form_rate)
        noisy.append(tok.encode_response(solution_text(p, buggy_values(p, forms, rng, cfg.student_bug_rate, facts),
                                                       forms), **eos))
    correct = [tok.encode_response(ex.reference, **eos) for ex in train]
    vanilla = [vanilla_teacher_context(ex.problem, ex.reference, mode="opsd", task="math", tokenizer=tok,
                                       prompt_mode=prompt_mode) for ex in train]
    refine = [tok.encode_prompt(refine_prompt_text(ex.problem, a, ex.reference, mode="opsd", task="math"),
                                refine_mode) for ex, a in zip(train, attempts)]
    return [SFTSet("solve_noisy", x, noisy, 2.0),
            SFTSet("vanilla_opsd", vanilla, correct, cfg.student_reference_weight),
            SFTSet("refine_opsd", refine, rewrites, cfg.student_refine_weight)]


SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "data", "bootstrap_models")
MANIFEST = "bootstrap.json"
ROLES = ("teacher", "student")


# Settings added after bootstraps were built and cached, at the value that reproduces those bootstraps: left out of
# the identity there, so the caches (and the shipped models) keep their hash.
NEUTRAL = {"student_wrong_fact_rate": 0.0, "repair_on_student_errors": 0.0}


def identity(task: ArithmeticTask, cfg: BootstrapConfig, *, prompt_mode: str = "chat",
             refine_mode: str = "chat") -> dict:
    """What shapes the bootstrap's models: its own settings, the settings of the train split they are trained
    on (not the eval split's size) and how prompts are rendered."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if NEUTRAL.get(k, object()) != v}
    return {"config": config, "task": task.cfg.training_identity(), "prompt_mode": prompt_mode,
            "refine_mode": refine_mode}


# Settings that shape only the student: a teacher trained with the rest equal is the same model (its SFT data, seed
# and steps do not read these), so it can be taken from another bootstrap (``teacher_from``).
STUDENT_ONLY = ("student", "student_solve_steps", "student_mixed_steps", "student_reference_weight",
                "student_refine_weight")


def teacher_identity(record: dict) -> dict:
    """The part of a bootstrap's identity that shapes its teacher, flat: the bootstrap settings (no student-only
    ones) beside the train split's settings and the prompt modes."""
    config = {k: v for k, v in record["config"].items() if k not in STUDENT_ONLY}
    return {**config, **{k: record[k] for k in ("task", "prompt_mode", "refine_mode")}}


def identity_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def models_hash(dirs: dict[str, str]) -> str:
    """sha256 over the teacher's and the student's weight files: what a run records and checks on resume."""
    h = hashlib.sha256()
    for role in ROLES:
        with open(os.path.join(dirs[role], "model.safetensors"), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _complete(directory: str, record: dict) -> dict[str, str] | None:
    """The folders of a finished bootstrap in ``directory`` made with exactly ``record``, else None."""
    saved = read_manifest(directory)
    dirs = {role: os.path.join(directory, role) for role in ROLES}
    if saved is None or {k: saved.get(k) for k in record} != record:
        return None
    if not all(os.path.isfile(os.path.join(d, "model.safetensors")) for d in dirs.values()):
        return None
    return dirs


def reusable_teacher(source: str, record: dict) -> str:
    """The teacher folder of the finished bootstrap in ``source``, checked to have been trained with the teacher
    settings of ``record`` (else a ConfigError naming bootstrap.teacher_from and the settings that differ)."""
    saved = read_manifest(source)
    folder = os.path.join(source, "teacher")
    if saved is None or not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise ConfigError("bootstrap.teacher_from", f"{source!r} is not a finished bootstrap (its {MANIFEST} and "
                                                    f"teacher/model.safetensors)")
    want, have = teacher_identity(record), teacher_identity(saved)
    if want != have:
        differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise ConfigError("bootstrap.teacher_from", f"the teacher in {source!r} was trained with other teacher "
                                                    f"settings: {', '.join(differ)}")
    return folder


def bootstrap(task: ArithmeticTask, tok: Tokenizer, cfg: BootstrapConfig, directory: str, *,
              prompt_mode: str = "chat", refine_mode: str = "chat", from_scratch: bool = False,
              teacher_from: str = "") -> dict[str, str]:
    """The teacher's and the student's folders: {"teacher": dir, "student": dir, "identity": hash,
    "models_sha256": hash, "source": "shipped" | "cache" | "trained"}.

    Unless ``from_scratch``, the models shipped in the package (SHIPPED_DIR) are used when they were made
    with these exact settings. Otherwise they are trained here, or reused from an earlier training, in
    ``directory/<identity hash>/``: a bootstrap with other settings gets its own folder and never overwrites
    one that other runs point at. ``teacher_from``: a finished bootstrap folder whose teacher, trained with the
    same teacher settings (checked), is copied instead of training one: a bootstrap that changes only the
    student's settings costs the student's SFT alone."""
    record = identity(task, cfg, prompt_mode=prompt_mode, refine_mode=refine_mode)
    key = identity_hash(record)
    reused = reusable_teacher(teacher_from, record) if teacher_from else None
    found = None if from_scratch else _complete(SHIPPED_DIR, record)
    source = "shipped"
    if found is None:
        home, source = os.path.join(directory, key), "cache"
        found = _complete(home, record)
    if found is None:
        found, source = train_bootstrap(task, tok, cfg, home, record, prompt_mode=prompt_mode,
                                        refine_mode=refine_mode, teacher=reused), "trained"
    log.info("bootstrap %s: the teacher and student in %s (%s)", key, os.path.dirname(found["teacher"]), source)
    return {**found, "identity": key, "models_sha256": models_hash(found), "source": source}


def train_bootstrap(task: ArithmeticTask, tok: Tokenizer, cfg: BootstrapConfig, directory: str, record: dict, *,
                    prompt_mode: str, refine_mode: str, teacher: str | None = None) -> dict[str, str]:
    """Trains the teacher and the student by SFT into ``directory`` (manifest written last, atomically);
    ``teacher``: a folder holding a teacher trained with these settings, copied instead of training it."""
    dirs = {role: os.path.join(directory, role) for role in ROLES}
    os.makedirs(directory, exist_ok=True)
    timings, extra = {}, {}
    phases = {"teacher": (cfg.teacher, cfg.teacher_solve_steps, cfg.teacher_mixed_steps),
              "student": (cfg.student, cfg.student_solve_steps, cfg.student_mixed_steps)}
    for i, (role, (shape, solve_steps, mixed_steps)) in enumerate(phases.items()):
        start = time.perf_counter()
        if role == "teacher" and teacher is not None:
            shutil.rmtree(dirs[role], ignore_errors=True)
            shutil.copytree(teacher, dirs[role])
            extra["teacher_from"] = os.path.abspath(os.path.dirname(teacher))
            timings[role] = time.perf_counter() - start
            log.info("bootstrap: teacher copied from %s", teacher)
            continue
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
    atomic_write_json(os.path.join(directory, MANIFEST), {**record, "seconds": timings, **extra})
    return dirs
