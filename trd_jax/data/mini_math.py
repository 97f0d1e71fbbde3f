"""A small grade-school math set with reference solutions, generated deterministically and written as
DeepScaleR-style JSONL (problem, answer, solution): the local data of the SmolLM2 recipe, which a 135M
model partly solves, so that OPSD and TRD have both right and wrong rollouts to learn from.

    python -m trd_jax.data.mini_math --out DIR [--train 256 --eval 32 --seed 0]

SmolLM2-135M-Instruct, prompted with the problem alone, seldom ends with a boxed answer (12% of responses
at temperature 0.6) and solves almost none; shown one worked example of the same kind first, as an earlier
chat turn (`task.shots=1`), it copies the format, and with operands up to 12 (`max_operand`) it solves
about one sampled answer in six (docs/smollm2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from trd_jax.data.math_task import MathTask
from trd_jax.data.task import Example


def _problem(rng: np.random.Generator, high: int = 20) -> dict[str, str]:
    """One problem of a random kind, its operands drawn from [2, high)."""
    kind = int(rng.integers(4))
    a, b, c = (int(v) for v in rng.integers(2, high, size=3))
    if kind == 0:
        problem = f"Tom has {a} apples. He buys {b} more apples. How many apples does Tom have now?"
        steps, answer = [f"Tom starts with {a} apples and buys {b} more, so he has {a} + {b} = {a + b} apples."], a + b
    elif kind == 1:
        a = a + b  # no negative answers
        problem = f"A box holds {a} pens. {b} pens are taken out. How many pens are left in the box?"
        steps, answer = [f"{b} of the {a} pens are taken out, so {a} - {b} = {a - b} pens are left."], a - b
    elif kind == 2:
        problem = f"A notebook costs {a} dollars. How much do {b} notebooks cost, in dollars?"
        steps, answer = [f"Each notebook costs {a} dollars, so {b} notebooks cost {b} * {a} = {a * b} dollars."], a * b
    else:
        problem = (f"Anna reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday she reads {c} pages "
                   "more than on Tuesday. How many pages does she read in the three days?")
        steps = [f"On Wednesday she reads {b} + {c} = {b + c} pages.",
                 f"In total she reads {a} + {b} + {b + c} = {a + 2 * b + c} pages."]
        answer = a + 2 * b + c
    solution = " ".join(steps) + f" The answer is $\\boxed{{{answer}}}$."
    return {"problem": problem, "answer": str(answer), "solution": solution}


# A phrase only problems of that kind contain, by kind (the order of _problem's kinds).
KIND_MARKERS = ("apples", "pens", "notebook", "pages")
SHOT_SEED = 1_000_003  # the worked examples' draw, apart from every split's (seed * 2, seed * 2 + 1)


def kind_of(problem: str) -> int:
    for kind, marker in enumerate(KIND_MARKERS):
        if marker in problem:
            return kind
    raise ValueError(f"not a mini_math problem: {problem[:80]!r}")


def shot_rows(per_kind: int, max_operand: int = 19) -> dict[int, list[dict[str, str]]]:
    """`per_kind` worked examples of each kind, drawn once from SHOT_SEED; never in a train or eval split."""
    out: dict[int, list[dict[str, str]]] = {k: [] for k in range(len(KIND_MARKERS))}
    rng = np.random.default_rng(SHOT_SEED)
    while any(len(rows) < per_kind for rows in out.values()):
        row = _problem(rng, max_operand + 1)
        rows = out[kind_of(row["problem"])]
        if len(rows) < per_kind and row not in rows:
            rows.append(row)
    return out


def num_problems(max_operand: int = 19) -> int:
    """Distinct problems with operands 2..max_operand: kinds 0-2 depend on (a, b), kind 3 on (a, b, c)."""
    n = max_operand - 1
    return 3 * n**2 + n**3


NUM_PROBLEMS = num_problems()


def generate(n: int, seed: int, exclude: set[str] = frozenset(), max_operand: int = 19) -> list[dict[str, str]]:
    """`n` distinct problems with operands 2..max_operand, none of them in `exclude` (problem texts)."""
    total = num_problems(max_operand)
    if n > total - len(exclude):
        raise ValueError(f"mini_math has {total} distinct problems with operands up to {max_operand}: {n} more "
                         f"than the {len(exclude)} excluded cannot be drawn")
    rng = np.random.default_rng(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        row = _problem(rng, max_operand + 1)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
    return rows


def write(out: str, *, train: int = 256, eval: int = 32, seed: int = 0, shots: int = 0,
          max_operand: int = 19) -> dict[str, str]:
    """Writes out/eval.jsonl and out/train.jsonl (disjoint problems, none of them one of the first `shots`
    worked examples per kind); returns their paths. The eval split is drawn first, so that it keeps the
    four kinds in equal shares even where the train split exhausts the small kinds (few operands)."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    seen = {row["problem"] for rows in shot_rows(shots, max_operand).values() for row in rows}
    for split, n, s in (("eval", eval, seed * 2 + 1), ("train", train, seed * 2)):
        rows = generate(n, s, exclude=seen, max_operand=max_operand)  # eval problems never appear in train
        seen |= {r["problem"] for r in rows}
        paths[split] = os.path.join(out, f"{split}.jsonl")
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if os.path.isfile(paths[split]):
            with open(paths[split]) as f:
                if f.read() == text:
                    continue  # unchanged: keep the file (and its time), so its built dataset is reused
        tmp = paths[split] + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, paths[split])
    return paths


class MiniMathTask(MathTask):
    """mini_math graded like any local math set; with `shots`, each prompt starts with that many worked
    examples of its problem's kind (Example.shots)."""

    def __init__(self, name: str, files: Mapping[str, str], *, shots: int = 0, max_operand: int = 19, **kwargs):
        super().__init__(name, files, **kwargs)
        self.shots = {kind: tuple((r["problem"] + "\n\n" + self.instruction, r["solution"]) for r in rows)
                      for kind, rows in shot_rows(shots, max_operand).items()}

    def prepare(self, ex: Example) -> Example:
        ex = super().prepare(ex)
        return dataclasses.replace(ex, shots=self.shots[kind_of(ex.problem)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, default=0, help="worked examples per kind kept out of both splits")
    p.add_argument("--max-operand", type=int, default=19)
    a = p.parse_args(argv)
    print(json.dumps(write(a.out, train=a.train, eval=a.eval, seed=a.seed, shots=a.shots,
                           max_operand=a.max_operand)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
