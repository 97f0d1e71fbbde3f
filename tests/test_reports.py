"""The printed run report and its cost table."""

from trd_jax.reports import cost_table, run_report

SUMMARY = {
    "status": "completed", "steps": 4, "mode": "opd", "trajectory": "y_r", "loss": "forward_kl",
    "initial_eval": {"avg_at_k": 0.25, "pass_at_k": 0.5, "k": 4, "n": 4},
    "final_eval": {"avg_at_k": 0.75, "pass_at_k": 1.0, "k": 4, "n": 4},
    "teacher_eval": {"avg_at_k": 0.9, "pass_at_k": 1.0, "k": 4, "n": 4},
    "trajectory_accuracy": {"y_o": 0.5, "y_r": 0.8},
    "phase_seconds": {"rollout": 4.0, "refine": 6.0, "grade": 0.0, "score": 2.0, "update": 8.0, "eval": 3.0},
    "phase_tokens": {"rollout": 400, "refine": 380, "score": 1000, "update": 900, "eval": 50},
    "phase_flops": {"rollout": 1e9, "refine": 2e9, "score": 3e9, "update": 4e9},
    "phase_seconds_per_warm_step": {"rollout": 0.5, "refine": 1.0, "grade": 0.0, "score": 0.5, "update": 2.0},
    "warm_steps": 3,
}


def test_cost_table_uses_steady_state_seconds():
    table = cost_table(SUMMARY)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["refine"] == ["6.00", "1.000", "25.0%", "380", "2e+09"]
    assert rows["update"][2] == "50.0%" and rows["**step**"][:2] == ["20.00", "4.000"]
    assert rows["(eval, outside the step)"][0] == "3.00"
    assert "mean over 3 steps without compilation" in table
    # Without steady-state figures: totals divided by steps.
    plain = cost_table({**SUMMARY, "phase_seconds_per_warm_step": {}})
    assert "| refine | 6.00 | 1.500 |" in plain and "compilation included" in plain


def test_run_report_has_the_before_after_table_and_accuracies():
    text = run_report(SUMMARY)
    assert "| Avg@4 (%) | 25.00 | 75.00 | +50.00 |" in text and "| Pass@4 (%) | 50.00 | 100.00 | +50.00 |" in text
    assert "teacher (vanilla context): Avg@4 90.00%" in text and "accuracy of y_r during training: 80.00%" in text
    assert "Greedy" not in text and "Broadened" not in text  # summaries written before these existed still print
    text = run_report({**SUMMARY, "initial_eval": {**SUMMARY["initial_eval"], "greedy": 0.25, "num_problems": 4},
                       "final_eval": {**SUMMARY["final_eval"], "greedy": 0.75, "num_problems": 4},
                       "broadened_problems": 2})
    assert "| Greedy (%) | 25.00 | 75.00 | +50.00 |" in text and "Broadened: 2 of 4 problems" in text
