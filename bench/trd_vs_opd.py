"""The inference cost of refinement: a TRD step against a plain OPD step at equal batch, by phase, with
and without speculative refine (refine.speculative: the teacher verifies y_o as its draft), sampled at the
recipe's settings and greedy.

    python bench/trd_vs_opd.py [--workdir runs/bench_trd_vs_opd] [--steps 12] [--rounds 2] [--draft-tokens 8]

Both run the embedded default (configs/default.py: same bootstrap, teacher, student, 32 prompts per step,
forward KL) with the teacher scoring in its vanilla context (distill.teacher_context=vanilla: the default's
refine context needs y_r); the only difference is distill.trajectory: y_r (TRD, as trd_vanilla_context)
or y_o (OPD), and for TRD refine.speculative and refine.temperature (greedy: 0). The two "refine-context"
runs are the paper's TRD (scored in the refine prompt), once recomputing the teacher's states in the score
phase and once reusing the refine pass's (refine.reuse_states). Runs alternate OPD, TRD,
speculative TRD, ... so that a noisy machine slows all alike; the figures
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

GREEDY = {"refine.temperature": 0.0}
METHODS = {  # name: overrides of the default
    "OPD (y_o)": {"distill.trajectory": "y_o"},
    "TRD (y_r)": {"distill.trajectory": "y_r"},
    "TRD speculative": {"distill.trajectory": "y_r", "refine.speculative": True},
    "TRD greedy refine": {"distill.trajectory": "y_r", **GREEDY},
    "TRD greedy speculative": {"distill.trajectory": "y_r", "refine.speculative": True, **GREEDY},
    # The reference code's TRD scores y_r in its refine context: the score phase may reuse the refine pass's states.
    "TRD refine-context": {"distill.trajectory": "y_r", "distill.teacher_context": "refine",
                           "refine.reuse_states": False},
    "TRD refine-context reuse": {"distill.trajectory": "y_r", "distill.teacher_context": "refine",
                                 "refine.reuse_states": True},
    # Prompt lookup for the rollouts (rollout.prompt_lookup_tokens = --draft-tokens).
    "OPD prompt lookup": {"distill.trajectory": "y_o", "rollout.prompt_lookup_tokens": -1},
}


def run(workdir: str, bootstrap: str, name: str, overrides: dict, steps: int, seed: int, draft_tokens: int) -> dict:
    out = os.path.join(workdir, f"{name.replace(' ', '_').replace('(', '').replace(')', '')}-{seed}")
    shutil.rmtree(out, ignore_errors=True)
    overrides = {k: (draft_tokens if k == "rollout.prompt_lookup_tokens" and v == -1 else v)
                 for k, v in overrides.items()}
    cfg = apply_overrides(default_config(), {
        "distill.teacher_context": "vanilla", **overrides, "refine.draft_tokens": draft_tokens, "train.steps": steps,
        "bootstrap.dir": bootstrap, "seed": seed,
        "eval.initial": False, "eval.teacher": False, "log.diagnostics": False, "log.progress": False,
        "export.enabled": False, "checkpoint.every": steps})
    summary = Trainer(cfg, out).run()
    steps_run = max(summary["steps"], 1)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    drafts = {k: statistics.mean(m[f"{phase}/{k}"] for m in lines) for phase in ("refine", "rollout")
              for k in ("accepted_per_pass", "passes_per_token") if lines and f"{phase}/{k}" in lines[0]}
    return {"warm": summary["phase_seconds_per_warm_step"], "drafts": drafts,
            "tokens": {p: summary["phase_tokens"].get(p, 0) / steps_run for p in COST_PHASES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/bench_trd_vs_opd")
    ap.add_argument("--bootstrap", default="", help="a bootstrap folder to reuse (default: workdir/bootstrap)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS), help="a comma-separated subset of " + ", ".join(METHODS))
    args = ap.parse_args()
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    bootstrap = args.bootstrap or os.path.join(args.workdir, "bootstrap")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for name, overrides in methods.items():
            results[name].append(run(args.workdir, bootstrap, name, overrides, args.steps, r, args.draft_tokens))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; the default recipe, 32 prompts per step, "
          f"{args.steps} steps x {args.rounds} rounds, medians over rounds; draft_tokens {args.draft_tokens}")
    med = {m: {p: statistics.median(x["warm"].get(p, 0.0) for x in runs) for p in COST_PHASES}
           for m, runs in results.items()}
    tok = {m: {p: statistics.median(x["tokens"][p] for x in runs) for p in COST_PHASES} for m, runs in results.items()}
    print("| phase | " + " | ".join(f"{m} s / step" for m in methods) + " | " +
          " | ".join(f"{m} tokens / step" for m in methods) + " |")
    print("|---|" + "---:|" * (2 * len(methods)))
    for p in COST_PHASES:
        print(f"| {p} | " + " | ".join(f"{med[m][p]:.3f}" for m in methods) + " | " +
              " | ".join(f"{tok[m][p]:,.0f}" for m in methods) + " |")
    total = {m: sum(v.values()) for m, v in med.items()}
    print("| **step** | " + " | ".join(f"{total[m]:.3f}" for m in methods) + " |" + " |" * len(methods))
    opd = "OPD (y_o)"
    for m in methods:
        drafts = {k: statistics.median(x["drafts"][k] for x in results[m]) for k in results[m][0]["drafts"]}
        line = f"{m}: step {total[m]:.3f} s"
        if opd in methods and m != opd:
            line += (f" = {total[m] / total[opd]:.2f}x OPD; refine {med[m]['refine']:.3f} s "
                     f"({med[m]['refine'] / total[m]:.0%})")
        if drafts:
            line += f"; {drafts['accepted_per_pass']:.2f} draft tokens accepted per pass, " \
                    f"{drafts['passes_per_token']:.2f} passes per token"
        print(line)
    for plain, fast in (("TRD (y_r)", "TRD speculative"), ("TRD greedy refine", "TRD greedy speculative")):
        if plain in methods and fast in methods and med[fast]["refine"] > 0:
            print(f"refine speed-up, {fast}: {med[plain]['refine'] / med[fast]['refine']:.2f}x")
    if "OPD (y_o)" in methods and "OPD prompt lookup" in methods and med["OPD prompt lookup"]["rollout"] > 0:
        print(f"rollout speed-up, OPD prompt lookup: "
              f"{med['OPD (y_o)']['rollout'] / med['OPD prompt lookup']['rollout']:.2f}x")
    plain, reuse = "TRD refine-context", "TRD refine-context reuse"
    if plain in methods and reuse in methods and med[reuse]["score"] > 0:
        print(f"score phase, {reuse}: {med[reuse]['score']:.3f} s against {med[plain]['score']:.3f} s "
              f"({med[plain]['score'] / med[reuse]['score']:.2f}x); step {total[plain] / total[reuse]:.2f}x")
    print(json.dumps({"median_seconds": med, "tokens_per_step": tok}))


if __name__ == "__main__":
    main()
