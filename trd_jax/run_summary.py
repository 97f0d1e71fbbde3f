"""summary.json of a training run, assembled from what the controller kept: its evaluations, the seconds,
tokens and FLOPs of each phase, the rows it counted and the bytes it held on its devices (reports.py turns
it into tables)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from trd_jax import evaluation
from trd_jax.config import Settings
from trd_jax.reports import COST_PHASES

log = logging.getLogger(__name__)


def training_summary(s: Settings, *, status: str, done: int, evals: list[dict], final: dict | None,
                     totals: Mapping[str, Any], counters: Mapping[str, float], memory: dict,
                     extra: Mapping[str, Any]) -> dict:
    """status: "completed", "preempted" or "failed" (too many non-finite steps skipped); done: steps run; final:
    the evaluation at `done` (None unless completed); totals: PhaseTimer.totals(); counters: the controller's
    rows, flops/*, warm_* and skipped_steps counters;
    extra: results kept across resumes (grading counts, teacher eval, bootstrap), appended as they are."""
    phase_flops = {k.split("/", 1)[1]: v for k, v in counters.items() if k.startswith("flops/")}
    cost_s = {p: totals["phase_seconds"].get(p, 0.0) for p in COST_PHASES}
    step_s = sum(cost_s.values())
    warm_steps = int(counters.get("warm_steps", 0))
    warm = {p: counters.get(f"warm_s/{p}", 0.0) / warm_steps for p in COST_PHASES} if warm_steps else {}
    initial = next((e for e in evals if e["step"] == 0), None)
    summary = {
        "status": status, "steps": done, "skipped_steps": int(counters.get("skipped_steps", 0)), "mode": s.distill.mode,
        "trajectory": s.distill.trajectory, "loss": s.loss.name,
        "initial_eval": initial, "final_eval": final,
        "evals": evals,
        "phase_seconds": totals["phase_seconds"], "phase_tokens": totals["phase_tokens"],
        "phase_flops": phase_flops,
        # Steady state: mean seconds per step over the steps that did not compile (the first of each process).
        "phase_seconds_per_warm_step": warm, "warm_steps": warm_steps,
        "cost": {"seconds_per_step": step_s / max(done, 1),
                 "share_of_step_seconds": {p: (v / step_s if step_s else 0.0) for p, v in cost_s.items()},
                 "inference_seconds": sum(cost_s[p] for p in ("rollout", "refine", "score")),
                 "refine_seconds": cost_s["refine"]},
        "rows": {k: v for k, v in counters.items() if not k.startswith(("flops/", "warm_"))},
        "trajectory_accuracy": {
            **({"y_o": counters["y_o_correct"] / max(counters.get("total", 0), 1)} if "y_o_correct" in counters
               else {}),
            **({"y_r": counters.get("y_r_correct", 0.0) / max(counters["y_r_generated"], 1)}
               if "y_r_generated" in counters else {}),
            # offline.dir: the grade of each stored trajectory trained on
            **({"stored": counters["stored_correct"] / max(counters.get("total", 0), 1)}
               if "stored_correct" in counters else {})},
        "memory": memory,
        **extra,
    }
    if initial is not None and final is not None and "correct_counts" in initial and "correct_counts" in final:
        # Problems no initial sample solved and some final sample does (evaluation.broadened). eval.* may
        # change on resume: evaluations of other problems or another n are not compared (None), not an error.
        a, b = initial["correct_counts"], final["correct_counts"]
        summary["broadened_problems"] = evaluation.broadened_if_comparable(a, initial["n"], b, final["n"])
        if summary["broadened_problems"] is None:
            log.warning("broadened_problems not computed: the initial evaluation (%d problems, n=%d) and the "
                        "final one (%d problems, n=%d) differ", len(a), initial["n"], len(b), final["n"])
    return summary
