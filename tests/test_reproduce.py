"""The reproduction's aggregation (results.json shape, intervals, significance, per-bootstrap and pooled rows)
and its command line, on fake run folders: no training."""

import json
import os

import numpy as np
import pytest

from trd_jax import stats
from trd_jax.experiments import reproduce as rp

N, P = 4, 6


def _fake_run(workdir, b, setting, method, seed, counts, *, in_summary):
    path = rp.run_dir(str(workdir), setting, method, seed, b)
    os.makedirs(os.path.join(path, "eval"))
    steps = 4
    final = {"step": steps, "avg_at_k": float(np.mean(counts)) / N, "pass_at_k": 0.5, "k": N, "n": N,
             "num_problems": P}
    if in_summary:  # the interface being added to summary.json
        final.update(correct_counts=[int(c) for c in counts], pass_at={"1": 0.25, "2": 0.5, "4": 0.75}, greedy=0.5)
    else:  # today: the counts are in the run's eval/step_XXXXXX.json
        with open(os.path.join(path, "eval", f"step_{steps:06d}.json"), "w") as f:
            json.dump({"correct_counts": [int(c) for c in counts], "n": N}, f)
    refine = 100 if method.startswith("trd") else 0
    summary = {"status": "completed", "steps": steps, "final_eval": final,
               "initial_eval": {"step": 0, "avg_at_k": 0.3, "pass_at_k": 0.6},
               "teacher_eval": {"avg_at_k": 0.9 if setting == "opd" else 0.8},
               "evals": [{"step": 0, "avg_at_k": 0.3}, {"step": 2, "avg_at_k": 0.4}, final],
               "phase_tokens": {"rollout": 400, "refine": 4 * refine, "eval": 999},
               "phase_flops": {"rollout": 4e6, "refine": 4e6 if refine else 0.0, "score": 2e6, "update": 6e6},
               "phase_seconds_per_warm_step": {"rollout": 0.2, "update": 0.1},
               "trajectory_accuracy": {"y_o": 0.5, **({"y_r": 0.7} if refine else {})},
               **({"broadened_problems": 2} if in_summary else {})}
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"eval": {"temperature": 0.6, "top_p": 0.95, "n": N}}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": step, "phase_tokens/rollout": 100, "phase_tokens/refine": refine,
                                 "diag/trained/teacher_entropy": 0.1}) + "\n" for step in range(1, steps + 1))
    return summary


@pytest.fixture
def fake(tmp_path):
    rng = np.random.default_rng(0)
    summaries, counts = {}, {}
    for b in (0, 1):
        for seed in (0, 1, 2):
            for setting in ("opd", "opsd"):
                for method, base in (("trd", 3), ("trd_vanilla_context", 2), ("forward_kl", 1), ("forward_kl@2x", 1)):
                    c = np.clip(base + rng.integers(-1, 2, P), 0, N) if method != "trd" or setting == "opd" else \
                        np.full(P, 2)
                    counts[b, setting, method, seed] = c
                    summaries[b, setting, method, seed] = _fake_run(tmp_path, b, setting, method, seed, c,
                                                                    in_summary=b == 0)
    return tmp_path, summaries, counts


def test_results_json_shape_rows_and_significance(fake):
    workdir, summaries, counts = fake
    results = rp.aggregate(str(workdir), summaries, resamples=400)
    path, md = rp.write_results(str(workdir), results)
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk["eval"] == {"temperature": 0.6, "top_p": 0.95, "n": N, "problems": P}
    assert on_disk["initial_student"]["avg_at_k"] == pytest.approx(0.3)
    assert on_disk["teacher"] == {"avg_at_k": pytest.approx(0.9)}
    assert on_disk["opsd_teacher"]["avg_at_k"] == pytest.approx(0.8)
    rows = on_disk["rows"]
    # Per setting and method: one row per bootstrap and one pooled ("all").
    assert len(rows) == 2 * 4 * 3
    assert {(r["setting"], r["method"], r["bootstrap"]) for r in rows} == {
        (s, m, b) for s in ("opd", "opsd") for m in ("trd", "trd_vanilla_context", "forward_kl", "forward_kl@2x")
        for b in (0, 1, "all")}
    row = next(r for r in rows if (r["setting"], r["method"], r["bootstrap"]) == ("opd", "trd", 0))
    assert set(row) >= {"setting", "method", "loss", "trajectory", "teacher_context", "bootstrap", "seeds", "avg_at_k",
                        "pass_at_k", "greedy", "broadened_problems", "generated_tokens_per_step", "flops_per_step",
                        "seconds_per_step"}
    assert (row["loss"], row["trajectory"], row["teacher_context"], row["seeds"]) == ("forward_kl", "y_r", "refine", 3)
    # Bootstrap 0: from summary.json's counts; its interval is stats.bootstrap_ci of the seeds' accuracies.
    matrix = np.stack([counts[0, "opd", "trd", s] / N for s in range(3)])
    mean, half, _, _ = stats.bootstrap_ci(matrix, resamples=400)
    assert row["avg_at_k"]["mean"] == pytest.approx(mean) and row["avg_at_k"]["ci95"] == pytest.approx(half)
    assert row["pass_at_k"] == {"1": 0.25, "2": 0.5, "4": 0.75} and row["greedy"] == 0.5
    assert row["broadened_problems"] == 2
    assert row["generated_tokens_per_step"] == 200 and row["flops_per_step"] == pytest.approx(4e6)
    assert row["seconds_per_step"] == pytest.approx(0.3)
    # Bootstrap 1: counts from eval/step_*.json, Pass@k computed from them, no greedy or broadening yet.
    row1 = next(r for r in rows if (r["setting"], r["method"], r["bootstrap"]) == ("opd", "forward_kl", 1))
    assert set(row1["pass_at_k"]) == {"1", "2", "4"} and row1["greedy"] is None and row1["broadened_problems"] is None
    acc1 = np.stack([counts[1, "opd", "forward_kl", s] / N for s in range(3)])
    assert row1["pass_at_k"]["1"] == pytest.approx(acc1.mean())
    assert row1["generated_tokens_per_step"] == 100
    # Pooled: both bootstraps' problems side by side, the grand mean over every run.
    pooled = next(r for r in rows if (r["setting"], r["method"], r["bootstrap"]) == ("opd", "forward_kl", "all"))
    both = np.concatenate([np.stack([counts[b, "opd", "forward_kl", s] / N for s in range(3)]) for b in (0, 1)])
    assert pooled["seeds"] == 6 and pooled["avg_at_k"]["mean"] == pytest.approx(both.mean())
    assert pooled["avg_at_k"]["low"] <= pooled["avg_at_k"]["mean"] <= pooled["avg_at_k"]["high"]
    # Significance: trd, then trd_vanilla_context, against each other method per setting, pooled; each pair once.
    sig = {(s["setting"], s["a"], s["b"]): s for s in on_disk["significance"]}
    others = ("forward_kl", "forward_kl@2x")
    assert set(sig) == {(s, "trd", m) for s in ("opd", "opsd") for m in ("trd_vanilla_context", *others)} | {
        (s, "trd_vanilla_context", m) for s in ("opd", "opsd") for m in others}
    assert all(s["low"] <= s["difference"] <= s["high"] for s in sig.values())
    assert sig["opd", "trd", "forward_kl"]["significant"] and sig["opd", "trd", "forward_kl"]["difference"] > 0.3
    vc = sig["opd", "trd_vanilla_context", "forward_kl"]  # the fake's counts 2 +- 1 against 1 +- 1 of 4
    a = np.concatenate([np.stack([counts[b, "opd", "trd_vanilla_context", s] / N for s in range(3)]) for b in (0, 1)])
    m = np.concatenate([np.stack([counts[b, "opd", "forward_kl", s] / N for s in range(3)]) for b in (0, 1)])
    assert vc["difference"] == pytest.approx(a.mean() - m.mean()) and vc["significant"]
    # The results table and its significance list.
    with open(md) as f:
        text = f.read()
    assert "## OPD" in text and "## OPSD" in text and "| forward_kl@2x | forward_kl | y_o | vanilla |" in text
    assert "- opd: trd - forward_kl = +" in text and "- opd: trd_vanilla_context - forward_kl = +" in text
    # Curves: cumulative generated tokens from metrics.jsonl, FLOPs as the mean per step x step.
    curve = results["curves"]["opd/trd"][0]
    assert [p["generated_tokens"] for p in curve] == [0, 400, 800] and curve[-1]["flops"] == pytest.approx(16e6)


def test_plots_are_written(fake):
    pytest.importorskip("matplotlib")
    workdir, summaries, _ = fake
    results = rp.aggregate(str(workdir), summaries, resamples=50)
    paths = rp.plot(str(workdir), results, summaries)
    assert [os.path.basename(p) for p in paths] == ["accuracy.png", "pass_at_k.png", "diagnostics.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_command_line_presets_and_methods(tmp_path):
    full = rp.parse_args(["--workdir", str(tmp_path)])
    assert (full.bootstraps, full.seeds) == (3, 5) and full.settings == ["opd", "opsd"]
    assert {"trd", "trd_vanilla_context", "trd_refine_wrong_only", "trd_fallback_wrong", "forward_kl@2x",
            "reverse_kl@2x", "jsd0.5"} <= set(full.methods)
    assert full.other_methods == ["trd", "reverse_kl", "forward_kl"] and full.jobs == 2 and full.eval_every == 0
    assert rp.parse_args(["--workdir", "d", "--other-bootstrap-methods", "all"]).other_methods == full.methods
    # Bootstrap 1+ methods are a subset of --methods, in their order.
    parsed = rp.parse_args(["--workdir", "d", "--methods", "reverse_kl,trd,jsd0.5",
                            "--other-bootstrap-methods", "trd,reverse_kl,forward_kl"])
    assert parsed.other_methods == ["reverse_kl", "trd"]
    quick = rp.parse_args(["--workdir", str(tmp_path), "--quick", "--seeds", "3"])
    assert (quick.bootstraps, quick.seeds) == (1, 3)
    assert quick.methods == ["trd", "trd_vanilla_context", "forward_kl", "reverse_kl"]
    assert rp.parse_args(["--workdir", "d", "--methods", "jsd0.5@2x,trd"]).methods == ["jsd0.5@2x", "trd"]
    assert full.bootstrap_ids == [0, 1, 2]
    assert rp.parse_args(["--workdir", "d", "--bootstrap-ids", "2,1,2"]).bootstrap_ids == [1, 2]  # a third alone
    for bad in (["--methods", "trd@2x"], ["--methods", "sft"], ["--settings", "rl"], ["--bootstraps", "0"],
                ["--bootstrap-ids", "x"], ["--bootstrap-ids", "-1"]):
        with pytest.raises(SystemExit):
            rp.parse_args(["--workdir", "d", *bad])
    assert rp.run_dir("D", "opd", "trd", 2, 1) == os.path.join("D", "runs", "b1", "opd-trd-s2")
    assert rp.bootstrap_dir("D", 0) == os.path.join("D", "bootstrap")
    assert rp.bootstrap_dir("D", 2) == os.path.join("D", "bootstrap-2")


def test_shared_reference_evaluations_fill_runs_that_skipped_them(tmp_path):
    """Method runs skip the initial and teacher evaluations (eval.initial / eval.teacher off); the
    bootstrap's reference run supplies them: the curve's step 0, the broadening against the initial
    student's per-problem counts, and the per-bootstrap initial student and teachers."""
    initial = [0, 0, 1, 0, 4, 0]
    summaries = {}
    for seed, final in enumerate(([0, 2, 1, 0, 4, 0], [1, 0, 0, 0, 3, 1])):
        s = _fake_run(tmp_path, 0, "opd", "forward_kl", seed, final, in_summary=True)
        for key in ("initial_eval", "teacher_eval", "broadened_problems"):
            s.pop(key)
        s["evals"] = [e for e in s["evals"] if e["step"] != 0]
        summaries[0, "opd", "forward_kl", seed] = s
    ref = {"initial_eval": {"step": 0, "avg_at_k": 0.2, "pass_at_k": 0.4, "greedy": 0.25, "n": N,
                            "correct_counts": initial},
           "teacher_eval": {"avg_at_k": 0.95, "pass_at_k": 1.0}}
    opsd_ref = {"initial_eval": ref["initial_eval"], "teacher_eval": {"avg_at_k": 0.85, "pass_at_k": 1.0}}
    results = rp.aggregate(str(tmp_path), summaries, {(0, "opd"): ref, (0, "opsd"): opsd_ref}, resamples=50)
    row = next(r for r in results["rows"] if r["bootstrap"] == 0)
    # Problems 0, 1, 3 and 5 were never solved initially: seed 0 solves 1, seed 1 solves 0 and 5.
    assert row["broadened_problems"] == pytest.approx(1.5)
    assert [p["step"] for p in results["curves"]["opd/forward_kl"][0]] == [0, 2, 4]
    assert results["curves"]["opd/forward_kl"][0][0]["avg_at_k"] == 0.2
    assert results["initial_student"]["avg_at_k"] == pytest.approx(0.2)
    assert results["teacher"]["avg_at_k"] == pytest.approx(0.95)
    assert results["bootstraps"]["0"] == {
        "initial_student": {"avg_at_k": 0.2, "pass_at_k": 0.4, "greedy": 0.25},
        "teacher": {"avg_at_k": 0.95, "pass_at_k": 1.0, "greedy": None},
        "opsd_teacher": {"avg_at_k": 0.85, "pass_at_k": 1.0, "greedy": None}}


@pytest.mark.slow
def test_command_runs_shares_evaluations_and_keeps_exports(tmp_path, monkeypatch):
    """The command end to end on the shipped bootstrap, in this process (--jobs 1), tiny: one reference per
    setting, then one-step runs that skip the shared evaluations; results.json in --out, each run's final
    student exported, and a second invocation reads every finished run back instead of training again."""
    monkeypatch.setenv("TRD_JAX_COMPILATION_CACHE", "off")
    out = tmp_path / "out"
    argv = ["--workdir", str(tmp_path / "w"), "--out", str(out), "--jobs", "1", "--bootstraps", "1", "--seeds", "1",
            "--steps", "1", "--eval-every", "0", "--methods", "trd,forward_kl", "--settings", "opd",
            "--set", "eval.num_problems=8", "--set", "eval.n=2", "--set", "eval.greedy=false",
            "--set", "train.batch_size=4"]
    assert rp.main(argv) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["eval"]["n"] == 2 and results["eval"]["problems"] == 8
    assert {r["method"] for r in results["rows"]} == {"trd", "forward_kl"}
    assert results["bootstraps"]["0"]["teacher"]["avg_at_k"] is not None
    for method in ("trd", "forward_kl"):
        run = rp.run_dir(str(tmp_path / "w"), "opd", method, 0, 0)
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
        assert summary["initial_eval"] is None and "teacher_eval" not in summary  # shared, not repeated
        assert os.path.isfile(os.path.join(run, "export", "config.json"))
    stamp = os.path.getmtime(os.path.join(rp.run_dir(str(tmp_path / "w"), "opd", "trd", 0, 0), "summary.json"))
    assert rp.main(argv) == 0
    assert os.path.getmtime(os.path.join(rp.run_dir(str(tmp_path / "w"), "opd", "trd", 0, 0), "summary.json")) == stamp
    os.remove(out / "results.json")
    assert rp.main(["--workdir", str(tmp_path / "w"), "--out", str(out), "--steps", "1", "--collect"]) == 0
    with open(out / "results.json") as f:
        collected = json.load(f)
    assert collected["rows"] == results["rows"]
    # On 16 problems without training again: the first 8 repeat each run's own evaluation, sample for sample.
    assert rp.main(["--workdir", str(tmp_path / "w"), "--out", str(out), "--steps", "1", "--collect", "--jobs", "1",
                    "--reevaluate", "16", *argv[argv.index("--set"):]]) == 0
    with open(out / "results.json") as f:
        wider = json.load(f)
    assert wider["eval"]["problems"] == 16 and {r["method"] for r in wider["rows"]} == {"trd", "forward_kl"}
    for run in (rp.run_dir(str(tmp_path / "w"), "opd", "trd", 0, 0), rp.reference_dir(str(tmp_path / "w"), "opd")):
        with open(os.path.join(run, "reeval-16.json")) as f:
            again = json.load(f)
        assert again["problems"] == 16 and again["matches_original"] is True
    assert os.path.getmtime(os.path.join(rp.run_dir(str(tmp_path / "w"), "opd", "trd", 0, 0), "summary.json")) == stamp


def test_collect_reads_every_finished_run_of_the_budget(fake):
    """--collect: the runs any earlier invocation finished, keyed as run_one's calls; unfinished runs, runs of
    another step count, runs without their bootstrap's reference and foreign folders are left out."""
    tmp_path, summaries, _ = fake
    for b in (0, 1):
        for setting in ("opd", "opsd"):
            os.makedirs(rp.reference_dir(str(tmp_path), setting, b))
            with open(os.path.join(rp.reference_dir(str(tmp_path), setting, b), "summary.json"), "w") as f:
                json.dump({"status": "completed", "steps": 0, "initial_eval": {"avg_at_k": 0.1}}, f)
    unfinished = rp.run_dir(str(tmp_path), "opd", "reverse_kl", 0, 0)
    os.makedirs(unfinished)
    with open(os.path.join(unfinished, "summary.json"), "w") as f:
        json.dump({"status": "preempted", "steps": 2}, f)
    other_budget = _fake_run(tmp_path, 0, "opd", "jsd0.5", 0, np.ones(P), in_summary=True)
    other_budget_dir = rp.run_dir(str(tmp_path), "opd", "jsd0.5", 0, 0)
    with open(os.path.join(other_budget_dir, "summary.json"), "w") as f:
        json.dump({**other_budget, "steps": 3}, f)
    os.makedirs(tmp_path / "runs" / "notes")
    orphan = _fake_run(tmp_path, 2, "opd", "trd", 0, np.ones(P), in_summary=True)  # bootstrap 2 has no reference
    assert orphan["status"] == "completed"

    runs, refs = rp.collect(str(tmp_path), 4)
    assert set(refs) == {(b, s) for b in (0, 1) for s in ("opd", "opsd")}
    assert set(runs) == set(summaries) and runs[0, "opd", "forward_kl@2x", 2] == summaries[0, "opd", "forward_kl@2x", 2]
    assert rp.collect(str(tmp_path), 3)[0] == {(0, "opd", "jsd0.5", 0): {**other_budget, "steps": 3}}


def test_a_worker_ends_when_its_reproduction_is_killed():
    """reproduce's workers watch their parent: a reproduction killed with SIGKILL leaves no worker running (one
    kept running its runs for half an hour once)."""
    import subprocess
    import sys
    import time

    def alive(pid: int) -> bool:  # an exited child nobody reaped is a zombie: ended
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    child = ("import time; from trd_jax.experiments.reproduce import _exit_with_parent; _exit_with_parent(0.1); "
             "print('ready', flush=True); time.sleep(120)")
    parent = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {child!r}], "
              "stdout=subprocess.PIPE, text=True); c.stdout.readline(); print(c.pid, flush=True); time.sleep(120)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=root)
    pid = int(p.stdout.readline())
    assert alive(pid)
    p.kill()
    p.wait()
    deadline = time.time() + 20
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "the worker outlived its killed parent"
