"""Evaluation metrics and reports (TRD_SPEC.md §5): Avg@k, unbiased Pass@k, JSON + markdown reports.

Input everywhere is a correctness matrix `correct: bool[P, n]`: n graded samples for each of P problems.
- Avg@n = mean correctness over all P*n samples.
- Pass@k = mean over problems of the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
  c = correct samples of that problem. With k = n it is exactly "fraction of problems with >= 1 correct"
  (the paper's Pass@16 with 16 samples); k < n gives a lower-variance estimate than sub-sampling.
- The Pass@k curve: Pass@k for k = 1, 2, 4, ... (powers of two up to n) and k = n.
- Greedy accuracy (one temperature-0 sample per problem) comes from the controller, beside this summary.
- Broadening: problems that no initial sample solved and at least one final sample solves.
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


def pass_at_ks(n: int) -> list[int]:
    """The k of the Pass@k curve for n samples: 1, 2, 4, ... (powers of two <= n), and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else ks + [n]


def summarize(correct: Any, k: int | None = None, *, problem_ids: Sequence[Any] | None = None) -> dict:
    """{avg_at_k, pass_at_k, k, n, num_problems, correct_counts, pass_at[, problem_ids]} of `correct: bool[P, n]`.

    k defaults to n. `pass_at` maps str(k) -> Pass@k for every k of pass_at_ks(n) (the curve; keys are strings
    so that the JSON round trip keeps them). `problem_ids` (length P) are kept for the per-problem report table."""
    a = _as_matrix(correct)
    num_problems, n = a.shape
    k = n if k is None else int(k)
    counts = a.sum(axis=1)
    out = {
        "avg_at_k": float(a.mean()),
        "pass_at_k": float(np.mean([pass_at_k(n, c, k) for c in counts])),
        "pass_at": {str(j): float(np.mean([pass_at_k(n, c, j) for c in counts])) for j in pass_at_ks(n)},
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


def broadened_if_comparable(initial_counts: Sequence[int], initial_n: int, final_counts: Sequence[int],
                            final_n: int) -> int | None:
    """broadened() when both evaluations count the same number of problems with the same n; None otherwise
    (eval.* may differ between a run's evaluations, e.g. after a resume, or between a run and its reference)."""
    if len(initial_counts) != len(final_counts) or initial_n != final_n:
        return None
    return broadened(initial_counts, final_counts, initial_n=initial_n, final_n=final_n)


def broadened(initial_counts: Sequence[int], final_counts: Sequence[int], *, initial_n: int | None = None,
              final_n: int | None = None) -> int:
    """Problems solved by no sample of the initial evaluation (0 correct) and by at least one sample of the
    final one: the problems training opened up. Both lists are `correct_counts` of the same problems in the
    same order; initial_n / final_n (samples per problem, when given) must be equal and bound the counts.
    Raises ValueError naming the mismatch otherwise."""
    initial, final = np.asarray(initial_counts), np.asarray(final_counts)
    if initial.ndim != 1 or final.ndim != 1 or len(initial) != len(final):
        raise ValueError(f"broadened: initial_counts has {initial.size} problems, final_counts {final.size}: "
                         "they must count the same problems")
    if initial_n is not None and final_n is not None and int(initial_n) != int(final_n):
        raise ValueError(f"broadened: initial n={initial_n} != final n={final_n} samples per problem")
    for name, counts, n in (("initial", initial, initial_n), ("final", final, final_n)):
        if (counts < 0).any() or (n is not None and (counts > int(n)).any()):
            raise ValueError(f"broadened: {name}_counts {counts.tolist()} are not all in [0, n={n}]")
    return int(np.sum((initial == 0) & (final >= 1)))


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def write_report(directory: str | os.PathLike, name: str, summary: Mapping[str, Any], *,
                 rows: int | None = None, title: str | None = None) -> tuple[str, str]:
    """Writes `DIR/name.json` (the whole summary, plus title) and `DIR/name.md` (metric | value table,
    percentages for Avg, Pass@k, the Pass@k curve of summary["pass_at"] and Greedy; with `rows`, a
    per-problem table of the first `rows` problems: problem id (summary["problem_ids"] or the index) and
    correct/total). Both files are written atomically.
    Returns (json_path, md_path)."""
    directory = os.fspath(directory)
    data = to_jsonable({**({"title": title} if title is not None else {}), **summary})
    n, k = data.get("n"), data.get("k")
    lines = [f"# {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for key, value in data.items():
        if key == "pass_at":  # the Pass@k curve, without the Pass@k already shown
            lines += [f"| Pass@{j} (%) | {_pct(v)} |" for j, v in value.items() if int(j) != k]
            continue
        if key in ("title", "correct_counts", "problem_ids") or isinstance(value, (dict, list)):
            continue  # nested values stay in the JSON
        if key == "avg_at_k":
            lines.append(f"| Avg@{n} (%) | {_pct(value)} |")
        elif key == "pass_at_k":
            lines.append(f"| Pass@{k} (%) | {_pct(value)} |")
        elif key == "greedy":
            lines.append(f"| Greedy (%) | {_pct(value)} |")
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
    """Markdown table of Avg@n and Pass@k (and Greedy when both have it) in % before/after training, with
    deltas in points."""
    if before.get("k") != after.get("k"):
        raise ValueError(f"compare_table: Pass@k with different k (before k={before.get('k')}, "
                         f"after k={after.get('k')}) is not comparable")
    lines = [f"| metric | {label_before} | {label_after} | Δ |", "|---|---|---|---|"]
    rows = [("avg_at_k", f"Avg@{after.get('n')}"), ("pass_at_k", f"Pass@{after.get('k')}")]
    if before.get("greedy") is not None and after.get("greedy") is not None:
        rows.append(("greedy", "Greedy"))
    for key, label in rows:
        b, a = float(before[key]), float(after[key])
        lines.append(f"| {label} (%) | {_pct(b)} | {_pct(a)} | {100.0 * (a - b):+.2f} |")
    return "\n".join(lines) + "\n"


def brief_metrics(brief: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's brief (the controller's evaluate()) as scalar metrics: eval/avg_at_k, eval/pass_at_k,
    eval/greedy, ..., and the Pass@k curve as eval/pass_at_<k> (the per-problem counts stay in summary.json)."""
    out = {f"eval/{k}": v for k, v in brief.items() if k not in ("step", "pass_at", "correct_counts")}
    out.update({f"eval/pass_at_{k}": v for k, v in brief.get("pass_at", {}).items()})
    return out
