"""Evaluation metrics and reports (TRD_SPEC.md §5): Avg@k, unbiased Pass@k, JSON + markdown reports.

Input everywhere is a correctness matrix `correct: bool[P, n]`: n graded samples for each of P problems.
- Avg@n = mean correctness over all P*n samples.
- Pass@k = mean over problems of the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
  c = correct samples of that problem. With k = n it is exactly "fraction of problems with >= 1 correct"
  (the paper's Pass@16 with 16 samples); k < n gives a lower-variance estimate than sub-sampling.
Host-side numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trd_jax.metrics import atomic_write_json, atomic_write_text, to_jsonable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, so it is exact enough for any n."""
    n, c, k = int(n), int(c), int(k)
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _as_matrix(correct: Any) -> np.ndarray:
    a = np.asarray(correct)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"correct must be a non-empty bool[P, n] matrix, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError("correct must hold booleans (or 0/1)")
        a = a.astype(bool)
    return a


def avg_at_k(correct: Any) -> float:
    """Mean correctness of `correct: bool[P, n]` (Avg@n)."""
    return float(_as_matrix(correct).mean())


def summarize(correct: Any, k: int | None = None, *, problem_ids: Sequence[Any] | None = None) -> dict:
    """{avg_at_k, pass_at_k, k, n, num_problems, correct_counts[, problem_ids]} of `correct: bool[P, n]`.

    k defaults to n. `problem_ids` (length P) are kept for the per-problem report table."""
    a = _as_matrix(correct)
    num_problems, n = a.shape
    k = n if k is None else int(k)
    counts = a.sum(axis=1)
    out = {
        "avg_at_k": float(a.mean()),
        "pass_at_k": float(np.mean([pass_at_k(n, c, k) for c in counts])),
        "k": k,
        "n": n,
        "num_problems": num_problems,
        "correct_counts": [int(c) for c in counts],
    }
    if problem_ids is not None:
        if len(problem_ids) != num_problems:
            raise ValueError(f"problem_ids has {len(problem_ids)} entries for {num_problems} problems")
        out["problem_ids"] = list(problem_ids)
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def write_report(directory: str | os.PathLike, name: str, summary: Mapping[str, Any], *,
                 rows: int | None = None, title: str | None = None) -> tuple[str, str]:
    """Writes `DIR/name.json` (the whole summary, plus title) and `DIR/name.md` (metric | value table,
    percentages for Avg/Pass; with `rows`, a per-problem table of the first `rows` problems: problem id
    (summary["problem_ids"] or the index) and correct/total). Both files are written atomically.
    Returns (json_path, md_path)."""
    directory = os.fspath(directory)
    data = to_jsonable({**({"title": title} if title is not None else {}), **summary})
    n, k = data.get("n"), data.get("k")
    lines = [f"# {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for key, value in data.items():
        if key in ("title", "correct_counts", "problem_ids") or isinstance(value, (dict, list)):
            continue  # nested values stay in the JSON
        if key == "avg_at_k":
            lines.append(f"| Avg@{n} (%) | {_pct(value)} |")
        elif key == "pass_at_k":
            lines.append(f"| Pass@{k} (%) | {_pct(value)} |")
        else:
            lines.append(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")
    counts = data.get("correct_counts")
    if rows and counts:
        ids = data.get("problem_ids") or list(range(len(counts)))
        shown = min(int(rows), len(counts))
        lines += ["", f"Per problem (first {shown} of {len(counts)}):", "", "| problem | correct / total |",
                  "|---|---|"]
        lines += [f"| {ids[i]} | {counts[i]}/{n} |" for i in range(shown)]
    json_path = atomic_write_json(os.path.join(directory, f"{name}.json"), data)
    md_path = atomic_write_text(os.path.join(directory, f"{name}.md"), "\n".join(lines) + "\n")
    return json_path, md_path


def compare_table(before: Mapping[str, Any], after: Mapping[str, Any], label_before: str = "before",
                  label_after: str = "after") -> str:
    """Markdown table of Avg@n and Pass@k (in %) before/after training, with deltas in points."""
    if before.get("k") != after.get("k"):
        raise ValueError(f"compare_table: Pass@k with different k (before k={before.get('k')}, "
                         f"after k={after.get('k')}) is not comparable")
    lines = [f"| metric | {label_before} | {label_after} | Δ |", "|---|---|---|---|"]
    for key, label in (("avg_at_k", f"Avg@{after.get('n')}"), ("pass_at_k", f"Pass@{after.get('k')}")):
        b, a = float(before[key]), float(after[key])
        lines.append(f"| {label} (%) | {_pct(b)} | {_pct(a)} | {100.0 * (a - b):+.2f} |")
    return "\n".join(lines) + "\n"
