"""The paper's comparison at small scale: TRD, its variants and ablations against every token-level baseline
(and compute-matched baselines), in the OPD and OPSD settings, several bootstraps and seeds, on the embedded
task with equal budgets.

    python -m trd_jax.experiments.reproduce --workdir DIR [--out docs/reproduction] [--quick] [--jobs 2]
        [--bootstraps 3] [--seeds 5] [--steps 120] [--settings opd,opsd] [--methods trd,forward_kl,...]
        [--other-bootstrap-methods trd,forward_kl,reverse_kl] [--eval-every 0] [--set KEY=VALUE ...]

Bootstraps: bootstrap b has its own initial student and teacher (DIR/bootstrap for b = 0, else
DIR/bootstrap-b; overrides bootstrap.seed=b and task.data_seed=b, so each has its own task sample too;
bootstrap 0 is the one shipped in the package). Per bootstrap and setting one reference run of 0 steps
evaluates the initial student and the teacher once (DIR/runs/b<b>/<setting>-reference); every method run
(DIR/runs/b<b>/<setting>-<method>-s<seed>) skips those evaluations, is an ordinary training run (a finished
one is read back, an interrupted one resumes from its checkpoint) and keeps its final student as a Hugging
Face folder in its export/. Methods are the names of trd_jax.recipes.METHODS, or "<baseline>@2x": that
baseline with two rollouts per prompt, as many generated tokens per step as TRD's y_o + y_r.

Defaults: 5 seeds x both settings x every method (ablations, variants, forward_kl@2x and reverse_kl@2x
included) on bootstrap 0, and trd, forward_kl and reverse_kl on bootstraps 1 and 2, 2 runs at a time.
--quick: bootstrap 0, 2 seeds, the methods trd, trd_vanilla_context, forward_kl and reverse_kl, OPD and
OPSD; its runs are the full reproduction's first ones, so a full run in the same workdir reuses them.

Results in --out (default DIR): results.json (machine-readable: per setting and method, a row per
bootstrap and one pooled over bootstraps, with the final Avg@n and its 95% bootstrap interval over seeds
and problems, Pass@k, greedy accuracy, broadening, cost per step; TRD against every other method, paired
differences with intervals), results.md (the same as tables) and the plots accuracy.png (held-out accuracy
and training-rollout accuracy against step, cumulative generated tokens and cumulative FLOPs), pass_at_k.png
(Pass@k of the final students) and diagnostics.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from trd_jax import evaluation, stats
from trd_jax.evaluation import pass_at_k
from trd_jax.experiments import reevaluate
from trd_jax.experiments.reproduce_plots import draw
from trd_jax.metrics import atomic_write_json, atomic_write_text
from trd_jax.recipes import METHODS, apply_overrides, default_config, get_method, method_config, parse_overrides

log = logging.getLogger("reproduce")
SETTINGS = ("opd", "opsd")
FULL_METHODS = (*METHODS, "forward_kl@2x", "reverse_kl@2x")
QUICK = {"bootstraps": 1, "seeds": 2, "methods": ("trd", "trd_vanilla_context", "forward_kl", "reverse_kl")}
# Every method on bootstrap 0; the further bootstraps (is a conclusion robust to the draw?) run TRD and the
# two main token-level baselines. At 120 steps this is still about 4 hours on 2 cores (docs/reproduction/budget.md).
FULL = {"bootstraps": 3, "seeds": 5, "methods": FULL_METHODS, "other_methods": ("trd", "forward_kl", "reverse_kl")}
REFERENCE = "trd"  # the paper's method: every other one is compared with it
# Also compared with every other method (a pair once): the variant that leads on the shipped bootstrap, so that
# results say which of its differences from the baselines are significant too.
COMPARED = (REFERENCE, "trd_vanilla_context")
FLOP_PHASES = ("rollout", "refine", "score", "update")
DIAGNOSTICS = ("diag/trained/advantage_sign_flip_rate", "diag/trained/teacher_entropy",
               "diag/trained/teacher_top2_gap", "diag/trained/teacher_nll")  # plotted per step
# Tabulated as means over the run: the sign-flip rate weighted by |advantage| and between successive uncertain
# tokens (teacher entropy > 0.1 nats: the decision points), on what the method trained on and, in the same steps,
# on the rollouts y_o under the vanilla teacher (for y_o methods the two coincide): is y_r's signal less
# fragmented than y_o's?
FLIP_TABLE = ("diag/trained/advantage_sign_flip_rate_weighted", "diag/y_o/advantage_sign_flip_rate_weighted",
              "diag/trained/advantage_sign_flip_rate_decisions", "diag/y_o/advantage_sign_flip_rate_decisions",
              "diag/trained/uncertain_token_fraction", "diag/y_o/uncertain_token_fraction")


def bootstrap_dir(workdir: str, bootstrap: int) -> str:
    return os.path.join(workdir, "bootstrap" if bootstrap == 0 else f"bootstrap-{bootstrap}")


def run_dir(workdir: str, setting: str, method: str, seed: int, bootstrap: int = 0) -> str:
    return os.path.join(workdir, "runs", f"b{bootstrap}", f"{setting}-{method}-s{seed}")


def reference_dir(workdir: str, setting: str, bootstrap: int = 0) -> str:
    return os.path.join(workdir, "runs", f"b{bootstrap}", f"{setting}-reference")


def _finished(out: str) -> dict | None:
    summary = _read_json(os.path.join(out, "summary.json"))
    return summary if summary.get("status") == "completed" else None


def _base_overrides(workdir: str, bootstrap: int, overrides: dict) -> dict:
    return {"bootstrap.dir": bootstrap_dir(workdir, bootstrap), "bootstrap.seed": bootstrap,
            "task.data_seed": bootstrap, "log.progress": False, **overrides}


def run_reference(workdir: str, setting: str, overrides: dict, bootstrap: int = 0) -> dict:
    """The evaluations every run of a bootstrap and setting shares, done once: the initial student and the
    setting's teacher (OPD: the teacher model; OPSD: the student shown the reference solution), as a run of
    0 steps. Method runs skip them (eval.initial / eval.teacher off), which halves a run's evaluation cost."""
    from trd_jax.controller import Trainer

    out = reference_dir(workdir, setting, bootstrap)
    if (summary := _finished(out)) is not None:
        return summary
    cfg = method_config(REFERENCE, setting, 0)
    apply_overrides(cfg, {**_base_overrides(workdir, bootstrap, overrides), "train.steps": 0, "eval.initial": True,
                          "eval.teacher": True})
    summary = Trainer(cfg, out).run()
    log.info("bootstrap %d %s: initial student Avg %.3f, teacher Avg %.3f", bootstrap, setting,
             summary["initial_eval"]["avg_at_k"], summary["teacher_eval"]["avg_at_k"])
    return summary


def run_one(workdir: str, setting: str, method: str, seed: int, steps: int, eval_every: int,
            overrides: dict, bootstrap: int = 0) -> dict:
    """One method run (a finished one is read back, an interrupted one resumes), without the shared
    evaluations of run_reference; its final student is kept as a Hugging Face folder in its export/."""
    from trd_jax.controller import Trainer

    out = run_dir(workdir, setting, method, seed, bootstrap)
    if (summary := _finished(out)) is not None:
        return summary
    cfg = method_config(method, setting, seed)
    apply_overrides(cfg, {**_base_overrides(workdir, bootstrap, overrides), "train.steps": steps,
                          "eval.every": eval_every, "eval.initial": False, "eval.teacher": False,
                          "export.enabled": True})
    start = time.perf_counter()
    summary = Trainer(cfg, out).run()
    log.info("bootstrap %d %s %s seed %d: final Avg %.3f in %.0f s", bootstrap, setting, method, seed,
             summary["final_eval"]["avg_at_k"], time.perf_counter() - start)
    return summary


def reevaluate_one(workdir: str, key: tuple, problems: int, steps: int, overrides: dict, original: dict) -> dict:
    """reevaluate.reevaluate of run `key` ((b, setting, method, seed), or (b, setting) for the shared evaluations)
    with the config it ran with."""
    b, setting, *rest = key
    if rest:
        method, seed = rest
        cfg = method_config(method, setting, seed)
        apply_overrides(cfg, _base_overrides(workdir, b, overrides))
        return reevaluate.reevaluate(run_dir(workdir, setting, method, seed, b), cfg, problems, steps, original,
                                     reference=False)
    cfg = method_config(REFERENCE, setting, 0)
    apply_overrides(cfg, _base_overrides(workdir, b, overrides))
    return reevaluate.reevaluate(reference_dir(workdir, setting, b), cfg, problems, 0, original, reference=True)


def collect(workdir: str, steps: int) -> tuple[dict, dict]:
    """The finished runs already in workdir, whatever invocations made them: ({(b, setting, method, seed):
    summary}, {(b, setting): reference summary}). Runs of another step count are left out (and named)."""
    runs, refs = {}, {}
    root = os.path.join(workdir, "runs")
    for bdir in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not (bdir.startswith("b") and bdir[1:].isdigit()):
            continue
        b = int(bdir[1:])
        for name in sorted(os.listdir(os.path.join(root, bdir))):
            summary = _finished(os.path.join(root, bdir, name))
            setting, _, rest = name.partition("-")
            if summary is None or setting not in SETTINGS:
                continue
            if rest == "reference":
                refs[(b, setting)] = summary
                continue
            method, _, seed = rest.rpartition("-s")
            if not seed.isdigit():
                continue
            if summary.get("steps") != steps:
                log.warning("left out %s: %s steps, not %d", os.path.join(bdir, name), summary.get("steps"), steps)
                continue
            runs[(b, setting, method, int(seed))] = summary
    order = {m: i for i, m in enumerate(FULL_METHODS)}  # the order main() runs them in: seed-major, by method
    keys = sorted((k for k in runs if k[:2] in refs),
                  key=lambda k: (k[3], k[0], SETTINGS.index(k[1]), order.get(k[2], len(order)), k[2]))
    return {k: runs[k] for k in keys}, refs


# ------------------------------------------------------------------------------------------------ one run


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _metrics(path: str) -> list[dict]:
    file = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(file):
        return []
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def _correct_counts(path: str, ev: dict) -> tuple[list[int], int]:
    """Per-problem correct counts and samples per problem of an evaluation: from the summary's entry, else
    from the run's eval/step_XXXXXX.json."""
    counts, n = ev.get("correct_counts"), ev.get("n")
    if counts is None:
        report = _read_json(os.path.join(path, "eval", f"step_{int(ev.get('step', 0)):06d}.json"))
        counts, n = report.get("correct_counts"), n or report.get("n")
    if counts is None or not n:
        raise ValueError(f"{path}: no per-problem correct counts for step {ev.get('step')} (summary.json "
                         "final_eval or eval/step_*.json)")
    return [int(c) for c in counts], int(n)


def _pass_at(ev: dict, counts: list[int], n: int) -> dict[str, float]:
    """Pass@k for k = 1, 2, 4, ... n (string keys): the summary's, else the unbiased estimator on the counts."""
    if ev.get("pass_at"):
        return {str(k): float(v) for k, v in ev["pass_at"].items()}
    ks = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n] + ([n] if n & (n - 1) else [])
    return {str(k): float(np.mean([pass_at_k(n, c, k) for c in counts])) for k in ks}


def run_record(path: str, summary: dict, reference: dict | None = None) -> dict:
    """What the aggregation needs from one finished run: per-problem accuracy, Pass@k, cost per step, the
    accuracy curve against step, cumulative generated tokens and cumulative FLOPs, and diagnostics.
    ``reference``: the bootstrap's shared evaluations (run_reference), for a run that skipped them: its
    initial student (the curve's step 0 and the broadening) and its teacher."""
    final = summary.get("final_eval") or {}
    counts, n = _correct_counts(path, final)
    steps = max(int(summary.get("steps", 0)), 1)
    tokens = summary.get("phase_tokens") or {}
    flops = summary.get("phase_flops") or {}
    gen_per_step = (tokens.get("rollout", 0) + tokens.get("refine", 0)) / steps
    flops_per_step = sum(flops.get(p, 0.0) for p in FLOP_PHASES) / steps
    metrics = _metrics(path)
    initial = summary.get("initial_eval") or (reference or {}).get("initial_eval")
    teacher = summary.get("teacher_eval") or (reference or {}).get("teacher_eval")
    evals = summary.get("evals", [])
    if initial is not None and not any(e["step"] == 0 for e in evals):
        evals = [initial, *evals]
    broadened = summary.get("broadened_problems")
    if broadened is None and initial is not None and initial.get("correct_counts") is not None:
        broadened = evaluation.broadened_if_comparable(initial["correct_counts"], initial.get("n"), counts, n)
    # Cumulative generated tokens at the end of each step, from the per-step counts where metrics.jsonl has
    # them; FLOPs per step are only totalled (summary.json), so cumulative FLOPs are the mean per step x step.
    cumulative = {0: 0.0}
    total = 0.0
    for m in metrics:
        total += m.get("phase_tokens/rollout", 0) + m.get("phase_tokens/refine", 0)
        cumulative[int(m["step"])] = total
    # The student's accuracy on its own training rollouts (y_o, graded every step): a learning curve at every
    # step for free, where the held-out evaluations are few (at step 0, shared, and at the end).
    train_curve = [{"step": int(m["step"]), "accuracy_y_o": m["accuracy/y_o"],
                    "generated_tokens": cumulative[int(m["step"])], "flops": flops_per_step * int(m["step"])}
                   for m in metrics if "accuracy/y_o" in m]
    curve = [{"step": e["step"], "avg_at_k": e["avg_at_k"],
              "generated_tokens": cumulative.get(e["step"], gen_per_step * e["step"]),
              "flops": flops_per_step * e["step"]} for e in evals]
    config = _read_json(os.path.join(path, "config.json"))
    return {
        "accuracy": np.asarray(counts, np.float64) / n, "n": n,
        "pass_at_k": _pass_at(final, counts, n), "greedy": final.get("greedy"),
        "broadened_problems": broadened,
        "generated_tokens_per_step": gen_per_step, "flops_per_step": flops_per_step,
        "seconds_per_step": float(sum((summary.get("phase_seconds_per_warm_step") or {}).values())),
        "curve": curve, "train_curve": train_curve, "initial_eval": initial, "teacher_eval": teacher,
        "eval_config": config.get("eval", {}), "trajectory_accuracy": summary.get("trajectory_accuracy", {}),
        "diagnostics": {k: float(np.mean(v)) for k in (*DIAGNOSTICS, *FLIP_TABLE)  # NaN: nothing to compare
                        if (v := [m[k] for m in metrics if k in m and np.isfinite(m[k])])},
    }


# ------------------------------------------------------------------------------------------------ aggregation


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def pooled_matrix(per_bootstrap: dict[int, list[np.ndarray]]) -> np.ndarray:
    """f[S, P] for stats: one bootstrap's runs are rows over its problems. Several bootstraps sample their
    own problems (task.data_seed = b), so their problems are put side by side (P = sum of P_b) and row s
    holds seed s of every bootstrap (S = the fewest seeds of any bootstrap)."""
    seeds = min(len(v) for v in per_bootstrap.values())
    return np.concatenate([np.stack(v[:seeds]) for _, v in sorted(per_bootstrap.items())], axis=1)


def _row(setting: str, method: str, bootstrap, records: list[dict], matrix: np.ndarray, *, resamples: int,
         seed: int) -> dict:
    mean, half, low, high = stats.bootstrap_ci(matrix, resamples=resamples, seed=seed)
    ks = records[0]["pass_at_k"].keys()
    traj = {k: _mean([r["trajectory_accuracy"].get(k) for r in records]) for k in ("y_o", "y_r")}
    return {"setting": setting, "method": method, **get_method(method).describe(), "bootstrap": bootstrap,
            "seeds": len(records),
            "avg_at_k": {"mean": mean, "ci95": half, "low": low, "high": high},
            "pass_at_k": {k: float(np.mean([r["pass_at_k"][k] for r in records])) for k in ks},
            "greedy": _mean(r["greedy"] for r in records),
            "broadened_problems": _mean(r["broadened_problems"] for r in records),
            "generated_tokens_per_step": float(np.mean([r["generated_tokens_per_step"] for r in records])),
            "flops_per_step": float(np.mean([r["flops_per_step"] for r in records])),
            "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in records])),
            "trajectory_accuracy": {k: v for k, v in traj.items() if v is not None},
            "diagnostics": {k: v for k in (*DIAGNOSTICS, *FLIP_TABLE)
                            if (v := _mean(r["diagnostics"].get(k) for r in records))
                            is not None}}


def _groups(records: dict) -> dict:
    """{(setting, method): {bootstrap: [record per seed, in seed order]}}, in first-seen order."""
    out: dict = {}
    for (b, setting, method, seed) in sorted(records, key=lambda k: (k[0], k[3])):
        out.setdefault((setting, method), {}).setdefault(b, []).append(records[b, setting, method, seed])
    order = list(dict.fromkeys((s, m) for (_, s, m, _) in records))
    return {key: out[key] for key in order}


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The point-wise mean of several runs' training curves, over the steps every run has."""
    length = min((len(c) for c in curves), default=0)
    return [{f: float(np.mean([c[i][f] for c in curves])) for f in curves[0][i]} for i in range(length)]


def _brief(ev: dict | None) -> dict | None:
    return None if ev is None else {k: ev.get(k) for k in ("avg_at_k", "pass_at_k", "greedy")}


def _bootstrap_evals(references: dict) -> dict:
    """Per bootstrap: its initial student and its teachers, from the shared evaluations."""
    out: dict = {}
    for (b, setting), ref in sorted(references.items()):
        entry = out.setdefault(str(b), {"initial_student": _brief(ref.get("initial_eval"))})
        entry["teacher" if setting == "opd" else "opsd_teacher"] = _brief(ref.get("teacher_eval"))
    return out


def aggregate(workdir: str, summaries: dict, references: dict | None = None, *, resamples: int = 2000,
              seed: int = 0) -> dict:
    """results.json's content from ``summaries: {(bootstrap, setting, method, seed): summary}`` and the shared
    evaluations ``references: {(bootstrap, setting): summary}`` (run_reference)."""
    references = references or {}
    records = {key: run_record(run_dir(workdir, key[1], key[2], key[3], key[0]), s, references.get((key[0], key[1])))
               for key, s in summaries.items()}
    if not records:
        raise ValueError("no runs to aggregate")
    first = next(iter(records.values()))
    first_setting = next(iter(records))[1]
    groups = _groups(records)
    rows = []
    for (setting, method), per_b in groups.items():
        acc = {b: [r["accuracy"] for r in rs] for b, rs in per_b.items()}
        for b, rs in sorted(per_b.items()):
            rows.append(_row(setting, method, b, rs, np.stack(acc[b]), resamples=resamples, seed=seed))
        rows.append(_row(setting, method, "all", [r for rs in per_b.values() for r in rs], pooled_matrix(acc),
                         resamples=resamples, seed=seed))
    curve_b = min(b for per_b in groups.values() for b in per_b)
    significance = []
    for i, compared in enumerate(COMPARED):
        for (setting, method), per_b in groups.items():
            ref = groups.get((setting, compared))
            common = sorted(set(per_b) & set(ref or {}))
            if method in COMPARED[:i + 1] or not common:  # itself, or a pair an earlier one already made
                continue
            # Over the bootstraps both methods ran on (the full preset runs some methods on bootstrap 0 only).
            a = pooled_matrix({b: [r["accuracy"] for r in ref[b]] for b in common})
            m = pooled_matrix({b: [r["accuracy"] for r in per_b[b]] for b in common})
            diff, low, high, sig = stats.difference_ci(a, m, resamples=resamples, seed=seed)
            significance.append({"setting": setting, "a": compared, "b": method, "bootstraps": common,
                                 "difference": diff, "low": low, "high": high, "significant": sig})

    # Initial student and teachers: the mean over bootstraps (each bootstrap once, whatever its run count).
    evals = {(b, s): (r["initial_eval"], r["teacher_eval"]) for (b, s, _, _), r in records.items()}

    def teacher(setting):
        return {"avg_at_k": _mean((t or {}).get("avg_at_k") for (_, s), (_, t) in evals.items() if s == setting)}

    ev = first["eval_config"]
    return {
        "eval": {"temperature": ev.get("temperature"), "top_p": ev.get("top_p"), "n": first["n"],
                 "problems": len(first["accuracy"])},
        "initial_student": {k: _mean((i or {}).get(k) for (b, s), (i, _) in evals.items() if s == first_setting)
                            for k in ("avg_at_k", "pass_at_k")},
        "teacher": teacher("opd"), "opsd_teacher": teacher("opsd"),
        "bootstraps": _bootstrap_evals(references),
        "rows": rows, "significance": significance,
        # Curves on one bootstrap, the first (every method of the full preset runs on it): a mean over bootstraps
        # that only some methods ran on would start them from different initial students.
        "curves_bootstrap": curve_b,
        "curves": {f"{s}/{m}": [r["curve"] for r in per_b[curve_b]] for (s, m), per_b in groups.items()
                   if curve_b in per_b},
        "train_curves": {f"{s}/{m}": _mean_curve([r["train_curve"] for r in per_b[curve_b]])
                         for (s, m), per_b in groups.items() if curve_b in per_b},
        "pass_at_k_final": {f"{row['setting']}/{row['method']}": row["pass_at_k"] for row in rows
                            if row["bootstrap"] == "all"},
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report(results: dict) -> str:
    """results.md: a table per setting (a row per method and bootstrap, and pooled), then the significance list."""
    ev, init = results["eval"], results["initial_student"]
    bootstraps = sorted({r["bootstrap"] for r in results["rows"] if r["bootstrap"] != "all"})
    lines = ["# TRD against token-level baselines on the embedded task", "",
             (f"Final students evaluated at temperature {ev['temperature']}, top-p {ev['top_p']}, {ev['n']} samples "
             f"on each of {ev['problems']} problems (per bootstrap). Avg@{ev['n']} in % with the half-width of its "
             "95% interval (two-level bootstrap over seeds and problems, trd_jax.stats); Pass@k in %; `all` pools "
             f"the bootstraps {bootstraps}. Initial student: Avg@{ev['n']} {_pct(init['avg_at_k'])}; teacher: OPD "
             f"{_pct(results['teacher']['avg_at_k'])}, OPSD {_pct(results['opsd_teacher']['avg_at_k'])}. Cost per "
             "step: generated tokens (rollout + refine), estimated FLOPs (rollout, refine, score, update) and "
             "steady-state wall seconds on this machine."), ""]
    for setting in dict.fromkeys(r["setting"] for r in results["rows"]):
        rows = [r for r in results["rows"]
                if r["setting"] == setting and (len(bootstraps) > 1 or r["bootstrap"] == "all")]
        ks = list(rows[0]["pass_at_k"])
        header = (f"| method | loss | trajectory | teacher context | bootstrap | runs | Avg@{ev['n']} | "
                  + " | ".join(f"Pass@{k}" for k in ks)
                  + " | greedy | broadened | train acc. y_o / y_r | gen. tok / step | GFLOP / step | s / step |")
        lines += [f"## {setting.upper()}", "", header, "|---" * (header.count("|") - 1) + "|"]
        for r in rows:
            acc = r["trajectory_accuracy"]
            train = _pct(acc.get("y_o")) + (f" / {_pct(acc['y_r'])}" if "y_r" in acc else "")
            broad = "-" if r["broadened_problems"] is None else f"{r['broadened_problems']:.1f}"
            lines.append(f"| {r['method']} | {r['loss']} | {r['trajectory']} | {r['teacher_context']} | "
                         f"{r['bootstrap']} | {r['seeds']} | {_pct(r['avg_at_k']['mean'])} ± "
                         f"{100 * r['avg_at_k']['ci95']:.1f} | "
                         + " | ".join(_pct(r["pass_at_k"][k]) for k in ks)
                         + f" | {_pct(r['greedy'])} | {broad} | {train} | {r['generated_tokens_per_step']:.0f} | "
                         f"{r['flops_per_step'] / 1e9:.3g} | {r['seconds_per_step']:.2f} |")
        lines.append("")
    lines += _flip_table(results)
    lines += [f"## {' and '.join(COMPARED)} against each method (pooled over bootstraps)", "",
              ("Difference in Avg@n (points) with its 95% interval (seeds of each method resampled independently, "
              "problems resampled jointly); * marks an interval that excludes 0."), ""]
    for s in results["significance"]:
        lines.append(f"- {s['setting']}: {s['a']} - {s['b']} = {100 * s['difference']:+.1f} "
                     f"[{100 * s['low']:+.1f}, {100 * s['high']:+.1f}]{' *' if s['significant'] else ''} "
                     f"(bootstraps {', '.join(map(str, s.get('bootstraps', [])))})")
    return "\n".join(lines) + "\n"


def _flip_table(results: dict) -> list[str]:
    """Mean over steps and runs (pooled rows) of the prefix-failure diagnostics of FLIP_TABLE."""
    rows = [r for r in results["rows"] if r["bootstrap"] == "all" and r.get("diagnostics")]
    if not any(FLIP_TABLE[0] in r["diagnostics"] for r in rows):
        return []

    def cell(r, key):
        v = r["diagnostics"].get(key)
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["## Is the signal less fragmented on y_r? (prefix-failure diagnostics, pooled)", "",
             ("Advantage sign-flip rate (%): between adjacent response tokens weighted by the smaller |advantage| "
              "of each pair, and between successive decision points (tokens whose teacher entropy exceeds 0.1 nats, "
              "the near-certain ones between them skipped; `-`: not logged by the run); `trained`: the sequences "
              "the method trained on (y_r for TRD), `y_o`: the same steps' rollouts under the vanilla teacher; "
              "the fraction of such uncertain tokens in %. Means over logged steps and runs."), "",
             "| setting | method | trained: weighted | y_o: weighted | trained: decisions | y_o: decisions | "
             "uncertain tokens, trained | uncertain tokens, y_o |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | " + " | ".join(cell(r, k) for k in FLIP_TABLE) + " |")
    return lines + [""]


def write_results(workdir: str, results: dict, extra_md: str = "") -> tuple[str, str]:
    json_path = atomic_write_json(os.path.join(workdir, "results.json"), results)
    md_path = atomic_write_text(os.path.join(workdir, "results.md"), report(results) + extra_md)
    return json_path, md_path


# ------------------------------------------------------------------------------------------------ plots


def plot(out: str, results: dict, summaries: dict, workdir: str | None = None) -> list[str]:
    """accuracy.png, pass_at_k.png and diagnostics.png (reproduce_plots.draw) from results.json's curves and each
    run's metrics.jsonl (the per-step prefix-failure diagnostics of DIAGNOSTICS)."""
    workdir = workdir or out
    diagnostics = {}  # (setting, method) -> per run, per step, the DIAGNOSTICS values
    for (b, setting, method, seed) in summaries:
        diagnostics.setdefault((setting, method), []).append(
            [[m.get(key, np.nan) for key in DIAGNOSTICS] for m in _metrics(run_dir(workdir, setting, method, seed, b))])
    return draw(out, results, diagnostics, reference=REFERENCE, diagnostic_keys=DIAGNOSTICS)


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--quick", action="store_true",
                        help=f"the quick subset: {QUICK['bootstraps']} bootstrap, {QUICK['seeds']} seeds, methods "
                             f"{','.join(QUICK['methods'])}")
    parser.add_argument("--bootstraps", type=int, default=None,
                        help=f"independent bootstraps (initial models and task sample); default {FULL['bootstraps']}")
    parser.add_argument("--bootstrap-ids", default=None,
                        help="comma-separated bootstraps to run (default: 0 .. --bootstraps - 1), e.g. 2 to add a "
                             "third bootstrap to a workdir, or in a workdir of its own")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per bootstrap, method and setting; "
                                                                f"default {FULL['seeds']}")
    parser.add_argument("--steps", type=int, default=default_config().train.steps)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="held-out evaluations every N steps besides the final one (default 0: the final "
                             "only; each costs as much as a fifth of a run)")
    parser.add_argument("--settings", default="opd,opsd")
    parser.add_argument("--methods", default=None,
                        help="comma-separated METHODS names or <baseline>@2x; default: all of "
                             f"METHODS plus {', '.join(m for m in FULL_METHODS if m not in METHODS)}")
    parser.add_argument("--other-bootstrap-methods", default=None,
                        help="methods for bootstraps 1 and up (default: the full preset's "
                             f"{','.join(FULL['other_methods'])}; 'all': the --methods)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at once, each in its own worker process (default 2: on 2 CPU cores one run "
                             "keeps about 1.4 of them busy)")
    parser.add_argument("--out", default=None,
                        help="folder for results.json, results.md and the plots (default: --workdir), e.g. "
                             "docs/reproduction")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: report every finished run of --steps steps already in --workdir, "
                             "whatever invocations made them (e.g. the quick subset plus later extensions)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. --set eval.n=8 (value parsed as JSON)")
    parser.add_argument("--reevaluate", type=int, default=0, metavar="N",
                        help="report from evaluations on N held-out problems: each finished run's kept student and "
                             "the shared evaluations evaluated again (once; kept in <run>/reeval-N.json), without "
                             "training again (trd_jax/experiments/reevaluate.py); give the runs' own --set")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.bootstraps = preset["bootstraps"] if args.bootstraps is None else args.bootstraps
    args.seeds = preset["seeds"] if args.seeds is None else args.seeds
    args.settings = args.settings.split(",")
    args.methods = list(preset["methods"]) if args.methods is None else args.methods.split(",")
    other = args.other_bootstrap_methods
    args.other_methods = (list(preset.get("other_methods", args.methods)) if other is None
                          else args.methods if other == "all" else other.split(","))
    args.other_methods = [m for m in args.methods if m in args.other_methods]
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad:
        parser.error(f"--settings: unknown {bad}; choose from {', '.join(SETTINGS)}")
    for method in args.methods:
        try:
            get_method(method)
        except ValueError as e:
            parser.error(f"--methods: {e}")
    if args.seeds < 1 or args.steps < 1 or args.bootstraps < 1 or args.jobs < 1:
        parser.error("--bootstraps, --seeds, --steps and --jobs must be >= 1")
    if args.reevaluate < 0:
        parser.error(f"--reevaluate: {args.reevaluate} problems")
    try:
        args.bootstrap_ids = (list(range(args.bootstraps)) if args.bootstrap_ids is None
                              else sorted({int(b) for b in args.bootstrap_ids.split(",")}))
    except ValueError:
        parser.error(f"--bootstrap-ids: {args.bootstrap_ids!r} is not a comma-separated list of integers")
    if min(args.bootstrap_ids) < 0:
        parser.error("--bootstrap-ids: bootstraps are numbered from 0")
    args.out = args.out or args.workdir
    try:
        args.overrides = parse_overrides(args.set)
    except ValueError as e:
        parser.error(str(e))
    return args


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "trd_jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _worker_init() -> None:
    from trd_jax import compile_cache

    _exit_with_parent()
    _setup_logging()
    compile_cache.enable()


def _exit_with_parent(poll_s: float = 2.0) -> None:
    """A worker ends when the reproduction that spawned it does (killed, even by SIGKILL, it would leave its workers
    running the runs they hold and writing them into the workdir)."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class _Pool:
    """Runs calls in `jobs` spawned worker processes (each keeps its imports and compilation cache across
    runs), or in this process when jobs == 1."""

    def __init__(self, jobs: int):
        self.pool = None
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)

    def map(self, calls: dict) -> tuple[dict, dict]:
        """{key: (fn, *args)} -> ({key: result}, {key: error}); one failed run does not stop the others."""
        results, errors = {}, {}
        if self.pool is None:
            for key, (fn, *a) in calls.items():
                try:
                    results[key] = fn(*a)
                except Exception as e:  # noqa: BLE001 - reported with its run, the others go on
                    errors[key] = e
            return results, errors
        futures = {key: self.pool.submit(fn, *a) for key, (fn, *a) in calls.items()}
        for key, future in futures.items():
            try:
                results[key] = future.result()
            except Exception as e:  # noqa: BLE001
                errors[key] = e
        return results, errors

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _reevaluated(pool: _Pool, args, summaries: dict, refs: dict) -> tuple[dict, dict, dict]:
    """The runs and shared evaluations with their evaluations replaced by --reevaluate N's; a run whose
    re-evaluation failed is left out (and reported)."""
    n, w, o = args.reevaluate, args.workdir, args.overrides
    # One batch: the shared evaluations' keys (b, setting) and the runs' (b, setting, method, seed) never collide.
    done, errors = pool.map({k: (reevaluate_one, w, k, n, args.steps, o, original)
                             for k, original in {**refs, **summaries}.items()})
    for key, r in done.items():
        if r.get("matches_original") is False:
            log.warning("%s: the re-evaluation's first problems do not repeat the run's own evaluation", key)
    refs = {k: reevaluate.substitute(refs[k], done[k]) for k in refs if k in done}
    summaries = {k: reevaluate.substitute(summaries[k], done[k]) for k in summaries if k in done and k[:2] in refs}
    return summaries, refs, errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging()
    from trd_jax import compile_cache

    compile_cache.enable()
    os.makedirs(args.workdir, exist_ok=True)
    start = time.perf_counter()
    pool = _Pool(1 if args.collect and not args.reevaluate else args.jobs)
    w, o = args.workdir, args.overrides
    errors: dict = {}
    try:
        if args.collect:
            summaries, refs = collect(w, args.steps)
            calls = {}
        # The shared evaluations first: the first setting's also builds its bootstrap's models (when they are
        # not the shipped ones), so no two workers build one bootstrap at once.
        else:
            first, rest = args.settings[0], args.settings[1:]
            refs, errors = pool.map({(b, first): (run_reference, w, first, o, b) for b in args.bootstrap_ids})
            more, e2 = pool.map({(b, s): (run_reference, w, s, o, b) for b in args.bootstrap_ids for s in rest
                                 if (b, first) in refs})
            refs.update(more)
            errors.update(e2)
            # Seed-major: an interrupted reproduction already covers every bootstrap and method once.
            calls = {(b, setting, method, seed): (run_one, w, setting, method, seed, args.steps, args.eval_every, o,
                                                  b)
                     for seed in range(args.seeds) for b in args.bootstrap_ids for setting in args.settings
                     for method in (args.methods if b == 0 else args.other_methods) if (b, setting) in refs}
            summaries, e3 = pool.map(calls)
            errors.update(e3)
        if args.reevaluate:
            summaries, refs, e4 = _reevaluated(pool, args, summaries, refs)
            errors.update(e4)
    finally:
        pool.close()
    for key, error in errors.items():
        log.error("run %s failed: %s: %s", key, type(error).__name__, error)
    if not summaries:
        print("no run finished", file=sys.stderr)
        return 1
    results = aggregate(args.workdir, summaries, refs)
    note = (f"\nAll {len(summaries)} runs (and {len(refs)} shared evaluations) took "
            f"{(time.perf_counter() - start) / 60:.1f} min in this invocation, {args.jobs} at a time"
            + (f"; {len(errors)} failed: {sorted(map(str, errors))}" if errors else "") + ".\n")
    os.makedirs(args.out, exist_ok=True)
    write_results(args.out, results, note)
    paths = plot(args.out, results, summaries, args.workdir)
    print(report(results) + note)
    print("results:", os.path.join(args.out, "results.json"), "plots:", *paths)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
