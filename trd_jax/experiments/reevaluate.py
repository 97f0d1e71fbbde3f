"""A reproduction's finished runs evaluated again on more held-out problems, without training again.

The bootstrap does not depend on the eval split, and the split is drawn in a fixed order (a larger
task.eval_size extends it), so each run's kept student (export/) can be evaluated on N problems with the run's
own settings and evaluation keys: its first problems get exactly the samples the run's own evaluation drew (checked
and recorded as `matches_original`), the rest are new. The shared evaluations (the initial student, the teachers)
are extended the same way. `reproduce --reevaluate N` writes each run's in <run>/reeval-N.json and reports results
from them; the half-width of a mean Avg@n is bounded below by the problems' own spread, about 2.3 points at 512
problems for these students (docs/reproduction/budget.md).
"""

from __future__ import annotations

import json
import os
import tempfile

from trd_jax.metrics import atomic_write_json

REEVAL = "reeval-{problems}.json"


def reeval_path(run: str, problems: int) -> str:
    return os.path.join(run, REEVAL.format(problems=problems))


def _overrides(problems: int) -> dict:
    return {"task.eval_size": problems, "eval.num_problems": problems, "train.steps": 0,
            "eval.initial": False, "eval.teacher": False, "export.enabled": False, "log.progress": False}


def _prefix_matches(new: dict, old: dict | None) -> bool | None:
    """Whether the new evaluation's first problems have the original evaluation's correct counts (None: no
    original counts to compare)."""
    counts = (old or {}).get("correct_counts")
    if counts is None:
        return None
    return list(new["correct_counts"][:len(counts)]) == list(counts)


def reevaluate(run: str, cfg, problems: int, step: int, original: dict | None, *, reference: bool) -> dict:
    """Evaluates a run's kept student (or, reference=True, the bootstrap's initial student and the setting's
    teacher) on `problems` held-out problems with the run's config `cfg` (built as the run was); writes and
    returns <run>/reeval-N.json. original: the run's summary, to check the shared problems against."""
    from flax import nnx

    from trd_jax.controller import Trainer
    from trd_jax.models.hf_io import load_hf
    from trd_jax.recipes import apply_overrides

    path = reeval_path(run, problems)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    apply_overrides(cfg, _overrides(problems))
    with tempfile.TemporaryDirectory(dir=run) as scratch:
        trainer = Trainer(cfg, scratch)
        if reference:
            out = {"initial_eval": trainer.evaluate(0), "teacher_eval": trainer.evaluate(0, teacher=True)}
            checks = [_prefix_matches(out[k], (original or {}).get(k)) for k in ("initial_eval", "teacher_eval")]
        else:
            params = nnx.split(load_hf(os.path.join(run, "export")))[1]
            out = {"final_eval": trainer.evaluate(step, params)}
            checks = [_prefix_matches(out["final_eval"], (original or {}).get("final_eval"))]
    known = [c for c in checks if c is not None]
    out.update(problems=problems, matches_original=all(known) if known else None)
    atomic_write_json(path, out)
    return out


def substitute(summary: dict, reeval: dict) -> dict:
    """The run's summary with its evaluations replaced by the re-evaluation's (broadening recomputed from the
    re-evaluated initial student by the aggregation)."""
    out = {k: v for k, v in summary.items() if k != "broadened_problems"}
    for key in ("final_eval", "initial_eval", "teacher_eval"):
        if key in reeval:
            out[key] = reeval[key]
    if "final_eval" in reeval and summary.get("evals"):  # the curve's last point is the re-evaluated final one
        out["evals"] = [e for e in summary["evals"] if e.get("step") != reeval["final_eval"]["step"]]
        out["evals"].append(reeval["final_eval"])
    return out
