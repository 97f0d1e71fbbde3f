"""SmolLM2-135M-Instruct distilled on CPU (docs/smollm2): per setting, one shared 0-step run evaluates the
initial student and the setting's teacher (OPD: SmolLM2 fine-tuned here, trd_jax/teacher_sft.py; OPSD: the
student shown the reference), then each method trains from the same student for the same budget and is
evaluated once at the end. Runs go one after another (each uses both cores); finished ones are read back.

    python -m trd_jax.experiments.smollm2 --workdir runs/smollm2 --out docs/smollm2 \\
        [--settings opd,opsd] [--methods trd,forward_kl,reverse_kl] [--collect] [--set KEY=VALUE ...]

--collect only reports the finished runs in the workdir. Every run's final student is exported (Hugging Face
folder and PEFT adapter) in its export/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

from trd_jax.experiments.reproduce import _finished, _read_json
from trd_jax.metrics import atomic_write_json, atomic_write_text
from trd_jax.recipes import apply_overrides, get_method, parse_overrides, smollm2_config

log = logging.getLogger("trd_jax.experiments.smollm2")
SETTINGS = ("opd", "opsd")
METHODS = ("trd", "forward_kl", "reverse_kl")
PHASES = ("rollout", "refine", "score", "update")


def _config(workdir: str, setting: str, method: str, overrides: dict):
    cfg = apply_overrides(smollm2_config(setting), get_method(method).overrides)
    model = os.path.join(workdir, "models", "SmolLM2-135M-Instruct")  # converted once, shared by every run
    shared = {"student.path": model, "teacher_sft.dir": os.path.join(workdir, "teacher_sft"), "log.progress": False}
    if setting == "opd":
        shared["teacher.path"] = model
    return apply_overrides(cfg, {**shared, **overrides})


def run(workdir: str, name: str, cfg) -> dict:
    from trd_jax.controller import Trainer

    out = os.path.join(workdir, name)
    if (summary := _finished(out)) is not None:
        return summary
    start = time.perf_counter()
    summary = Trainer(cfg, out).run()
    log.info("%s: %.1f minutes", name, (time.perf_counter() - start) / 60)
    return summary


def reference(workdir: str, setting: str, overrides: dict) -> dict:
    """The shared evaluations of a setting: the initial student and its teacher, as a run of 0 steps."""
    cfg = _config(workdir, setting, "trd", {**overrides, "train.steps": 0, "eval.initial": True,
                                            "eval.teacher": True})
    return run(workdir, f"{setting}-reference", cfg)


def method_run(workdir: str, setting: str, method: str, overrides: dict) -> dict:
    cfg = _config(workdir, setting, method, {**overrides, "eval.initial": False, "eval.teacher": False,
                                             "export.enabled": True})
    return run(workdir, f"{setting}-{method}", cfg)


def _curve(path: str) -> list[dict]:
    """Per training step: the accuracy of the student's rollouts y_o (and of the rewrites y_r, for TRD)."""
    file = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(file):
        return []
    out = []
    with open(file) as f:
        for line in f:
            m = json.loads(line)
            if "accuracy/y_o" in m:
                out.append({"step": m["step"], "y_o": m["accuracy/y_o"], "y_r": m.get("accuracy/y_r")})
    return out


def record(workdir: str, setting: str, method: str, summary: dict, ref: dict) -> dict:
    steps = max(int(summary["steps"]), 1)
    wall = sum(summary["phase_seconds"].values())
    generated = summary["phase_tokens"].get("rollout", 0) + summary["phase_tokens"].get("refine", 0)
    return {"setting": setting, "method": method, **get_method(method).describe(),
            "steps": summary["steps"], "before": ref["initial_eval"]["avg_at_k"],
            "after": summary["final_eval"]["avg_at_k"], "pass_at_k_after": summary["final_eval"].get("pass_at"),
            "minutes": round(wall / 60, 1),
            "generated_tokens_per_step": round(generated / steps),
            "seconds_per_step": {p: round(summary["phase_seconds_per_warm_step"].get(p, 0.0), 2) for p in PHASES},
            "trajectory_accuracy": summary.get("trajectory_accuracy"),
            "grading": summary.get("grading"),
            "export": os.path.join(workdir, f"{setting}-{method}", "export"),
            "curve": _curve(os.path.join(workdir, f"{setting}-{method}"))}


def aggregate(workdir: str, settings, methods) -> dict:
    refs = {s: _finished(os.path.join(workdir, f"{s}-reference")) for s in settings}
    first = next((r for r in refs.values() if r), None)
    ev = (first or {}).get("initial_eval", {})
    results = {"model": "SmolLM2-135M-Instruct",
               "eval": {"temperature": 0.6, "top_p": 0.95, "n": ev.get("n"), "problems": ev.get("num_problems")},
               "student": {"avg_at_k": ev.get("avg_at_k")}, "runs": []}
    if refs.get("opd"):
        results["teacher"] = {"avg_at_k": refs["opd"]["teacher_eval"]["avg_at_k"],
                              "sft": refs["opd"].get("teacher_sft")}
    if refs.get("opsd"):
        results["opsd_teacher"] = {"avg_at_k": refs["opsd"]["teacher_eval"]["avg_at_k"]}
    for s in settings:
        for m in methods:
            summary = _finished(os.path.join(workdir, f"{s}-{m}"))
            if summary is not None and refs.get(s):
                results["runs"].append(record(workdir, s, m, summary, refs[s]))
    return results


def merge(new: dict, old: dict) -> dict:
    """`new` plus what `old` (an earlier results.json) has and `new` lacks: runs of other settings or methods
    and the reference evaluations, so that sessions that each run part of the comparison add up. Both must
    start from the same initial student (the same evaluation of the same model), else an error."""
    if not old.get("runs"):
        return new
    student = new["student"]["avg_at_k"]
    if student is not None and student != old["student"]["avg_at_k"]:
        raise ValueError(f"results.json holds runs whose initial student scored {old['student']['avg_at_k']}, this "
                         f"workdir's scored {student}: another task, model or evaluation; write to another --out")
    out = {**old, **{k: v for k, v in new.items() if k != "runs"}}
    if student is None:
        out["student"], out["eval"] = old["student"], old["eval"]
    done = {(r["setting"], r["method"]) for r in new["runs"]}
    out["runs"] = new["runs"] + [r for r in old["runs"] if (r["setting"], r["method"]) not in done]
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report(results: dict) -> str:
    lines = [f"# {results['model']} on CPU: results", "",
             f"Held-out Avg@{results['eval']['n']} (%) on {results['eval']['problems']} mini_math problems, "
             f"temperature {results['eval']['temperature']}, top-p {results['eval']['top_p']}.", "",
             f"- initial student: {_pct(results['student']['avg_at_k'])}"]
    if "teacher" in results:
        lines.append(f"- OPD teacher (SmolLM2 fine-tuned here): {_pct(results['teacher']['avg_at_k'])}")
    if "opsd_teacher" in results:
        lines.append(f"- OPSD teacher (the student shown the reference): {_pct(results['opsd_teacher']['avg_at_k'])}")
    lines += ["", "| setting | method | steps | before | after | gain | y_o acc. | y_r acc. | minutes "
                  "| gen. tokens / step | s / step: rollout, refine, score, update |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        acc = r.get("trajectory_accuracy") or {}
        sec = r["seconds_per_step"]
        lines.append(f"| {r['setting']} | {r['method']} | {r['steps']} | {_pct(r['before'])} | {_pct(r['after'])} | "
                     f"{100 * (r['after'] - r['before']):+.1f} | {_pct(acc.get('y_o'))} | {_pct(acc.get('y_r'))} | "
                     f"{r['minutes']} | {r['generated_tokens_per_step']} | "
                     f"{', '.join(f'{sec[p]:.1f}' for p in PHASES)} |")
    return "\n".join(lines) + "\n"


def plot(out: str, results: dict) -> str | None:
    if not results["runs"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results["runs"]):
        color = plt.cm.tab10(i)
        label = f"{r['setting']} {r['method']}"
        if r["curve"]:
            steps = np.array([c["step"] for c in r["curve"]])
            acc = np.array([c["y_o"] for c in r["curve"]], float)
            width = min(5, len(acc))
            smooth = np.convolve(acc, np.ones(width) / width, mode="valid")
            ax.plot(steps[width - 1:], 100 * smooth, color=color, alpha=0.6,
                    label=f"{label}: rollouts y_o (mean of {width})")
        ax.plot([0, r["steps"]], [100 * r["before"], 100 * r["after"]], "o--", color=color,
                label=f"{label}: held-out Avg@{results['eval']['n']}")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out, "accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="docs/smollm2")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--collect", action="store_true", help="only report the finished runs in --workdir")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, methods = a.settings.split(","), a.methods.split(",")
    for s in settings:
        if s not in SETTINGS:
            p.error(f"--settings: {s!r} is not one of {', '.join(SETTINGS)}")
    for m in methods:
        try:
            get_method(m)
        except ValueError as e:
            p.error(f"--methods: {e}")
    overrides = parse_overrides(a.set)
    if not a.collect:
        for s in settings:
            reference(a.workdir, s, overrides)
            for m in methods:
                method_run(a.workdir, s, m, overrides)
    results = merge(aggregate(a.workdir, settings, methods), _read_json(os.path.join(a.out, "results.json")))
    os.makedirs(a.out, exist_ok=True)
    atomic_write_json(os.path.join(a.out, "results.json"), results)
    atomic_write_text(os.path.join(a.out, "results.md"), report(results))
    plot(a.out, results)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
