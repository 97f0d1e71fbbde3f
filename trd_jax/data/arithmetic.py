"""The embedded synthetic reasoning task: running arithmetic modulo 10, one step per line.

    Problem:  Work modulo 10. Start with 8. Step 1: subtract 2. Step 2: add 1. Step 3: add 2. <boxed instruction>
    Solution: Step 1: 8 - 2 = 6
              Step 2: 6 + 1 = 7
              Step 3: 7 + 2 = 9
              The answer is \\boxed{9}.

Each line carries the previous result forward, so one wrong step makes every later value (and the
answer: adding a constant mod 10 is a bijection) wrong unless the solver repairs it. After a flawed
prefix a teacher must choose between continuing consistently with the error and fixing it: the two
modes of prefix failure (TRD_SPEC §2). Operands are small (1 .. max_operand) so that a 2-layer model
trained from scratch learns the task in a few hundred steps on a CPU (general mod-10 arithmetic needs
thousands: it is learned by "grokking").

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
_PHRASE = {"+": "add {}", "-": "subtract {}"}
_APPLY = {"+": lambda a, b: (a + b) % MODULUS, "-": lambda a, b: (a - b) % MODULUS}
_STEP_LINE = re.compile(r"^\s*Step (\d+): (\d+) ([+-]) (\d+) = (\d+)\s*$")
_PROBLEM = re.compile(r"Start with (\d+)\.(.*?)Please")
_OP_PHRASE = re.compile(r"Step \d+: (add|subtract) (\d+)\.")
_OP_OF = {"add": "+", "subtract": "-"}


@dataclasses.dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (op in "+-", operand)

    def values(self) -> list[int]:
        """The running values after each step (the last one is the answer)."""
        out, v = [], self.start
        for op, b in self.ops:
            v = _APPLY[op](v, b)
            out.append(v)
        return out


def problem_text(p: Problem) -> str:
    steps = " ".join(f"Step {i}: {_PHRASE[op].format(b)}." for i, (op, b) in enumerate(p.ops, 1))
    return f"Work modulo {MODULUS}. Start with {p.start}. {steps} {MATH_ANSWER_INSTRUCTION}"


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
    for i, ((op, b), v) in enumerate(zip(p.ops, values), 1):
        lines.append(f"Step {i}: {prev} {op} {b} = {v}")
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
    return solution_text(p, _flawed_values(p, rng, error_step)), error_step


def _flawed_values(p: Problem, rng: np.random.Generator, error_step: int) -> list[int]:
    values, prev = [], p.start
    for i, (op, b) in enumerate(p.ops):
        v = _APPLY[op](prev, b)
        if i == error_step:
            v = (v + int(rng.integers(1, MODULUS))) % MODULUS  # any other digit
        values.append(v)
        prev = v
    return values


def continuation_after_error(p: Problem, rng: np.random.Generator, *, repair: bool) -> tuple[str, str]:
    """(prefix, continuation): the prefix ends with a line whose result is wrong; the continuation either
    repairs (the next line starts again from the correct value, and the answer is right) or continues
    consistently from the wrong value. A teacher trained on both faces, after a flawed prefix, exactly the
    bimodal choice of prefix failure. Needs at least 2 steps."""
    if len(p.ops) < 2:
        raise ValueError("continuation_after_error needs a problem with at least 2 steps")
    error_step = int(rng.integers(0, len(p.ops) - 1))
    flawed = solution_text(p, _flawed_values(p, rng, error_step)).split("\n")
    if not repair:
        return "\n".join(flawed[:error_step + 1]) + "\n", "\n".join(flawed[error_step + 1:])
    correct = solution_text(p).split("\n")
    return "\n".join(flawed[:error_step + 1]) + "\n", "\n".join(correct[error_step + 1:])


def corrupted_attempt(p: Problem, rng: np.random.Generator) -> str:
    """A varied wrong attempt, the kind a drifting student writes: a wrong result at any step carried forward,
    a wrong starting value, a wrong operand, a dropped line, or an attempt cut off mid-way. Refine training
    on these teaches a teacher to rewrite from the problem instead of copying the attempt."""
    kind = int(rng.integers(0, 5))
    n = len(p.ops)
    if kind == 0:
        return flawed_solution(p, rng, error_step=int(rng.integers(0, n)))[0]
    if kind in (1, 2):  # a wrong start or operand: every step is then consistent arithmetic on wrong inputs
        ops = list(p.ops)
        start = p.start
        if kind == 1:
            start = (start + int(rng.integers(1, MODULUS))) % MODULUS
        else:
            i = int(rng.integers(0, n))
            ops[i] = ("-" if ops[i][0] == "+" else "+", ops[i][1])
        wrong = Problem(start, tuple(ops))
        return solution_text(wrong, wrong.values())
    lines = solution_text(p).splitlines()
    if kind == 3:  # a step left out
        del lines[int(rng.integers(0, n))]
        return "\n".join(lines)
    cut = int(rng.integers(1, len("\n".join(lines))))  # cut off anywhere
    return "\n".join(lines)[:cut]


def parse_steps(text: str) -> list[tuple[int, int, str, int, int]]:
    """The ``Step i: a op b = c`` lines of a solution as (i, a, op, b, c), in order."""
    return [(int(i), int(a), op, int(b), int(c)) for i, a, op, b, c in
            (m.groups() for m in map(_STEP_LINE.match, text.splitlines()) if m)]


def first_error(text: str, p: Problem) -> int | None:
    """Index of the first step that is wrong: a missing or mislabelled line, an input that is not the
    previous correct value, a wrong operator or operand, or a wrong result. None when every step is right
    (the answer line is graded separately, by ArithmeticTask.grade)."""
    steps, prev = parse_steps(text), p.start
    for i, (op, b) in enumerate(p.ops):
        if i >= len(steps) or steps[i] != (i + 1, prev, op, b, _APPLY[op](prev, b)):
            return i
        prev = steps[i][4]
    return None


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    min_steps: int = 3
    max_steps: int = 5
    max_operand: int = 2  # operands are 1 .. max_operand (small: learnable from scratch in minutes)
    train_size: int = 4000
    eval_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"task.min_steps={self.min_steps}: must be in [1, task.max_steps={self.max_steps}]")
        if not 1 <= self.max_operand <= MODULUS - 1:
            raise ValueError(f"task.max_operand={self.max_operand}: must be in [1, {MODULUS - 1}]")
        for name in ("train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)}: must be >= 1")


def _random_problem(rng: np.random.Generator, cfg: ArithmeticConfig) -> Problem:
    n = int(rng.integers(cfg.min_steps, cfg.max_steps + 1))
    ops = tuple((str(rng.choice(list(_PHRASE))), int(rng.integers(1, cfg.max_operand + 1))) for _ in range(n))
    return Problem(int(rng.integers(0, MODULUS)), ops)


def _tokenizer_corpus() -> list[str]:
    """Every text the task and the refine/vanilla templates can produce, for the vocabulary."""
    p = Problem(4, (("+", 7), ("-", 5)))
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
