"""The inference cost of refinement: a TRD step against a plain OPD step at equal batch, by phase.

    python bench/trd_vs_opd.py [--workdir runs/bench_trd_vs_opd] [--steps 12] [--rounds 2]

Both run the embedded default (configs/default.py: same bootstrap, teacher, student, 32 prompts per step,
forward KL) with the teacher scoring in its vanilla context (distill.teacher_context=vanilla: the default's
refine context needs y_r); the only difference is distill.trajectory: y_r (TRD, as trd_vanilla_context)
or y_o (OPD). Runs alternate OPD, TRD, OPD, TRD, ... so that a noisy machine slows both alike; the figures
are medians over rounds of each run's steady-state seconds per step (steps that compiled left out) and
exact token counts. Diagnostics are off (they are not part of either method's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trd_jax.controller import Trainer  # noqa: E402
from trd_jax.recipes import apply_overrides, default_config  # noqa: E402
from trd_jax.reports import COST_PHASES  # noqa: E402

METHODS = {"OPD (y_o)": "y_o", "TRD (y_r)": "y_r"}


def run(workdir: str, bootstrap: str, trajectory: str, steps: int, seed: int) -> dict:
    out = os.path.join(workdir, f"{trajectory}-{seed}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = apply_overrides(default_config(), {
        "distill.trajectory": trajectory, "distill.teacher_context": "vanilla", "train.steps": steps,
        "bootstrap.dir": bootstrap, "seed": seed,
        "eval.initial": False, "eval.teacher": False, "log.diagnostics": False, "log.progress": False,
        "export.enabled": False, "checkpoint.every": steps})
    summary = Trainer(cfg, out).run()
    steps_run = max(summary["steps"], 1)
    return {"warm": summary["phase_seconds_per_warm_step"],
            "tokens": {p: summary["phase_tokens"].get(p, 0) / steps_run for p in COST_PHASES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/bench_trd_vs_opd")
    ap.add_argument("--bootstrap", default="", help="a bootstrap folder to reuse (default: workdir/bootstrap)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    bootstrap = args.bootstrap or os.path.join(args.workdir, "bootstrap")
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for name, trajectory in METHODS.items():
            results[name].append(run(args.workdir, bootstrap, trajectory, args.steps, seed=r))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; the default recipe, 32 prompts per step, "
          f"{args.steps} steps x {args.rounds} rounds, medians over rounds")
    print("| phase | OPD s / step | TRD s / step | OPD tokens / step | TRD tokens / step |")
    print("|---|---:|---:|---:|---:|")
    med = {m: {p: statistics.median(x["warm"].get(p, 0.0) for x in runs) for p in COST_PHASES}
           for m, runs in results.items()}
    tok = {m: {p: statistics.median(x["tokens"][p] for x in runs) for p in COST_PHASES} for m, runs in results.items()}
    opd, trd = METHODS
    for p in COST_PHASES:
        print(f"| {p} | {med[opd][p]:.3f} | {med[trd][p]:.3f} | {tok[opd][p]:,.0f} | {tok[trd][p]:,.0f} |")
    total = {m: sum(v.values()) for m, v in med.items()}
    print(f"| **step** | {total[opd]:.3f} | {total[trd]:.3f} | | |")
    print(f"TRD / OPD step time: {total[trd] / total[opd]:.2f}x; refine is {med[trd]['refine'] / total[trd]:.0%} of "
          f"a TRD step; generated tokens (rollout + refine) {tok[trd]['rollout'] + tok[trd]['refine']:,.0f} against "
          f"{tok[opd]['rollout']:,.0f}")
    print(json.dumps({"median_seconds": med, "tokens_per_step": tok}))


if __name__ == "__main__":
    main()
