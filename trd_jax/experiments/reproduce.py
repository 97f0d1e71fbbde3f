"""The paper's comparison at small scale: TRD against every token-level baseline, in the OPD and OPSD
settings, several seeds, on the embedded task with equal budgets.

    python -m trd_jax.experiments.reproduce --workdir DIR [--seeds 3] [--steps 30] [--settings opd,opsd]

All runs share one bootstrap (DIR/bootstrap): the same initial student and teacher. Each run is an ordinary
training run in DIR/runs/<setting>-<method>-s<seed> (a finished run is not repeated; an interrupted one
resumes from its checkpoint). Results: DIR/results.md (mean and standard deviation over seeds of the final
Avg@n and Pass@k, the cost per step of each method, prefix-failure diagnostics) and the plots
DIR/accuracy.png (accuracy against step) and DIR/diagnostics.png (diagnostics against step).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from trd_jax.recipes import METHODS, apply_overrides, default_config, method_config, parse_overrides

log = logging.getLogger("reproduce")
SETTINGS = ("opd", "opsd")
DIAGNOSTICS = ("diag/trained/advantage_sign_flip_rate", "diag/trained/teacher_entropy",
               "diag/trained/teacher_top2_gap", "diag/trained/teacher_nll")


def run_dir(workdir: str, setting: str, method: str, seed: int) -> str:
    return os.path.join(workdir, "runs", f"{setting}-{method}-s{seed}")


def run_one(workdir: str, setting: str, method: str, seed: int, steps: int, eval_every: int,
            overrides: dict) -> dict:
    from trd_jax.controller import Trainer

    out = run_dir(workdir, setting, method, seed)
    done = os.path.join(out, "summary.json")
    if os.path.isfile(done):
        with open(done) as f:
            summary = json.load(f)
        if summary.get("status") == "completed":
            return summary
    cfg = method_config(method, setting, seed)
    apply_overrides(cfg, {"train.steps": steps, "eval.every": eval_every, "bootstrap.dir":
                          os.path.join(workdir, "bootstrap"), "log.progress": False, "export.enabled": False,
                          **overrides})
    start = time.perf_counter()
    summary = Trainer(cfg, out).run()
    log.info("%s %s seed %d: Avg %.3f -> %.3f in %.0f s", setting, method, seed,
             summary["initial_eval"]["avg_at_k"], summary["final_eval"]["avg_at_k"], time.perf_counter() - start)
    return summary


def _metrics(path: str) -> list[dict]:
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _mean_std(values) -> str:
    v = np.asarray(values, np.float64) * 100
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def aggregate(workdir: str, summaries: dict, seeds: list[int]) -> str:
    """results.md: final accuracy (mean ± std over seeds), cost per step and diagnostics per method."""
    lines = ["# TRD against token-level baselines on the embedded task", ""]
    any_run = next(iter(summaries.values()))
    ev = any_run["final_eval"]
    initial = {k: np.mean([r["initial_eval"][k] for r in summaries.values()]) for k in ("avg_at_k", "pass_at_k")}
    lines += [f"Final student accuracy after {any_run['steps']} steps: Avg@{ev['n']} and Pass@{ev['k']} (%) on "
              f"{ev['num_problems']} eval problems, mean ± standard deviation over seeds {seeds}. Initial student "
              f"(mean over the runs' evaluations): Avg@{ev['n']} {100 * initial['avg_at_k']:.1f}, Pass@{ev['k']} "
              f"{100 * initial['pass_at_k']:.1f}. Cost: wall seconds per step in the steady state "
              "(this machine), and generated tokens per step (rollout + refine). Diagnostics: means over steps of "
              "the trained trajectories' advantage sign-flip rate and teacher entropy.", ""]
    header = ("| setting | method | Avg@n | Pass@k | train acc. y_o / y_r | s / step | refine s / step | "
              "generated tok / step | sign flips | teacher entropy |")
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for (setting, method), runs in _group(summaries).items():
        avg = [r["final_eval"]["avg_at_k"] for r in runs.values()]
        pas = [r["final_eval"]["pass_at_k"] for r in runs.values()]
        warm = [r.get("phase_seconds_per_warm_step") or {} for r in runs.values()]
        step_s = np.mean([sum(w.values()) for w in warm])
        refine_s = np.mean([w.get("refine", 0.0) for w in warm])
        gen = np.mean([(r["phase_tokens"].get("rollout", 0) + r["phase_tokens"].get("refine", 0)) / r["steps"]
                       for r in runs.values()])
        diag = {k: np.mean([np.mean([m[k] for m in _metrics(run_dir(workdir, setting, method, s)) if k in m])
                            for s in runs]) for k in DIAGNOSTICS[:2]}
        acc = {k: np.mean([r["trajectory_accuracy"].get(k, np.nan) for r in runs.values()]) for k in ("y_o", "y_r")}
        acc_text = f"{100 * acc['y_o']:.0f}" + (f" / {100 * acc['y_r']:.0f}" if np.isfinite(acc["y_r"]) else "")
        lines.append(f"| {setting} | {method} | {_mean_std(avg)} | {_mean_std(pas)} | {acc_text} | {step_s:.2f} | "
                     f"{refine_s:.2f} | {gen:.0f} | {diag[DIAGNOSTICS[0]]:.3f} | {diag[DIAGNOSTICS[1]]:.3f} |")
    teacher = {s: next((r.get("teacher_eval") for (st, _), rs in _group(summaries).items() if st == s
                        for r in rs.values()), None) for s in SETTINGS}
    lines += ["", "Teacher accuracy (its vanilla context; OPSD: the initial student shown the reference): " +
              ", ".join(f"{s} Avg@{t['n']} {100 * t['avg_at_k']:.1f}" for s, t in teacher.items() if t), ""]
    return "\n".join(lines) + "\n"


def _group(summaries: dict) -> dict:
    out: dict = {}
    for (setting, method, seed), summary in summaries.items():
        out.setdefault((setting, method), {})[seed] = summary
    return out


def plot(workdir: str, summaries: dict) -> list[str]:
    """accuracy.png: student Avg@n against step, mean over seeds, one panel per setting; diagnostics.png:
    the trained trajectories' diagnostics against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(summaries)
    settings = sorted({s for s, _ in groups})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for (st, method), runs in groups.items():
            if st != setting:
                continue
            steps = [e["step"] for e in next(iter(runs.values()))["evals"]]
            acc = np.mean([[e["avg_at_k"] for e in r["evals"]] for r in runs.values()], axis=0)
            ax.plot(steps, 100 * acc, marker="o", label=method, lw=2.5 if method == "trd" else 1.2)
        ax.set(title=f"{setting.upper()}: student accuracy", xlabel="step", ylabel="Avg@n (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(workdir, "accuracy.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(settings), len(DIAGNOSTICS), figsize=(4.2 * len(DIAGNOSTICS), 3.4 * len(settings)),
                             squeeze=False)
    for row, setting in enumerate(settings):
        for col, key in enumerate(DIAGNOSTICS):
            ax = axes[row][col]
            for (st, method), runs in groups.items():
                if st != setting:
                    continue
                series = [[m.get(key, np.nan) for m in _metrics(run_dir(workdir, setting, method, s))] for s in runs]
                ax.plot(np.arange(1, len(series[0]) + 1), np.nanmean(series, axis=0), label=method,
                        lw=2.5 if method == "trd" else 1.2)
            ax.set(title=f"{setting.upper()}: {key.split('/')[-1]}", xlabel="step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "diagnostics.png"))
    fig.savefig(paths[1], dpi=70)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method and setting (>= 1)")
    parser.add_argument("--steps", type=int, default=default_config().train.steps)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--settings", default="opd,opsd")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. --set eval.n=8 (value parsed as JSON)")
    args = parser.parse_args(argv)
    settings, methods = args.settings.split(","), args.methods.split(",")
    for name, values, valid in (("--settings", settings, SETTINGS), ("--methods", methods, METHODS)):
        bad = [v for v in values if v not in valid]
        if bad:
            parser.error(f"{name}: unknown {bad}; choose from {', '.join(valid)}")
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    try:
        overrides = parse_overrides(args.set)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "trd_jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    summaries = {}
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    for seed in seeds:  # seed-major: an interrupted reproduction already covers every method once
        for setting in settings:
            for method in methods:
                summaries[setting, method, seed] = run_one(args.workdir, setting, method, seed, args.steps,
                                                           args.eval_every, overrides)
    report = aggregate(args.workdir, summaries, seeds)
    report += f"\nAll {len(summaries)} runs took {(time.perf_counter() - start) / 60:.1f} min in this invocation.\n"
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(report)
    paths = plot(args.workdir, summaries)
    print(report)
    print("plots:", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
