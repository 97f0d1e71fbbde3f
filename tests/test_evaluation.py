import itertools
import json
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from trd_jax import evaluation
from trd_jax.evaluation import (
    avg_at_k,
    broadened,
    compare_table,
    pass_at_k,
    pass_at_ks,
    summarize,
    write_report,
)


def brute_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_stability():
    for n in (1, 5, 16, 200):
        for k in (1, n // 2 or 1, n):
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
    # Large n: binomials of ~300 digits, compared against exact rational arithmetic.
    exact = 1 - Fraction(math.comb(997, 500), math.comb(1000, 500))
    assert pass_at_k(1000, 3, 500) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 1, 0), (4, 5, 2), (4, -1, 2)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError) as e:
        pass_at_k(n, c, k)
    assert f"n={n}" in str(e.value)
    if not 1 <= k <= n:
        assert f"k={k}" in str(e.value)


CORRECT = np.array([[1, 0, 0, 0],
                    [0, 0, 0, 0],
                    [1, 1, 1, 1]], dtype=bool)


def test_summarize_hand_made():
    s = summarize(CORRECT)
    assert s["avg_at_k"] == pytest.approx(5 / 12)
    assert s["pass_at_k"] == pytest.approx(2 / 3)  # k = n: fraction with >= 1 correct
    assert (s["k"], s["n"], s["num_problems"], s["correct_counts"]) == (4, 4, 3, [1, 0, 4])
    assert summarize(CORRECT, k=1)["pass_at_k"] == pytest.approx(5 / 12)  # Pass@1 == Avg
    assert summarize(CORRECT, k=2)["pass_at_k"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert avg_at_k(CORRECT.astype(int)) == pytest.approx(5 / 12)
    with pytest.raises(ValueError, match="k=5, n=4"):
        summarize(CORRECT, k=5)
    with pytest.raises(ValueError, match="shape"):
        avg_at_k(np.ones(4, bool))
    with pytest.raises(ValueError, match="booleans"):
        avg_at_k(np.full((2, 2), 2))
    with pytest.raises(ValueError, match="problem_ids"):
        summarize(CORRECT, problem_ids=["a"])


def test_pass_at_curve_matches_subset_enumeration():
    """summarize's pass_at: for each k, the fraction of k-subsets of each row's samples holding a correct one,
    averaged over problems, enumerated with itertools.combinations on the matrix itself."""
    rng = np.random.default_rng(3)
    for n in (1, 3, 4, 6, 8):
        correct = rng.random((5, n)) < 0.3
        correct[0] = False
        correct[1] = True
        got = summarize(correct)["pass_at"]
        assert list(got) == [str(k) for k in pass_at_ks(n)]
        for key, value in got.items():
            k = int(key)
            per_problem = []
            for row in correct:
                subsets = list(itertools.combinations(range(n), k))
                per_problem.append(sum(bool(row[list(s)].any()) for s in subsets) / len(subsets))
            assert value == pytest.approx(np.mean(per_problem), abs=1e-12), (n, k)
    assert pass_at_ks(1) == [1] and pass_at_ks(8) == [1, 2, 4, 8] and pass_at_ks(6) == [1, 2, 4, 6]
    assert pass_at_ks(16) == [1, 2, 4, 8, 16] and pass_at_ks(20) == [1, 2, 4, 8, 16, 20]
    s = summarize(CORRECT, k=2)  # pass_at does not depend on k; pass_at_k is its k's entry
    assert s["pass_at"]["2"] == s["pass_at_k"] and s["pass_at"]["4"] == pytest.approx(2 / 3)
    assert s["pass_at"]["1"] == pytest.approx(s["avg_at_k"])


def test_broadened():
    # problems 0 and 2 unsolved initially; 2 becomes solved; 1 was already solved; 3 lost.
    assert broadened([0, 3, 0, 2], [0, 4, 1, 0]) == 1
    assert broadened([0, 0], [16, 1], initial_n=16, final_n=16) == 2
    assert broadened([], []) == 0
    with pytest.raises(ValueError, match="3 problems, final_counts 2"):
        broadened([0, 1, 2], [1, 1])
    with pytest.raises(ValueError, match="initial n=4 != final n=8"):
        broadened([0], [1], initial_n=4, final_n=8)
    with pytest.raises(ValueError, match=r"final_counts \[5\] are not all in \[0, n=4\]"):
        broadened([0], [5], initial_n=4, final_n=4)
    # Evaluations that cannot be compared (another problem count or n) give None instead of an error.
    assert evaluation.broadened_if_comparable([0, 3, 0], 4, [1, 4, 0], 4) == 1
    assert evaluation.broadened_if_comparable([0, 3, 0], 4, [1, 4], 4) is None
    assert evaluation.broadened_if_comparable([0, 3, 0], 4, [1, 4, 0], 8) is None
    with pytest.raises(ValueError, match="not all in"):  # comparable but out of range: still an error
        evaluation.broadened_if_comparable([0], 4, [5], 4)


def test_write_report(tmp_path):
    s = summarize(CORRECT, problem_ids=["aime-1", "aime-2", "aime-3"])
    s["max_new_tokens"] = np.int64(38912)  # numpy values are converted
    jp, mp = write_report(tmp_path / "eval", "final", s, rows=2, title="AIME24 final")
    assert sorted(os.listdir(tmp_path / "eval")) == ["final.json", "final.md"]  # no temp files left
    data = json.loads(Path(jp).read_text())
    assert data["title"] == "AIME24 final" and data["correct_counts"] == [1, 0, 4]
    assert data["max_new_tokens"] == 38912 and data["pass_at_k"] == pytest.approx(2 / 3)
    md = Path(mp).read_text()
    assert md.startswith("# AIME24 final")
    assert "| Avg@4 (%) | 41.67 |" in md and "| Pass@4 (%) | 66.67 |" in md
    assert "| Pass@1 (%) | 41.67 |" in md and "| Pass@2 (%) | 50.00 |" in md and md.count("Pass@4") == 1
    assert data["pass_at"] == {"1": pytest.approx(5 / 12), "2": pytest.approx(0.5), "4": pytest.approx(2 / 3)}
    _, mp = write_report(tmp_path, "greedy", {**summarize(CORRECT), "greedy": 1 / 3})
    assert "| Greedy (%) | 33.33 |" in Path(mp).read_text()
    assert "| aime-1 | 1/4 |" in md and "| aime-2 | 0/4 |" in md and "aime-3" not in md
    # Without ids or rows: index ids, no per-problem table.
    _, mp = write_report(tmp_path, "plain", summarize(CORRECT))
    assert "per problem" not in Path(mp).read_text().lower()
    _, mp = write_report(tmp_path, "idx", summarize(CORRECT), rows=10)
    assert "| 2 | 4/4 |" in Path(mp).read_text()


def test_write_report_is_atomic(tmp_path, monkeypatch):
    write_report(tmp_path, "r", summarize(CORRECT))
    before = (tmp_path / "r.json").read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_report(tmp_path, "r", summarize(CORRECT[:1]))
    assert (tmp_path / "r.json").read_text() == before  # old report intact
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.md"]  # temp file cleaned up
    monkeypatch.undo()
    with pytest.raises(TypeError):  # unserialisable: fails before anything is written
        write_report(tmp_path, "bad", {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.md"]


def test_compare_table():
    before = {"avg_at_k": 0.3, "pass_at_k": 0.41, "k": 16, "n": 16}
    after = {"avg_at_k": 0.35, "pass_at_k": 0.615, "k": 16, "n": 16}
    table = compare_table(before, after, "base", "TRD")
    assert table.splitlines()[0] == "| metric | base | TRD | Δ |"
    assert "| Avg@16 (%) | 30.00 | 35.00 | +5.00 |" in table
    assert "| Pass@16 (%) | 41.00 | 61.50 | +20.50 |" in table
    with pytest.raises(ValueError, match="k=8"):
        compare_table({**before, "k": 8}, after)
    assert "| Pass@16 (%) | 61.50 | 41.00 | -20.50 |" in evaluation.compare_table(after, before)
    assert "Greedy" not in table  # only when both sides have it
    table = compare_table({**before, "greedy": 0.25}, {**after, "greedy": 0.5})
    assert "| Greedy (%) | 25.00 | 50.00 | +25.00 |" in table
