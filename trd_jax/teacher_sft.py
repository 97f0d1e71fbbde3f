"""OPD's teacher made here: the teacher model (e.g. SmolLM2-135M-Instruct) fine-tuned on a local math task's
reference solutions and on TRD's refine prompts, so that it both solves better than the student and rewrites
a flawed attempt into a correct one close to it (TRD_SPEC §3c).

Refine examples pair the OPD refine prompt over an attempt with the reference solution as the rewrite. The
attempts are the reference itself (a share `correct_attempt_rate`: a correct attempt is kept as it is) or
the reference with one computed result changed and the wrong value carried into every later line, the
prefix failure a rewrite must repair; the reference is then the attempt with its error fixed.

Like the embedded bootstrap, the result is cached in `teacher_sft.dir/<settings hash>` (manifest written
last) and reused whenever the base weights, the train split and these settings match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time

import numpy as np

from trd_jax import multihost
from trd_jax.config import ConfigError, ModelSource, Settings, TeacherSFTConfig
from trd_jax.bootstrap import identity_hash
from trd_jax.metrics import atomic_write_json
from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.prompts import refine_prompt_text
from trd_jax.sft import SFTSet, train_sft
from trd_jax.tokenization import Tokenizer

log = logging.getLogger(__name__)
MANIFEST = "teacher_sft.json"
_RESULT = re.compile(r"=\s*(\d+)")


def flawed_attempt(solution: str, rng: np.random.Generator) -> str:
    """`solution` with one computed result ("= 17") off by 1 to 3, the wrong value replacing that result and
    every later occurrence of it (the boxed answer included). A solution without "= N" gets its numbers' last
    one changed."""
    results = list(_RESULT.finditer(solution))
    if results:
        m = results[int(rng.integers(len(results)))]
        start, value = m.start(1), int(m.group(1))
    else:
        numbers = list(re.finditer(r"\d+", solution))
        if not numbers:
            raise ValueError(f"no number to corrupt in the reference solution {solution[:80]!r}")
        start, value = numbers[-1].start(), int(numbers[-1].group())
    wrong = value + int(rng.choice([-3, -2, -1, 1, 2, 3]))
    wrong = wrong if wrong >= 0 else value + 1
    later = re.sub(rf"(?<!\d){value}(?!\d)", str(wrong), solution[start:])
    return solution[:start] + later


def sft_sets(examples, tok: Tokenizer, cfg: TeacherSFTConfig, *, task_kind: str, prompt_mode: str,
             refine_mode: str) -> list[SFTSet]:
    """The solve set (x -> y*, x as the student sees it) and the refine set (refine prompt -> y*)."""
    rng = np.random.default_rng([cfg.seed, 7])
    usable = [ex for ex in examples if ex.reference and ex.reference.strip()]
    if not usable:
        raise ValueError("teacher SFT needs reference solutions in the train split; it has none")
    eos = dict(append_eos=True)
    solve_x = [tok.encode_prompt(ex.prompt(), prompt_mode) for ex in usable]
    refs = [ex.reference.strip() for ex in usable]
    y = [tok.encode_response(r, **eos) for r in refs]
    attempts = [r if rng.random() < cfg.correct_attempt_rate else flawed_attempt(r, rng) for r in refs]
    refine_x = [tok.encode_prompt(refine_prompt_text(ex.problem, a, mode="opd", task=task_kind), refine_mode)
                for ex, a in zip(usable, attempts)]
    return [SFTSet("solve", solve_x, y, 1.0), SFTSet("refine_opd", refine_x, y, cfg.refine_weight)]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def identity(base_dir: str, examples, cfg: TeacherSFTConfig, *, prompt_mode: str, refine_mode: str) -> dict:
    """What shapes the teacher: its base weights, the train split's texts (with any worked examples), the SFT
    settings and the prompt renderings."""
    texts = json.dumps([[ex.problem, ex.reference, ex.shots] for ex in examples]).encode()
    return {"base_sha256": _file_sha256(os.path.join(base_dir, "model.safetensors")),
            "train_sha256": hashlib.sha256(texts).hexdigest(), "config": dataclasses.asdict(cfg),
            "prompt_mode": prompt_mode, "refine_mode": refine_mode}


def build_teacher(base_dir: str, examples, tok: Tokenizer, cfg: TeacherSFTConfig, directory: str, *,
                  task_kind: str, prompt_mode: str, refine_mode: str) -> dict:
    """The fine-tuned teacher's folder, trained here or reused: {"path", "identity", "source", "seconds"}."""
    examples = list(examples)
    record = identity(base_dir, examples, cfg, prompt_mode=prompt_mode, refine_mode=refine_mode)
    key = identity_hash(record)
    home = os.path.join(directory, key)
    manifest = os.path.join(home, MANIFEST)
    if os.path.isfile(manifest) and os.path.isfile(os.path.join(home, "model.safetensors")):
        with open(manifest) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in record} == record:
            log.info("teacher SFT %s: reusing %s", key, home)
            return {"path": home, "identity": key, "source": "cache", "seconds": saved.get("seconds")}
    start = time.perf_counter()
    sets = sft_sets(examples, tok, cfg, task_kind=task_kind, prompt_mode=prompt_mode, refine_mode=refine_mode)
    losses: dict[int, dict[str, float]] = {}

    def on_log(step: int, m: dict[str, float]) -> None:
        losses[step] = {k: round(v, 4) for k, v in m.items()}
        log.info("teacher SFT step %d/%d: %s", step, cfg.steps, losses[step])

    model = train_sft(load_hf(base_dir, dtype="float32"), sets, steps=cfg.steps, batch_tokens=cfg.batch_tokens,
                      learning_rate=cfg.learning_rate, seed=cfg.seed, warmup_steps=max(1, cfg.steps // 10),
                      on_log=on_log, log_every=max(1, cfg.steps // 10))
    save_hf(model, home, tokenizer_dir=base_dir)
    seconds = time.perf_counter() - start
    atomic_write_json(manifest, {**record, "seconds": seconds, "losses": losses,
                                 "examples": {s.name: len(s.contexts) for s in sets}})
    log.info("teacher SFT %s: trained in %.0f s into %s", key, seconds, home)
    return {"path": home, "identity": key, "source": "trained", "seconds": seconds}


def teacher_source(s: Settings, teacher: ModelSource, task, tok: Tokenizer, workdir: str) -> tuple[ModelSource, dict]:
    """OPD's teacher fine-tuned per s.teacher_sft (built by process 0, reused by the others): (the teacher's new
    source, the record kept in summary.json)."""
    if teacher.source != "path":
        raise ConfigError("teacher.source", "teacher_sft fine-tunes a pretrained model: give teacher.path or "
                                            "teacher.source='smollm2'")
    directory = s.teacher_sft_dir or os.path.join(workdir, "teacher_sft")
    record = multihost.process0_first("teacher-sft-written", lambda: build_teacher(
        teacher.path, task.split("train"), tok, s.teacher_sft, directory, task_kind=task.kind,
        prompt_mode=s.task.prompt_mode, refine_mode=s.refine.prompt_mode))
    return dataclasses.replace(teacher, path=record["path"]), record
