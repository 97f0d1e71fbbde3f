"""Math answer grading: math-verify equivalences, the exact-match fast path, hard timeouts, threads, batches."""

import signal
import threading
import time

import numpy as np
import pytest

from trd_jax.rewards.math_grading import (
    MathGrader,
    close_default_grader,
    grade_math,
    grade_math_batch,
    math_verify_status,
)

# Allowed lateness of a timed-out answer beyond timeout + kill grace (pipe latency, a loaded machine).
SLACK_S = 1.0


def _hook(pred: str, gold: str) -> str:
    """Injected into the workers (pickled by reference): special answers misbehave, others grade normally."""
    if pred == "SLEEP":  # slow Python code: the worker's soft timer interrupts it
        time.sleep(30)
    if pred == "HANG":  # deaf to the timer, like a C-level hang: the parent must kill the worker
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)
    if pred == "BOOM":
        raise ValueError("sympy bug")
    return math_verify_status(pred, gold)


@pytest.fixture(scope="module")
def grader():
    with MathGrader(workers=2) as g:
        yield g


@pytest.fixture(scope="module")
def hooked():
    with MathGrader(workers=2, timeout_s=1.0, verify_fn=_hook) as g:
        g.grade_batch([r"\boxed{1}", r"\boxed{2}"], ["1.0", "2.0"])  # start both workers before timing
        yield g


# (gold, boxed answer) pairs a user expects to match.
MATCH = [
    ("1/2", r"\frac12"), ("1/2", "0.5"), (r"\frac{1}{2}", "0.5"), ("0.5", r"\frac{1}{2}"), ("1/2", r"\frac{2}{4}"),
    (r"\sqrt{8}", r"2\sqrt{2}"), (r"3\sqrt{2}", r"\sqrt{18}"), (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
    ("[1,2)", r"\left[1,2\right)"), (r"(-\infty, 3]", r"(-\infty,3]"), (r"\{1,2\}", r"\{2,1\}"),
    ("(3,4)", r"\left( 3, 4 \right)"), ("(1,2,3)", "(1, 2, 3)"),
    (r"10\%", "10"), ("10%", "10"), ("10", r"10\%"),
    (r"\frac{3}{4}", r"\dfrac{3}{4}"), (r"\frac34", r"\tfrac{3}{4}"),
    ("1000", "1,000"), ("1,000", "1000"), ("1000", r"1\,000"), ("1000", "1 000"), ("1000000", "1,000,000"),
    ("3", "x=3"), ("x=3", "3"), ("3", "x = 3"),
    ("x^2+1", "1+x^2"), ("(x+1)^2", "x^2+2x+1"), ("x^2+1", "x^{2}+1"),
    (r"\text{(B)}", "B"), (r"\text{(B)}", "(B)"), (r"\text{(B)}", r"\textbf{(B)}"),
    ("2", "2."), ("12", "12.0"), (r"\pi/2", r"\frac{\pi}{2}"), ("2^{10}", "1024"), (r"90^\circ", "90"),
    (r"\$5", "5"), ("4+2i", "2i+4"), ("-3", "- 3"),
    (r"The answer is $\boxed{7}$.", "7"),  # gold stored as a whole solution
    # Not equal as strings, so these go through math-verify (the ones above may take the fast path).
    ("1000.0", "1 000"), ("2.0", "2."), (r"\frac{3}{4}", r"\dfrac{6}{8}"), ("[1,2)", r"\left[1, 2.0\right)"),
    ("5", r"5\$"), (r"\$5", "$5$"),
]

# (gold, boxed answer) pairs that must not match.
MISMATCH = [
    ("1/2", "2"), (r"\frac12", r"-\frac12"), ("5", "50"), ("1,000", "1,001"),
    ("0", "1 000"),  # math-verify alone reads "1 000" as 1*0
    ("[1,2)", "[1,2]"), ("(1,2)", "[1,2)"), ("(1,2)", "(1,2]"),
    ("(3,4)", "(4,3)"), ("(1,2,3)", "(1,3,2)"),
    ("x^2+1", "x^2-1"), (r"2\sqrt{2}", r"\sqrt{2}"), (r"\text{(B)}", "C"), (r"\pi", "3.14"), (r"\sqrt{2}", "1.414"),
    (r"\{1,2\}", r"\{1,2,3\}"), ("3", "x=4"), ("12", "12, 13"), ("1", r"\text{The answer is 1}"),
]


@pytest.mark.parametrize("gold,answer", MATCH)
def test_equivalent_answers_match(grader, gold, answer):
    assert grader.grade(rf"So the result is \boxed{{{answer}}}.", gold) == 1.0


@pytest.mark.parametrize("gold,answer", MISMATCH)
def test_different_answers_do_not_match(grader, gold, answer):
    assert grader.grade(rf"So the result is \boxed{{{answer}}}.", gold) == 0.0


def test_parse_failures_are_reported(grader):
    grades = grader.grade_batch([r"\boxed{\frac{1}{}}", r"\boxed{3}"], ["1/2", r"\frac{}{"])
    assert grades.statuses == ["parse_error", "gold_parse_error"]
    assert grades.scores.tolist() == [0.0, 0.0]


def test_only_the_last_boxed_answer_counts(grader):
    response = r"First \boxed{3}, but on reflection \boxed{5}."
    assert grader.grade(response, "5") == 1.0
    assert grader.grade(response, "3") == 0.0


def test_no_boxed_answer_is_wrong_without_a_worker():
    with MathGrader() as g:
        grades = g.grade_batch(["The answer is 1/2", r"\boxed{}", r"\boxed{1/2", r"\boxed{.}"], ["1/2"] * 3 + [""])
        assert grades.scores.tolist() == [0.0] * 4
        assert grades.statuses == ["no_answer"] * 4
        assert g.worker_pids() == []


def test_exact_match_fast_path_needs_no_worker():
    with MathGrader() as g:
        grades = g.grade_batch([r"\boxed{\dfrac{1}{2}}", r"\boxed{\left( 1,2 \right)}", r"$\boxed{\text{(B)}}$"],
                               [r"\frac{1}{2}", "(1,2)", r"\text{(B)}"])
        assert grades.statuses == ["exact"] * 3
        assert g.worker_pids() == []


def test_soft_timeout_keeps_the_worker(hooked):
    pids = hooked.worker_pids()
    start = time.monotonic()
    grades = hooked.grade_batch([r"\boxed{SLEEP}"], ["1"], workers=1)
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert grades.statuses == ["timeout"] and grades.scores[0] == 0.0
    assert hooked.worker_pids() == pids
    assert hooked.grade(r"\boxed{0.5}", "1/2") == 1.0


def test_hard_timeout_replaces_a_stuck_worker(hooked):
    pids = hooked.worker_pids()
    start = time.monotonic()
    grades = hooked.grade_batch([r"\boxed{HANG}"], ["1"], workers=1)
    assert time.monotonic() - start < 1.0 + 0.5 + SLACK_S
    assert grades.statuses == ["timeout"]
    assert hooked.worker_pids()[0] != pids[0] and hooked.worker_pids()[1] == pids[1]
    assert hooked.grade(r"\boxed{0.5}", "1/2") == 1.0  # the pool still works


def test_timeouts_run_in_parallel(hooked):
    start = time.monotonic()
    grades = hooked.grade_batch([r"\boxed{SLEEP}", r"\boxed{SLEEP}", r"\boxed{0.5}"], ["1", "1", "1/2"])
    assert time.monotonic() - start < 2 * 1.0  # two workers: both sleeps overlap
    assert grades.statuses == ["timeout", "timeout", "match"]


def test_a_crashing_comparison_is_wrong(hooked):
    grades = hooked.grade_batch([r"\boxed{BOOM}", r"\boxed{3}"], ["1", "3"])
    assert grades.statuses == ["error", "exact"]


def test_pathological_sympy_input_times_out(grader):
    start = time.monotonic()
    grades = grader.grade_batch([r"\boxed{10^{10^{10}}}"], ["1"], timeout_s=1.0, workers=1)
    assert time.monotonic() - start < 1.0 + 0.5 + SLACK_S
    assert grades.scores[0] == 0.0 and grades.statuses == ["timeout"]
    assert grader.grade(r"\boxed{2\sqrt2}", r"\sqrt{8}") == 1.0


def test_grading_from_a_non_main_thread(grader):
    results = {}

    def run():
        results["pool"] = grader.grade(r"\boxed{0.5}", "1/2")
        results["default"] = grade_math(r"\boxed{\sqrt{18}}", r"3\sqrt{2}", timeout_s=2.0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    close_default_grader()
    assert results == {"pool": 1.0, "default": 1.0}


def test_batch_grading_and_stats():
    responses = [r"\boxed{0.5}", r"\boxed{3}", "no box", r"\boxed{x^2+2x+1}", r"\boxed{1/2}", r"\boxed{\sqrt{8}}"]
    golds = ["1/2", "4", "1", "(x+1)^2", "1/2", r"2\sqrt{2}"]
    stats: dict[str, int] = {}
    try:
        scores = grade_math_batch(responses, golds, timeout_s=2.0, workers=2, stats=stats)
    finally:
        close_default_grader()
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [1, 0, 0, 1, 1, 1])
    assert stats["exact"] == 1 and stats["match"] == 3 and stats["mismatch"] == 1 and stats["no_answer"] == 1
    assert stats["timeout"] == 0 and sum(stats.values()) == len(responses)


def test_grader_is_reusable_after_close(grader):
    grader.close()
    assert grader.worker_pids() == []
    assert grader.grade(r"\boxed{0.25}", r"\frac14") == 1.0


def test_mismatched_lengths_raise(grader):
    with pytest.raises(ValueError):
        grader.grade_batch(["a"], [])
