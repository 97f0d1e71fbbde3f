"""The SmolLM2 comparison's bookkeeping (trd_jax/experiments/smollm2.py) on hand-written run folders: the
rows of results.json, the table, and results of separate sessions merged."""

import json
import os

import pytest

from trd_jax.experiments import smollm2


def _eval(avg, n=8, problems=4):
    return {"avg_at_k": avg, "n": n, "num_problems": problems, "pass_at": {"1": avg, "8": min(1.0, 2 * avg)}}


def _write_run(workdir, name, summary, curve=()):
    path = os.path.join(workdir, name)
    os.makedirs(path)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"status": "completed", **summary}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, acc in curve:
            f.write(json.dumps({"step": step, "accuracy/y_o": acc}) + "\n")


def _method_summary(after, steps=2):
    return {"steps": steps, "final_eval": _eval(after),
            "phase_seconds": {"rollout": 30.0, "refine": 30.0, "score": 12.0, "update": 60.0, "eval": 48.0},
            "phase_tokens": {"rollout": 300, "refine": 500, "score": 900},
            "phase_seconds_per_warm_step": {"rollout": 14.0, "refine": 15.0, "score": 6.0, "update": 29.5},
            "trajectory_accuracy": {"y_o": 0.2, "y_r": 0.5}, "grading": {"exact": 3, "no_answer": 1}}


@pytest.fixture
def workdir(tmp_path):
    work = str(tmp_path / "work")
    _write_run(work, "opd-reference", {"steps": 0, "initial_eval": _eval(0.1), "teacher_eval": _eval(0.6),
                                       "teacher_sft": {"identity": "abc"}})
    _write_run(work, "opd-trd", _method_summary(0.4), curve=[(1, 0.1), (2, 0.3)])
    _write_run(work, "opd-forward_kl", {**_method_summary(0.3), "status": "interrupted"})  # not finished
    return work


def test_rows_name_the_method_and_its_costs(workdir):
    results = smollm2.aggregate(workdir, ["opd", "opsd"], ["trd", "forward_kl"])
    assert results["eval"] == {"temperature": 0.6, "top_p": 0.95, "n": 8, "problems": 4}
    assert results["student"] == {"avg_at_k": 0.1} and results["teacher"]["avg_at_k"] == 0.6
    assert "opsd_teacher" not in results  # its reference did not run
    (row,) = results["runs"]  # the interrupted run is left out
    assert (row["setting"], row["method"], row["loss"], row["trajectory"], row["teacher_context"]) == (
        "opd", "trd", "forward_kl", "y_r", "refine")
    assert (row["before"], row["after"], row["steps"]) == (0.1, 0.4, 2)
    assert row["generated_tokens_per_step"] == 400  # (rollout + refine tokens) / steps
    assert row["minutes"] == round(180.0 / 60, 1)  # every phase, evaluation included
    assert row["seconds_per_step"] == {"rollout": 14.0, "refine": 15.0, "score": 6.0, "update": 29.5}
    assert [c["y_o"] for c in row["curve"]] == [0.1, 0.3]
    table = smollm2.report(results)
    assert "| opd | trd | 2 | 10.0 | 40.0 | +30.0 | 20.0 | 50.0 | 3.0 | 400 | 14.0, 15.0, 6.0, 29.5 |" in table


def test_sessions_merge_and_a_different_student_is_refused(workdir, tmp_path):
    first = smollm2.aggregate(workdir, ["opd"], ["trd"])
    later = str(tmp_path / "later")
    _write_run(later, "opsd-reference", {"steps": 0, "initial_eval": _eval(0.1), "teacher_eval": _eval(0.3)})
    _write_run(later, "opsd-reverse_kl", _method_summary(0.2))
    merged = smollm2.merge(smollm2.aggregate(later, ["opsd"], ["reverse_kl"]), first)
    assert [(r["setting"], r["method"]) for r in merged["runs"]] == [("opsd", "reverse_kl"), ("opd", "trd")]
    assert merged["teacher"]["avg_at_k"] == 0.6 and merged["opsd_teacher"]["avg_at_k"] == 0.3
    assert smollm2.merge(first, {}) == first
    other = str(tmp_path / "other")
    _write_run(other, "opd-reference", {"steps": 0, "initial_eval": _eval(0.2), "teacher_eval": _eval(0.6)})
    with pytest.raises(ValueError, match="initial student scored 0.1"):
        smollm2.merge(smollm2.aggregate(other, ["opd"], ["trd"]), first)
