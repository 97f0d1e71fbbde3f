"""The pieces of the teacher-context and student-error experiments that decide what they report: the mistake
classifier (error_kinds), the pooled tally, and the classes of rewrite positions against the rollout."""

import os

import pytest

from trd_jax.data.arithmetic import Problem, error_kinds, solution_text, step_errors
from trd_jax.experiments.student_errors import tally
from trd_jax.experiments.teacher_context import position_classes

P = Problem(8, (("+", 1), ("+", 2), ("-", 1), ("+", 1)))  # 8 -> 9 -> 1 (wraps) -> 0 -> 1


def test_error_kinds_name_each_local_mistake_once():
    assert solution_text(P).splitlines()[1] == "Step 2: 9 + 2 = 1"
    text = ("Step 1: 8 + 1 = 9\nStep 2: 9 + 2 = 2\n"  # wrong result on a wrapping line
            "Step 3: 2 + 1 = 3\n"  # neither form of "- 1" (+ 9 would be): a wrong operation
            "Step 4: 4 + 1 = 6\nThe answer is \\boxed{6}.")  # input not carried (3 above); its result wrong too
    assert error_kinds(text, P) == ["wrap", "operation", "carried"]
    assert len(error_kinds(text, P)) == len(step_errors(text, P))
    plain = "Step 1: 8 + 1 = 7\nStep 2: 7 + 2 = 9\nStep 3: 9 - 1 = 8\nStep 4: 8 + 1 = 9"
    assert error_kinds(plain, P) == ["plain"]  # the later lines are right for their input: not counted again
    assert error_kinds("Step 1: 8 + 1 = 9\nStep 3: 1 + 9 = 0\nStep 4: 0 + 1 = 1", P) == ["missing"]  # complement ok
    assert error_kinds(solution_text(P), P) == []


def test_tally_pools_answers_per_kind():
    good, wrap = solution_text(P), "Step 1: 8 + 1 = 9\nStep 2: 9 + 2 = 2\nStep 3: 2 - 1 = 1\nStep 4: 1 + 1 = 2"
    r = tally([good, wrap, wrap, good], [P] * 4)
    assert r["answers"] == 4 and r["without_mistakes"] == 0.5
    assert r["per_answer"] == {"missing": 0.0, "operation": 0.0, "carried": 0.0, "wrap": 0.5, "plain": 0.0}


def test_position_classes_split_a_rewrite_at_its_first_departure():
    y_o = [5, 6, 7, 8, 9]
    assert position_classes(y_o, [5, 6, 1, 8, 2, 3]).tolist() == [0, 0, 1, 2, 1, 1]  # past y_o's end: an edit
    assert position_classes(y_o, y_o).tolist() == [0] * 5
    assert position_classes([], [4, 4]).tolist() == [1, 1]
    assert position_classes(y_o, [5, 6]).tolist() == [0, 0]  # a shorter rewrite


@pytest.mark.slow
def test_both_experiments_measure_the_shipped_bootstrap(tmp_path):
    """A few prompts through each experiment on the shipped models: the figures it reports are there and sane."""
    from trd_jax.bootstrap import SHIPPED_DIR
    from trd_jax.experiments import student_errors, teacher_context

    r = teacher_context.measure(str(tmp_path), "opd", 8, 0)
    assert r["rewritten"] == 8 and sum(r["positions"].values()) > 8 * 20  # every token of every rewrite classed
    for c in teacher_context.CONTEXTS:
        kept = r["contexts"]["kept"][c]
        assert 0.9 < kept["p_target"] <= 1 and kept["fkl"] >= 0 and 0 <= kept["entropy"]
    assert all(v >= 0 for v in r["kl_vanilla_refine"].values())
    assert "## OPD, student bootstrap: 8 rewrites of 8 rollouts" in teacher_context.report([r])
    # The shipped student again, as if it were a trained one (its own sampling key).
    out = student_errors.measure({"again": [os.path.join(SHIPPED_DIR, "student")]}, 8, 0)
    assert out["problems"] == 8 and out["students"]["again"]["answers"] == 8
    assert 0 <= out["students"]["initial"]["without_mistakes"] <= 1
    assert "| again | 8 |" in student_errors.report(out)
