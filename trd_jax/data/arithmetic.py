"""The embedded synthetic reasoning task: running arithmetic modulo 10, solved one step per line.

    Problem:  Work modulo 10. Start with 4, add 7, multiply by 3, then subtract 5. <boxed instruction>
    Solution: 4 + 7 = 1
              1 * 3 = 3
              3 - 5 = 8
              The answer is \\boxed{8}.

Each line carries the previous result forward, so one wrong step makes every later value (and the
answer) wrong unless the solver repairs it: after a flawed prefix a teacher must choose between
continuing consistently with the error and fixing it, the two modes of prefix failure (TRD_SPEC §2).
The reference solution is OPSD's privileged context; ``flawed_solution`` writes the kind of attempt a
weak student makes (an early wrong step, then consistent arithmetic), and ``first_error`` finds the
first wrong step of any attempt.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import numpy as np

from trd_jax.data.task import Example
from trd_jax.data.toy_tokenizer import save_tokenizer
from trd_jax.refine import MATH_ANSWER_INSTRUCTION, TRUNCATION_NOTICE, refine_prompt_text, vanilla_teacher_context
from trd_jax.rewards.answers import last_boxed

MODULUS = 10
_PHRASE = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}"}
_APPLY = {"+": lambda a, b: (a + b) % MODULUS, "-": lambda a, b: (a - b) % MODULUS,
          "*": lambda a, b: (a * b) % MODULUS}
# Multipliers are units mod 10 (invertible): a wrong value stays wrong through every later step.
_MULTIPLIERS = (3, 7, 9)
_STEP_LINE = re.compile(r"^\s*(\d+) ([+\-*]) (\d+) = (\d+)\s*$")
_PROBLEM = re.compile(r"Start with (\d+), (.*?)\.\s")
_OP_PHRASE = re.compile(r"(?:then )?(add|subtract|multiply by) (\d+)")
_OP_OF = {"add": "+", "subtract": "-", "multiply by": "*"}


@dataclasses.dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (op in "+-*", operand 1..9)

    def values(self) -> list[int]:
        """The running values after each step (the last one is the answer)."""
        out, v = [], self.start
        for op, b in self.ops:
            v = _APPLY[op](v, b)
            out.append(v)
        return out


def problem_text(p: Problem) -> str:
    phrases = [_PHRASE[op].format(b) for op, b in p.ops]
    if len(phrases) > 1:
        phrases[-1] = "then " + phrases[-1]
    return f"Work modulo {MODULUS}. Start with {p.start}, {', '.join(phrases)}. {MATH_ANSWER_INSTRUCTION}"


def parse_problem(text: str) -> Problem:
    m = _PROBLEM.search(text)
    if not m:
        raise ValueError(f"not a running-arithmetic problem: {text[:80]!r}")
    ops = tuple((_OP_OF[name], int(b)) for name, b in _OP_PHRASE.findall(m.group(2)))
    return Problem(int(m.group(1)), ops)


def solution_text(p: Problem, values: Sequence[int] | None = None) -> str:
    """One line per step, ``a op b = c``, each a the previous line's c; then the boxed answer. ``values``
    overrides the results written (a flawed solution)."""
    values = p.values() if values is None else list(values)
    lines, prev = [], p.start
    for (op, b), v in zip(p.ops, values):
        lines.append(f"{prev} {op} {b} = {v}")
        prev = v
    lines.append(f"The answer is \\boxed{{{prev}}}.")
    return "\n".join(lines)


def flawed_solution(p: Problem, rng: np.random.Generator, *, error_step: int | None = None) -> tuple[str, int]:
    """A solution with one wrong result at ``error_step`` (random among the first half of the steps by
    default) and every later step computed correctly from it: the error propagates to the answer.
    Returns (text, error_step)."""
    n = len(p.ops)
    if error_step is None:
        error_step = int(rng.integers(0, max(1, (n + 1) // 2)))
    values, prev = [], p.start
    for i, (op, b) in enumerate(p.ops):
        v = _APPLY[op](prev, b)
        if i == error_step:
            v = (v + int(rng.integers(1, MODULUS))) % MODULUS  # any other digit
        values.append(v)
        prev = v
    return solution_text(p, values), error_step


def parse_steps(text: str) -> list[tuple[int, str, int, int]]:
    """The ``a op b = c`` lines of a solution, in order."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in
            (m.groups() for m in map(_STEP_LINE.match, text.splitlines()) if m)]


def first_error(text: str, p: Problem) -> int | None:
    """Index of the first step that is wrong: a missing line, a line whose input is not the previous
    correct value, a wrong operator or operand, or a wrong result. None when every step is right (the
    answer line is not checked here: see ArithmeticTask.grade)."""
    steps, prev = parse_steps(text), p.start
    for i, (op, b) in enumerate(p.ops):
        if i >= len(steps) or steps[i] != (prev, op, b, _APPLY[op](prev, b)):
            return i
        prev = steps[i][3]
    return None


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    min_steps: int = 3
    max_steps: int = 5
    train_size: int = 4000
    eval_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"task.min_steps={self.min_steps}: must be in [1, task.max_steps={self.max_steps}]")
        for name in ("train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)}: must be >= 1")


def _random_problem(rng: np.random.Generator, cfg: ArithmeticConfig) -> Problem:
    n = int(rng.integers(cfg.min_steps, cfg.max_steps + 1))
    ops = tuple((op, int(rng.choice(_MULTIPLIERS)) if op == "*" else int(rng.integers(1, MODULUS)))
                for op in (str(rng.choice(list(_PHRASE))) for _ in range(n)))
    return Problem(int(rng.integers(0, MODULUS)), ops)


def _tokenizer_corpus() -> list[str]:
    """Every text the task and the refine/vanilla templates can produce, for the vocabulary."""
    p = Problem(4, (("+", 7), ("*", 3), ("-", 5)))
    x, y = problem_text(p), solution_text(p)
    texts = [x, y, TRUNCATION_NOTICE]
    for mode in ("opd", "opsd"):
        texts.append(refine_prompt_text(x, y, y, mode=mode, task="math"))
        texts.append(vanilla_teacher_context(x, y, mode=mode, task="math")[0]["content"])
    return texts


class ArithmeticTask:
    """Deterministic train / eval splits (disjoint problems) from ``cfg.seed``, the verifier, and the
    tokenizer folder, written under ``directory`` on first use."""

    name = "arithmetic"
    kind = "math"

    def __init__(self, directory: str, cfg: ArithmeticConfig = ArithmeticConfig()):
        self.cfg = cfg
        self.tokenizer_dir = os.path.join(directory, "tokenizer")
        if not os.path.isfile(os.path.join(self.tokenizer_dir, "tokenizer.json")):
            save_tokenizer(self.tokenizer_dir, _tokenizer_corpus())
        rng = np.random.default_rng([cfg.seed, 7919])
        seen: set[Problem] = set()
        splits: dict[str, list[Example]] = {"eval": [], "train": []}
        for name, size in (("eval", cfg.eval_size), ("train", cfg.train_size)):
            while len(splits[name]) < size:
                p = _random_problem(rng, cfg)
                if p in seen:
                    continue
                seen.add(p)
                splits[name].append(Example(f"{name}-{len(splits[name])}", problem_text(p),
                                            str(p.values()[-1]), solution_text(p)))
        self._splits = splits

    def split(self, name: str) -> Sequence[Example]:
        if name not in self._splits:
            raise ValueError(f"arithmetic task: unknown split {name!r} (train, eval)")
        return self._splits[name]

    def grade(self, response: str, example: Example) -> float:
        return float(last_boxed(response) == example.answer)

    @staticmethod
    def problem_of(example: Example) -> Problem:
        return parse_problem(example.problem)
