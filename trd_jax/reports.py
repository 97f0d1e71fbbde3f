"""Human-readable views of summary.json: the before/after table and the per-phase inference cost."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from trd_jax.evaluation import compare_table

COST_PHASES = ("rollout", "refine", "grade", "score", "update")


def cost_table(summary: Mapping[str, Any]) -> str:
    """Markdown: per phase, total wall seconds, seconds per step in the steady state (steps that did not
    compile) and their share of the step, tokens and estimated FLOPs."""
    seconds, tokens = summary.get("phase_seconds", {}), summary.get("phase_tokens", {})
    flops = summary.get("phase_flops", {})
    warm = summary.get("phase_seconds_per_warm_step") or {}
    steps = max(int(summary.get("steps", 0)), 1)
    per_step = {p: warm[p] if warm else seconds.get(p, 0.0) / steps for p in COST_PHASES if p in seconds}
    step_total = sum(per_step.values())
    lines = ["| phase | seconds | s / step | share of step | tokens | est. FLOPs |", "|---|---|---|---|---|---|"]
    for p, s in per_step.items():
        share = f"{100 * s / step_total:.1f}%" if step_total else "-"
        f = f"{flops[p]:.3g}" if p in flops else "-"
        lines.append(f"| {p} | {seconds[p]:.2f} | {s:.3f} | {share} | {int(tokens.get(p, 0)):,} | {f} |")
    total = sum(seconds.get(p, 0.0) for p in per_step)
    lines.append(f"| **step** | {total:.2f} | {step_total:.3f} | 100% | | |")
    for p in sorted(set(seconds) - set(COST_PHASES)):
        lines.append(f"| ({p}, outside the step) | {seconds[p]:.2f} | | | {int(tokens.get(p, 0)):,} | |")
    note = (f"s / step: mean over {summary.get('warm_steps')} steps without compilation" if warm
            else "s / step: total / steps (compilation included)")
    return "\n".join(lines) + f"\n\n{note}.\n"


def eval_report(summary: Mapping[str, Any]) -> str:
    """config.mode "eval": the model, its checkpoint step and its accuracy."""
    ev = summary["final_eval"]
    return "\n".join([
        f"## {summary.get('model')} (step {summary.get('steps', 0)}) on {summary.get('task')}", "",
        f"Avg@{ev['n']} {100 * ev['avg_at_k']:.2f}%, Pass@{ev['k']} {100 * ev['pass_at_k']:.2f}%"
        + (f", greedy {100 * ev['greedy']:.2f}%" if ev.get("greedy") is not None else "")
        + f" over {ev['num_problems']} problems (mean length {ev['mean_length']:.0f} tokens)", ""])


def run_report(summary: Mapping[str, Any]) -> str:
    if summary.get("status") == "evaluated":
        return eval_report(summary)
    parts = [f"## {summary.get('mode', '?').upper()} on {summary.get('trajectory', '?')}, loss "
             f"{summary.get('loss', '?')}: {summary.get('status', '?')} after {summary.get('steps', 0)} steps", ""]
    for entry in summary.get("checkpoints_set_aside") or []:
        parts += [f"**Checkpoint step {entry['step']} failed verification** ({entry['reason']}): set aside in "
                  f"{entry.get('moved_to', '?')}; the run resumed from an older step", ""]
    if summary.get("skipped_steps"):
        parts += [f"**{summary['skipped_steps']} of {summary.get('steps', 0)} steps skipped** (non-finite loss or "
                  "gradient: the weights were left unchanged)", ""]
    before, after = summary.get("initial_eval"), summary.get("final_eval")
    if before and after:
        parts += ["Student on the eval split:", "", compare_table(before, after)]
        if summary.get("broadened_problems") is not None:
            parts += [(f"Broadened: {summary['broadened_problems']} of {after['num_problems']} problems unsolved "
                       "by every initial sample are solved by at least one final sample."), ""]
    elif after:
        parts += [f"Student: Avg@{after['n']} {100 * after['avg_at_k']:.2f}%, Pass@{after['k']} "
                  f"{100 * after['pass_at_k']:.2f}%", ""]
    teacher = summary.get("teacher_eval")
    if teacher:
        parts.append(f"- teacher (vanilla context): Avg@{teacher['n']} {100 * teacher['avg_at_k']:.2f}%, "
                     f"Pass@{teacher['k']} {100 * teacher['pass_at_k']:.2f}%")
    for name, acc in (summary.get("trajectory_accuracy") or {}).items():
        parts.append(f"- accuracy of {name} during training: {100 * acc:.2f}%")
    if teacher or summary.get("trajectory_accuracy"):
        parts.append("")
    if summary.get("phase_seconds"):
        parts += ["Cost per phase (inference = rollout + refine + score):", "", cost_table(summary)]
    return "\n".join(parts)


def print_run_report(summary: Mapping[str, Any], workdir: str) -> None:
    print(run_report(summary))
    extra = "eval/" if summary.get("status") == "evaluated" else "metrics.jsonl, eval/, tb/"
    print(f"Details: {os.path.join(workdir, 'summary.json')}, {extra}")
