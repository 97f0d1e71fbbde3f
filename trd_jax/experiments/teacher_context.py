"""What the teacher's context does to TRD's targets: the same rewrites y_r scored under the refine prompt that
produced them (the paper's `trd`, [code-trd]) and under the teacher's vanilla context (`trd_vanilla_context`).

    python -m trd_jax.experiments.teacher_context --workdir DIR [--settings opd,opsd] [--prompts 256]

On the embedded task's bootstrap (the shipped one unless --set says otherwise), one batch of student rollouts y_o
is rewritten by the teacher (OPD) or the student shown the reference (OPSD), exactly as a TRD step does. Every
token of every y_r is then scored by the teacher in both contexts, and by the student, and compared position by
position with y_o (a rewrite keeps the attempt's line structure, so position i of y_r faces position i of y_o):

- `kept`: positions before the rewrite's first departure from y_o;
- `edit`: positions where y_r's token differs from y_o's (the teacher corrected the attempt there);
- `after`: positions after the first departure where the tokens agree again.

Per class and context: the teacher's probability of the y_r token (the target), of the y_o token at an edit (the
student's own mistake), its entropy, and the forward KL KL(q || p) the student is trained on at the first step;
and, per token, how far apart the two contexts' distributions are. Forward KL's gradient on the student's logits
is p - q, so a context whose q keeps mass on the y_o token at an edit pushes the student towards its own mistake.
Writes DIR/teacher_context.md and DIR/teacher_context.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

from trd_jax import trajectories
from trd_jax.experiments import one_step
from trd_jax.layouts import distill_batch
from trd_jax.recipes import apply_overrides, method_config, parse_overrides
from trd_jax.roles import _lm_head

CLASSES = ("kept", "edit", "after")
CONTEXTS = ("refine", "vanilla")
# Per position class and context; the y_o ones at edits only.
METRICS = ("p_target", "uncertain", "p_y_o", "p_student_y_o", "entropy", "fkl", "argmax_target", "argmax_y_o")
UNCERTAIN = 0.9  # q(target) under this: a position the teacher hesitates at (HEADER says 0.9 too)


def _log_probs(trainer, side: str, params, head, prompts, responses, contexts=None) -> tuple[np.ndarray, np.ndarray]:
    """(log q f32[B, R, V] of every response position, response mask bool[B, R]) of one side in one layout."""
    batch = distill_batch(prompts, responses, contexts, pad_id=trainer.tok.pad_id)
    out = trainer._score(side, params, batch.teacher if side == "teacher" else batch.student, batch.targets,
                         batch.response_mask)
    z = np.einsum("brd,dv->brv", np.asarray(out.hidden, np.float32), np.asarray(head, np.float32))
    z = z / trainer.s.loss.temperature
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True)), np.asarray(batch.response_mask)


def position_classes(y_o: list[int], y_r: list[int]) -> np.ndarray:
    """For each position of y_r: 0 kept (before the first departure from y_o), 1 edit (a token unlike y_o's at
    that position, or past y_o's end), 2 after (agreeing again after the first departure)."""
    out = np.zeros(len(y_r), int)
    departed = False
    for i, t in enumerate(y_r):
        same = i < len(y_o) and y_o[i] == t
        departed = departed or not same
        out[i] = 0 if not departed else (2 if same else 1)
    return out


def measure(workdir: str, setting: str, prompts: int, seed: int, overrides: dict | None = None,
            student: str | None = None) -> dict:
    """student: a trained student's Hugging Face folder (e.g. a run's export/) in place of the bootstrap's, OPD only
    (in OPSD the student is its own teacher, which would change too)."""
    from flax import nnx

    from trd_jax.controller import Trainer
    from trd_jax.models.hf_io import load_hf

    if student and setting != "opd":
        raise ValueError(f"--student: OPD only, not {setting!r} (OPSD's teacher is the student itself)")

    cfg = method_config("trd", setting, seed)
    apply_overrides(cfg, {"log.progress": False, "train.batch_size": prompts, **(overrides or {})})
    trainer = Trainer(cfg, os.path.join(workdir, f"teacher_context_{setting}"))
    if student:
        trainer.state = trainer.state._replace(params=nnx.split(load_hf(student))[1])
    tok, task, s = trainer.tok, trainer.task, trainer.s
    examples, x, rows = one_step.rollouts_and_rewrites(trainer, prompts, seed)
    y_o, teacher_params = rows.y_o, trainer._teacher_params()
    kept = [b for b, src in enumerate(rows.sources) if src == "y_r"]
    vanilla = trajectories.vanilla_contexts(tok, examples, x, mode=setting, task_kind=task.kind,
                                            prompt_mode=s.task.prompt_mode)
    xs, ys = [x[b] for b in kept], [rows.responses[b] for b in kept]
    head_t = trainer.roles.teacher_head(teacher_params)
    logq = {"refine": _log_probs(trainer, "teacher", teacher_params, head_t, xs, ys,
                                 [rows.refine_prompts.ids[b] for b in kept])[0],
            "vanilla": _log_probs(trainer, "teacher", teacher_params, head_t, xs, ys, [vanilla[b] for b in kept])[0]}
    logp, mask = _log_probs(trainer, "student", trainer.state.params,
                            _lm_head(trainer.roles.student_graph, trainer.state.params), xs, ys)
    y_r_right = trajectories.grade(task, tok, ys, [examples[b] for b in kept])
    per_class = {k: {c: {m: [] for m in METRICS} for c in CONTEXTS} for k in CLASSES}
    counts = {k: 0 for k in CLASSES}
    between = {k: [] for k in CLASSES}  # KL(q_vanilla || q_refine) per position
    doubts = {c: [] for c in CONTEXTS}  # (q(target), row, position, top other token) where the teacher doubts most
    p = np.exp(logp)
    for i, b in enumerate(kept):
        yr, yo = list(rows.responses[b]), list(rows.y_o[b])
        cls = position_classes(yo, yr)
        for t, k in enumerate(cls):
            if not mask[i, t]:
                continue
            name = CLASSES[k]
            counts[name] += 1
            between[name].append(float(np.sum(np.exp(logq["vanilla"][i, t]) * (logq["vanilla"][i, t]
                                                                             - logq["refine"][i, t]))))
            for c in CONTEXTS:
                lq = logq[c][i, t]
                q = np.exp(lq)
                m = per_class[name][c]
                m["p_target"].append(q[yr[t]])
                m["uncertain"].append(float(q[yr[t]] < UNCERTAIN))
                m["entropy"].append(float(-(q * lq).sum()))
                m["fkl"].append(float((q * (lq - logp[i, t])).sum()))
                m["argmax_target"].append(float(np.argmax(lq) == yr[t]))
                if q[yr[t]] < UNCERTAIN:
                    other = np.where(np.arange(q.size) == yr[t], -1.0, q).argmax()
                    doubts[c].append((float(q[yr[t]]), i, t, int(other), float(q[other])))
                if name == "edit" and t < len(yo):
                    m["p_y_o"].append(q[yo[t]])
                    m["p_student_y_o"].append(p[i, t, yo[t]])
                    m["argmax_y_o"].append(float(np.argmax(lq) == yo[t]))

    def shown(i, t, other):  # the line up to the position, the target and the teacher's other choice
        text = tok.decode(ys[i][:t], skip_special_tokens=True).split("\n")[-1]
        return {"line_so_far": text, "target": tok.decode([ys[i][t]]), "other": tok.decode([other]), "position": t}

    mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
    return {
        "setting": setting, "student": student or "bootstrap", "rollouts": len(y_o), "rewritten": len(kept),
        "accuracy_y_o": float(rows.y_o_reward.mean()), "accuracy_y_r": float(np.mean(y_r_right)),
        "identical_rewrites": int(sum(list(rows.responses[b]) == list(rows.y_o[b]) for b in kept)),
        "positions": counts,
        "contexts": {k: {c: {m: mean(v) for m, v in per_class[k][c].items()} for c in CONTEXTS} for k in CLASSES},
        "kl_vanilla_refine": {k: mean(v) for k, v in between.items()},
        "doubts": {c: [{"q_target": d[0], "q_other": d[4], **shown(d[1], d[2], d[3])} for d in sorted(doubts[c])[:8]]
                   for c in CONTEXTS},
    }


HEADER = ("| positions | context | q(y_r token) | q(y_r token) < 0.9 | argmax = y_r token | q(y_o token) at edits "
          "| argmax = y_o token | p(y_o token), student | teacher entropy (nats) | forward KL (nats) |")


def _row(name: str, count: int, context: str, m: dict) -> str:
    at_edit = [f"{m[key]:.3f}" if name == "edit" else "" for key in ("p_y_o", "argmax_y_o", "p_student_y_o")]
    cells = [f"{name} ({count})", context, *(f"{m[key]:.3f}" for key in ("p_target", "uncertain", "argmax_target")),
             *at_edit, f"{m['entropy']:.3f}", f"{m['fkl']:.3f}"]
    return "| " + " | ".join(cells) + " |"


def report(results: list[dict]) -> str:
    lines = ["# The teacher's context on TRD's targets", "",
             "The same rewrites y_r scored by the teacher under the refine prompt that produced them (`trd`) and in "
             "its vanilla context (`trd_vanilla_context`), against the student's rollouts y_o position by position "
             "(`python -m trd_jax.experiments.teacher_context`). q: the teacher's next-token distribution; p: the "
             "student's; forward KL is KL(q || p), the loss at the first step. Positions: `kept` before the "
             "rewrite's first departure from y_o, `edit` where y_r's token differs from y_o's, `after` agreeing "
             "again after the first departure.", ""]
    for r in results:
        lines += [f"## {r['setting'].upper()}, student {r['student']}: {r['rewritten']} rewrites of "
                  f"{r['rollouts']} rollouts (y_o right {100 * r['accuracy_y_o']:.1f}%, y_r right "
                  f"{100 * r['accuracy_y_r']:.1f}%, {r['identical_rewrites']} rewrites identical to their y_o)", "",
                  HEADER, "|---|---|" + "---:|" * 8]
        lines += [_row(k, r["positions"][k], c, r["contexts"][k][c]) for k in CLASSES for c in CONTEXTS]
        lines += ["", "KL(q_vanilla || q_refine) per position (nats): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["kl_vanilla_refine"].items()), ""]
        for c in CONTEXTS:
            shown = "; ".join(f"`{d['line_so_far']}` -> `{d['target']}` {d['q_target']:.2f} / `{d['other']}` "
                              f"{d['q_other']:.2f}" for d in r["doubts"][c][:5])
            lines += [f"Where the {c}-context teacher doubts the target most (line so far -> target q / its other "
                      f"choice q): {shown or 'nowhere'}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = one_step.parser(__doc__, "config override (JSON value), e.g. --set bootstrap.dir=DIR")
    parser.add_argument("--student", action="append", default=[], metavar="DIR",
                        help="also measure with this trained student (a Hugging Face folder, e.g. a run's export/; OPD "
                             "only); repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.set)
    results = [measure(args.workdir, s, args.prompts, args.seed, overrides) for s in args.settings.split(",")]
    results += [measure(args.workdir, "opd", args.prompts, args.seed, overrides, student) for student in args.student]
    text = report(results)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "teacher_context.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.workdir, "teacher_context.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
