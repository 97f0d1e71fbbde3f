"""What the one-step experiments (prefix_failure, teacher_context) share: one TRD step's rollouts y_o and the
teacher's rewrites y_r of them, sampled as a run samples them, and their common command-line options."""

from __future__ import annotations

import argparse

import jax

from trd_jax import trajectories
from trd_jax.phase_sampling import sample_rows


def rollouts_and_rewrites(trainer, prompts: int, seed: int) -> tuple[list, list[list[int]], trajectories.StepRows]:
    """(examples, their prompt ids x, the step's rows): `prompts` training prompts, one rollout each from the
    trainer's student, refined by its teacher (rows.y_r graded into rows.y_r_reward); keys from `seed`."""
    tok, task, s = trainer.tok, trainer.task, trainer.s
    examples = trainer.data.next(prompts)
    x = trajectories.encode_prompts(tok, examples, s.task.prompt_mode, s.task.max_prompt_tokens)
    key_o, key_r = jax.random.split(jax.random.key(seed))
    y_o = sample_rows(s, trainer.rollout_sampler, trainer.state.params, x, s.rollout.max_new, s.rollout.sampling, 1,
                      key_o)
    rows = trajectories.StepRows(list(examples), x, y_o, trajectories.grade(task, tok, y_o, examples),
                                 trajectories.capped(y_o, tok.eos_ids, s.rollout.max_new))
    teacher_params = trainer._teacher_params()
    trajectories.refine(rows, tok, s.refine, lambda ids, drafts: sample_rows(
        s, trainer.refine_sampler, teacher_params, ids, s.refine.rewrite_budget, s.refine_sampling, 1, key_r,
        drafts=drafts if s.refine.speculative else None, draft_tokens=s.refine.draft_tokens))
    rows.y_r_reward = trajectories.grade(task, tok, rows.y_r, [examples[b] for b in rows.refine_prompts.generate_rows])
    return examples, x, rows


def parser(doc: str, set_help: str) -> argparse.ArgumentParser:
    """--workdir, --settings, --prompts, --seed and --set, as both experiments take them."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--settings", default="opd,opsd")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    return p
