"""The error of stored top-k targets on the embedded default (docs/offline.md): for a few steps of TRD's batches,
the (k + 1)-bucket forward KL (trd_jax/offline/topk.py) against the full-vocabulary forward KL between the
initial student and the teacher, per k.

    python -m trd_jax.experiments.topk_error --workdir runs/topk_error [--steps 4] [--ks 1,2,4,8,16,32,64]

Prints a Markdown table (mean full KL, mean top-k KL, relative error of the mean, the worst position's
absolute error, the teacher's mean tail mass) and writes it to --out (default docs/offline_topk_error.md).
"""

from __future__ import annotations

import argparse
import logging

import jax.numpy as jnp
import numpy as np

from trd_jax import losses
from trd_jax.metrics import atomic_write_text
from trd_jax.offline.topk import teacher_topk, topk_divergence
from trd_jax.recipes import apply_overrides, default_config


def measure(workdir: str, steps: int, ks: list[int]) -> str:
    from trd_jax.controller import Trainer

    cfg = apply_overrides(default_config(), {"eval.initial": False, "eval.teacher": False, "log.diagnostics": False,
                                             "log.progress": False, "train.steps": steps})
    trainer = Trainer(cfg, workdir)
    s = trainer.s
    sums = {k: [] for k in ks}
    full, tails = [], {k: [] for k in ks}
    data = trainer.task.prompt_iterator(s.seed)
    vocab = None
    for step in range(steps):
        t = trainer.distill_targets(step, data.next(s.train.batch_size), {})
        mask = jnp.asarray(t.batch.response_mask)
        student = trainer._score("student", trainer._student_params(), t.batch.student, t.batch.targets, mask)
        s_head = _student_head(trainer)
        t_head = trainer.roles.teacher_head(t.teacher_params)
        vocab = int(t_head.shape[1])
        exact = losses.fused_divergence("forward_kl", student.hidden, s_head, t.scored.hidden, t_head,
                                        temperature=s.loss.temperature, mask=mask, chunk_size=s.loss.chunk_size)
        m = np.asarray(mask)
        full.append(np.asarray(exact)[m])
        for k in ks:
            kk = min(k, vocab)
            targets = teacher_topk(t.scored.hidden, t_head, t.batch.targets, mask, k=kk,
                                   temperature=s.loss.temperature, chunk_size=s.loss.chunk_size)
            approx = topk_divergence("forward_kl", student.hidden, s_head, targets, mask=mask,
                                     temperature=s.loss.temperature, chunk_size=s.loss.chunk_size)
            sums[k].append(np.asarray(approx)[m])
            tails[k].append(np.exp(np.asarray(targets.tail)[m]))
    full_all = np.concatenate(full)
    lines = [f"Stored top-k targets on the embedded default: forward KL of the initial student against the teacher "
             f"on {steps} TRD batches ({full_all.size} response positions, vocabulary {vocab}, loss temperature "
             f"{s.loss.temperature}).", "",
             "| k | mean full KL | mean top-k KL | error of the mean | worst position | teacher tail mass (mean) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for k in ks:
        approx = np.concatenate(sums[k])
        worst = float(np.max(np.abs(approx - full_all)))
        rel = (full_all.mean() - approx.mean()) / full_all.mean()
        lines.append(f"| {min(k, vocab)} | {full_all.mean():.5f} | {approx.mean():.5f} | {rel:.2%} | {worst:.2e} | "
                     f"{np.concatenate(tails[k]).mean():.2e} |")
    return "\n".join(lines) + "\n"


def _student_head(trainer):
    from flax import nnx

    return nnx.merge(trainer.roles.student_graph, trainer._student_params()).lm_head_weight()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ks", default="1,2,4,8,16,32,64")
    p.add_argument("--out", default="docs/offline_topk_error.md")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    table = measure(a.workdir, a.steps, [int(k) for k in a.ks.split(",")])
    atomic_write_text(a.out, "# Top-k targets: the approximation's error\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
