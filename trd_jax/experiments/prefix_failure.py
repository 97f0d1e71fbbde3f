"""Prefix failure, measured: how the teacher's next-token distribution behaves on student rollouts after
their first wrong step, against rollouts without one, and how training on the teacher's rewrites y_r
changes the per-token signal.

    python -m trd_jax.experiments.prefix_failure --workdir DIR [--setting opd] [--prompts 256]

Uses the embedded task's bootstrap (DIR/bootstrap, trained if missing). For each student rollout y_o the
first wrong step is located by the task's checker; the teacher (vanilla context) scores every token, and
its entropy and top-2 mass gap are averaged per line, relative to the line of the first wrong step.
The advantage sign-flip rate (consecutive tokens whose log q - log p change sign) is compared on y_o and
on the rewrites y_r of the same rows, scored in the teacher context the default TRD run uses (vanilla).
Writes DIR/prefix_failure.md and DIR/prefix_failure.png.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import numpy as np

from trd_jax import diagnostics, trajectories
from trd_jax.data.arithmetic import first_error
from trd_jax.experiments import one_step
from trd_jax.layouts import distill_batch
from trd_jax.recipes import apply_overrides, method_config, parse_overrides

OFFSETS = range(-2, 4)  # lines relative to the first wrong step


def _line_index(tokens: list[int], newline_id: int) -> np.ndarray:
    """Line number of each response token (a newline belongs to the line it ends)."""
    out, line = [], 0
    for t in tokens:
        out.append(line)
        if t == newline_id:
            line += 1
    return np.array(out, int)


def _teacher_tokens(trainer, prompts, responses, contexts):
    batch = distill_batch(prompts, responses, contexts, pad_id=trainer.tok.pad_id)
    params = trainer._teacher_params()
    teacher = trainer._score("teacher", params, batch.teacher, batch.targets, batch.response_mask)
    student = trainer._score("student", trainer.state.params, batch.student, batch.targets, batch.response_mask)
    head = trainer.roles.teacher_head(params)
    stats = jax.device_get(trainer.scorer.stats_fn(teacher.hidden, head, batch.targets, batch.response_mask,
                                             chunk_size=64, temperature=1.0))
    adv = np.asarray(teacher.logp) - np.asarray(student.logp)
    return stats, adv, batch.response_mask


def measure(workdir: str, setting: str, prompts: int, seed: int, overrides: dict | None = None) -> dict:
    from trd_jax.controller import Trainer

    cfg = method_config("trd_vanilla_context", setting, seed)  # the default recipe's TRD
    apply_overrides(cfg, {"bootstrap.dir": os.path.join(workdir, "bootstrap"), "log.progress": False,
                          "train.batch_size": prompts, **(overrides or {})})
    trainer = Trainer(cfg, os.path.join(workdir, f"prefix_failure_{setting}"))
    tok, task, s = trainer.tok, trainer.task, trainer.s
    # TRD's step: the rollouts, and the teacher's rewrites of them for the sign flips on y_r below.
    examples, x, rows = one_step.rollouts_and_rewrites(trainer, prompts, seed)
    y_o = rows.y_o
    texts = [tok.decode(r, skip_special_tokens=True) for r in y_o]
    errors = [first_error(t, task.problem_of(ex)) for t, ex in zip(texts, examples)]
    vanilla = trajectories.vanilla_contexts(tok, examples, x, mode=setting, task_kind=task.kind,
                                            prompt_mode=s.task.prompt_mode)
    stats, adv_o, mask_o = _teacher_tokens(trainer, x, y_o, vanilla)
    newline = tok.encode("\n")[0]
    # Per line: the largest entropy and the smallest top-2 gap over its tokens. The choice between
    # repairing and continuing falls on one token per line (the carried value), which a mean over the
    # line's ~9 tokens would dilute.
    keys = ("entropy", "top2_gap")
    by_offset = {"flawed": {d: {k: [] for k in keys} for d in OFFSETS}}
    correct_lines = {k: [] for k in keys}
    for b, err in enumerate(errors):
        lines = _line_index(y_o[b], newline)
        n = len(y_o[b])
        ent, gap = stats.entropy[b, :n], stats.top2_gap[b, :n]
        for line in np.unique(lines):
            sel = lines == line
            worst = {"entropy": float(ent[sel].max()), "top2_gap": float(gap[sel].min())}
            if err is None:
                target = correct_lines
            elif line - err in by_offset["flawed"]:
                target = by_offset["flawed"][line - err]
            else:
                continue
            for k in keys:
                target[k].append(worst[k])
    # Sign flips of per-token advantages on y_o and on the rewrites y_r of the same rows.
    kept = [b for b, src in enumerate(rows.sources) if src == "y_r"]
    trajectories.choose_teacher_contexts(rows, vanilla, s.distill.teacher_context)  # as the TRD run trains
    _, adv_r, mask_r = _teacher_tokens(trainer, [x[b] for b in kept], [rows.responses[b] for b in kept],
                                       [rows.teacher_contexts[b] for b in kept])
    flawed = np.array([e is not None for e in errors])
    kept_flawed = flawed[kept]
    return {
        "setting": setting, "rollouts": len(y_o), "flawed": int(flawed.sum()),
        "accuracy_y_o": float(rows.y_o_reward.mean()), "accuracy_y_r": float(rows.y_r_reward.mean()),
        "by_offset": {d: {k: float(np.mean(v)) if v else float("nan") for k, v in m.items()}
                      for d, m in by_offset["flawed"].items()},
        "correct": {k: float(np.mean(v)) for k, v in correct_lines.items()},
        "sign_flips": {
            "y_o flawed": diagnostics.sign_flip_rate(adv_o[flawed], mask_o[flawed]),
            "y_o correct": diagnostics.sign_flip_rate(adv_o[~flawed], mask_o[~flawed]),
            "y_r of flawed y_o": diagnostics.sign_flip_rate(adv_r[kept_flawed], mask_r[kept_flawed]),
            "y_r of correct y_o": diagnostics.sign_flip_rate(adv_r[~kept_flawed], mask_r[~kept_flawed]),
        },
    }


def report(results: list[dict]) -> str:
    lines = ["# Prefix failure on the embedded task", ""]
    for r in results:
        lines += [f"## {r['setting'].upper()}: {r['rollouts']} student rollouts, {r['flawed']} with a wrong step "
                  f"(accuracy y_o {100 * r['accuracy_y_o']:.1f}%, y_r {100 * r['accuracy_y_r']:.1f}%)", "",
                  "Teacher (vanilla context) on y_o, per line relative to the first wrong step (0 = the line with "
                  "the error): the line's largest token entropy and smallest top-2 mass gap, averaged over rollouts:",
                  "", "| line | max teacher entropy (nats) | min top-2 mass gap |", "|---|---|---|"]
        for d, m in r["by_offset"].items():
            lines.append(f"| {d:+d} | {m['entropy']:.3f} | {m['top2_gap']:.3f} |")
        c = r["correct"]
        lines += [f"| rollouts without error (every line) | {c['entropy']:.3f} | {c['top2_gap']:.3f} |", "",
                  "Sign-flip rate of per-token advantages log q - log p (consecutive tokens of opposite sign):", "",
                  "| trajectory | sign flips |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r["sign_flips"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        offsets = list(r["by_offset"])
        for ax, key, label in ((axes[0], "entropy", "largest token entropy of the line (nats)"),
                                (axes[1], "top2_gap", "smallest top-2 mass gap of the line")):
            ax.plot(offsets, [r["by_offset"][d][key] for d in offsets], marker="o",
                    label=f"{r['setting']}: rollouts with an error")
            ax.axhline(r["correct"][key], ls="--", color=ax.lines[-1].get_color(),
                       label=f"{r['setting']}: rollouts without error")
            ax.set(xlabel="line relative to the first wrong step", ylabel=label)
            ax.axvline(0, color="grey", lw=0.8)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = one_step.parser(__doc__, "config override, e.g. --set bootstrap.repair_fraction=0 (a teacher that never "
                                    "repairs; JSON value)").parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.set)
    results = [measure(args.workdir, s, args.prompts, args.seed, overrides)
               for s in args.settings.split(",")]
    text = report(results)
    with open(os.path.join(args.workdir, "prefix_failure.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(args.workdir, "prefix_failure.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
