"""The embedded synthetic reasoning task: running arithmetic modulo 10, one step per line.

    Problem:  Work modulo 10. Start with 8. Step 1: subtract 2. Step 2: add 1. Step 3: add 2. <boxed instruction>
    Solution: Step 1: 8 - 2 = 6
              Step 2: 6 - 9 = 7        <- "add 1" written as "subtract 9": the same step, another form
              Step 3: 7 + 2 = 9
              The answer is \\boxed{9}.

Each line carries the previous result forward, so one wrong step makes every later value (and the
answer: adding a constant mod 10 is a bijection) wrong unless the solver repairs it. After a flawed
prefix a teacher must choose between continuing consistently with the error and fixing it: the two
modes of prefix failure (TRD_SPEC §2). Operands are small (1 .. max_operand) so that a 2-layer model
trained from scratch learns the task in a few hundred steps on a CPU.

**More than one valid derivation.** Modulo 10, "add b" is "subtract 10 - b" and "subtract b" is "add
10 - b": every line may be written in either form, so a problem of n steps has 2^n correct solutions
that differ token by token but agree on every running value. The step verifiers (``first_error``,
``step_errors``) accept either form; the grade is the paper's, the final boxed answer.

**A systematic weakness.** Steps that cross the modulus (``8 + 2``, ``1 - 2``, and most lines in the
complement form) are where ``buggy_values`` puts its off-by-one errors: the embedded student is trained
on solutions that get such a "wrap" wrong at a given rate, so its mistakes survive low-temperature
sampling (its most likely token is wrong there), as a real student's misconceptions do.

**Splits.** A problem belongs to the eval split when a hash of it (with the task seed) falls in one
bucket of ``EVAL_BUCKETS``; train and eval problems are drawn from their own random streams, so the
train split depends only on (seed, train_size, steps, operands), never on eval_size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from trd_jax.data.task import Example, PromptIterator
from trd_jax.data.toy_tokenizer import save_tokenizer
from trd_jax.prompts import MATH_ANSWER_INSTRUCTION, TRUNCATION_NOTICE, refine_prompt_text, vanilla_teacher_context
from trd_jax.rewards.answers import last_boxed

MODULUS = 10
EVAL_BUCKETS = 8  # 1 / EVAL_BUCKETS of all problems are reserved for evaluation
_PHRASE = {"+": "add {}", "-": "subtract {}"}
_APPLY = {"+": lambda a, b: (a + b) % MODULUS, "-": lambda a, b: (a - b) % MODULUS}
_FLIP = {"+": "-", "-": "+"}
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


def written(op: str, b: int, form: int) -> tuple[str, int]:
    """The (operator, operand) a line writes for step (op, b): form 0 as given, form 1 the complement
    (``+ b`` as ``- (10 - b)``, ``- b`` as ``+ (10 - b)``), equal modulo 10."""
    return (op, b) if form == 0 else (_FLIP[op], MODULUS - b)


def equivalent(op: str, b: int) -> set[tuple[str, int]]:
    """Both ways of writing step (op, b)."""
    return {written(op, b, 0), written(op, b, 1)}


def wraps(a: int, op: str, b: int) -> bool:
    """Whether ``a op b`` crosses the modulus as written (a + b >= 10, or a - b < 0)."""
    return a + b >= MODULUS if op == "+" else a - b < 0


def problem_text(p: Problem) -> str:
    steps = " ".join(f"Step {i}: {_PHRASE[op].format(b)}." for i, (op, b) in enumerate(p.ops, 1))
    return f"Work modulo {MODULUS}. Start with {p.start}. {steps} {MATH_ANSWER_INSTRUCTION}"


def parse_problem(text: str) -> Problem:
    m = _PROBLEM.search(text)
    if not m:
        raise ValueError(f"not a running-arithmetic problem: {text[:80]!r}")
    ops = tuple((_OP_OF[name], int(b)) for name, b in _OP_PHRASE.findall(m.group(2)))
    return Problem(int(m.group(1)), ops)


def solution_text(p: Problem, values: Sequence[int] | None = None, forms: Sequence[int] | None = None) -> str:
    """One line per step, ``a op b = c``, each a the previous line's c; then the boxed answer. ``values``
    overrides the results written (a flawed solution); ``forms`` (0 or 1 per step) picks each line's form."""
    values = p.values() if values is None else list(values)
    forms = [0] * len(p.ops) if forms is None else list(forms)
    lines, prev = [], p.start
    for i, ((op, b), v, form) in enumerate(zip(p.ops, values, forms), 1):
        wop, wb = written(op, b, form)
        lines.append(f"Step {i}: {prev} {wop} {wb} = {v}")
        prev = v
    lines.append(f"The answer is \\boxed{{{prev}}}.")
    return "\n".join(lines)


def random_forms(n: int, rng: np.random.Generator, alt_rate: float) -> list[int]:
    """Each line in the complement form with probability alt_rate."""
    return [int(rng.random() < alt_rate) for _ in range(n)]


def misremembered_facts(fraction: float, rng: np.random.Generator) -> dict[tuple[int, str, int], int]:
    """A student's misremembered facts: each plain (non-wrapping) fact ``a op b`` of the table (a in 0..9,
    b in 1..9, both operators) is in the set with probability ``fraction``, with its own wrong result (one
    off, up or down, drawn once). Unlike the wrap misconception, one rule that a student can unlearn at
    once, each of these is learned back on its own, as a weak student's gaps are."""
    facts = {}
    for a in range(MODULUS):
        for op in "+-":
            for b in range(1, MODULUS):
                wrong, offset = rng.random() < fraction, 1 if rng.random() < 0.5 else -1
                if wrong and not wraps(a, op, b):
                    facts[(a, op, b)] = (_APPLY[op](a, b) + offset) % MODULUS
    return facts


def buggy_values(p: Problem, forms: Sequence[int], rng: np.random.Generator, bug_rate: float,
                 facts: dict[tuple[int, str, int], int] | None = None) -> list[int]:
    """The values a solver with the wrap misconception writes: each line whose written form crosses the
    modulus is off by one (one too far) with probability bug_rate, and so is each line whose written fact is
    among ``facts`` (misremembered_facts: its wrong result); every later line computes correctly from the
    (possibly wrong) value above it, so an error propagates to the answer."""
    values, prev = [], p.start
    for (op, b), form in zip(p.ops, forms):
        wop, wb = written(op, b, form)
        v = _APPLY[wop](prev, wb)
        if wraps(prev, wop, wb):
            if rng.random() < bug_rate:
                v = (v + (1 if wop == "+" else -1)) % MODULUS
        elif facts and (prev, wop, wb) in facts and rng.random() < bug_rate:
            v = facts[(prev, wop, wb)]
        values.append(v)
        prev = v
    return values


def flawed_solution(p: Problem, rng: np.random.Generator, *, error_step: int | None = None,
                    forms: Sequence[int] | None = None) -> tuple[str, int]:
    """A solution with one wrong result at ``error_step`` (random among the first half of the steps by
    default) and every later step computed correctly from it: the error propagates to the answer.
    Returns (text, error_step)."""
    n = len(p.ops)
    if error_step is None:
        error_step = int(rng.integers(0, max(1, (n + 1) // 2)))
    return solution_text(p, _flawed_values(p, rng, error_step), forms), error_step


def _flawed_values(p: Problem, rng: np.random.Generator, error_step: int, off_by: int | None = None) -> list[int]:
    values, prev = [], p.start
    for i, (op, b) in enumerate(p.ops):
        v = _APPLY[op](prev, b)
        if i == error_step:  # off_by given: that far off; else any other digit
            v = (v + (int(rng.integers(1, MODULUS)) if off_by is None else off_by)) % MODULUS
        values.append(v)
        prev = v
    return values


def continuation_after_error(p: Problem, rng: np.random.Generator, *, repair: bool,
                             forms: Sequence[int] | None = None, at_wrap: bool = False) -> tuple[str, str]:
    """(prefix, continuation): the prefix ends with a line whose result is wrong; the continuation either
    repairs (the next line starts again from the correct value, and the answer is right) or continues
    consistently from the wrong value. A teacher trained on both faces, after a flawed prefix, exactly the
    bimodal choice of prefix failure. Needs at least 2 steps. The wrong line is any but the last, its result
    any other digit; at_wrap: the student's kind of error instead (buggy_values), a line that crosses the
    modulus as written, one too far (any line when none before the last wraps)."""
    if len(p.ops) < 2:
        raise ValueError("continuation_after_error needs a problem with at least 2 steps")
    forms_ = [0] * len(p.ops) if forms is None else list(forms)
    lines = list(zip(p.ops, forms_, [p.start] + p.values()[:-1]))[:-1]
    wrapping = [i for i, ((op, b), form, a) in enumerate(lines) if wraps(a, *written(op, b, form))]
    if at_wrap and wrapping:
        error_step = wrapping[int(rng.integers(0, len(wrapping)))]
        off_by = 1 if written(*p.ops[error_step], forms_[error_step])[0] == "+" else -1
    else:
        error_step, off_by = int(rng.integers(0, len(p.ops) - 1)), None
    flawed = solution_text(p, _flawed_values(p, rng, error_step, off_by), forms).split("\n")
    if not repair:
        return "\n".join(flawed[:error_step + 1]) + "\n", "\n".join(flawed[error_step + 1:])
    correct = solution_text(p, forms=forms).split("\n")
    return "\n".join(flawed[:error_step + 1]) + "\n", "\n".join(correct[error_step + 1:])


def corrupted_attempt(p: Problem, rng: np.random.Generator, forms: Sequence[int] | None = None) -> str:
    """A varied wrong attempt, the kind a drifting student writes: a wrong result at any step carried forward,
    a wrong starting value, a wrong operand, a dropped line, or an attempt cut off mid-way. Refine training
    on these teaches a teacher to rewrite from the problem instead of copying the attempt."""
    kind = int(rng.integers(0, 5))
    n = len(p.ops)
    if kind == 0:
        return flawed_solution(p, rng, error_step=int(rng.integers(0, n)), forms=forms)[0]
    if kind in (1, 2):  # a wrong start or operand: every step is then consistent arithmetic on wrong inputs
        ops = list(p.ops)
        start = p.start
        if kind == 1:
            start = (start + int(rng.integers(1, MODULUS))) % MODULUS
        else:
            i = int(rng.integers(0, n))
            ops[i] = ("-" if ops[i][0] == "+" else "+", ops[i][1])
        wrong = Problem(start, tuple(ops))
        return solution_text(wrong, wrong.values(), forms)
    lines = solution_text(p, forms=forms).splitlines()
    if kind == 3:  # a step left out
        del lines[int(rng.integers(0, n))]
        return "\n".join(lines)
    cut = int(rng.integers(1, len("\n".join(lines))))  # cut off anywhere
    return "\n".join(lines)[:cut]


def parse_steps(text: str) -> list[tuple[int, int, str, int, int]]:
    """The ``Step i: a op b = c`` lines of a solution as (i, a, op, b, c), in order."""
    return [(int(i), int(a), op, int(b), int(c)) for i, a, op, b, c in
            (m.groups() for m in map(_STEP_LINE.match, text.splitlines()) if m)]


def flawed_prefix(text: str, p: Problem) -> tuple[str, int] | None:
    """``text`` cut after its first line whose result is wrong (the line well formed, starting from the right
    value), newline included, and the answer that continuing consistently from that wrong result leads to.
    None when no line is wrong that way, or a malformed line comes first."""
    lines, prev = text.split("\n"), p.start
    for j, line in enumerate(lines[:len(p.ops)]):
        m = _STEP_LINE.match(line)
        if not m or int(m.group(1)) != j + 1 or int(m.group(2)) != prev:
            return None
        op, b, c = m.group(3), int(m.group(4)), int(m.group(5))
        if (op, b) not in equivalent(*p.ops[j]):
            return None
        if c != _APPLY[op](prev, b):
            consistent = c
            for later_op, later_b in p.ops[j + 1:]:
                consistent = _APPLY[later_op](consistent, later_b)
            return "\n".join(lines[:j + 1]) + "\n", consistent
        prev = c
    return None


def after_error_outcome(continuation: str, p: Problem, consistent: int) -> str:
    """What a continuation of a flawed prefix did: "repair" (the right answer), "continue" (the answer the
    wrong value leads to) or "other"."""
    answer = last_boxed(continuation)
    if answer == str(p.values()[-1]):
        return "repair"
    return "continue" if answer == str(consistent) else "other"


def line_accuracy(texts: Sequence[str]) -> dict[str, float | None]:
    """Over the step lines of ``texts``: the fraction whose result is right for the value and operand the line
    writes (its own arithmetic, whatever the lines above got wrong), on lines that wrap and on plain lines
    (None where there are none)."""
    right = {True: [], False: []}
    for text in texts:
        for _, a, op, b, c in parse_steps(text):
            right[wraps(a, op, b)].append(_APPLY[op](a, b) == c)
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"wrap": mean(right[True]), "plain": mean(right[False])}


def line_forms(text: str, p: Problem) -> list[int]:
    """The form (0 or 1) of each step as the attempt ``text`` writes it: its line i when that line writes
    one of step i's two forms, else 0. A rewrite that keeps these forms stays close to the attempt."""
    steps = {s[0]: s for s in parse_steps(text)}
    out = []
    for i, (op, b) in enumerate(p.ops, 1):
        s = steps.get(i)
        out.append(int(s is not None and (s[2], s[3]) == written(op, b, 1)))
    return out


def first_error(text: str, p: Problem) -> int | None:
    """Index of the first step that is wrong: a missing or mislabelled line, an input that is not the
    previous correct value, an operation that is neither form of the problem's step, or a wrong result.
    None when every step is right (the answer line is graded separately, by ArithmeticTask.grade)."""
    steps, prev = parse_steps(text), p.start
    for i, (op, b) in enumerate(p.ops):
        if i >= len(steps):
            return i
        label, a, wop, wb, c = steps[i]
        if label != i + 1 or a != prev or (wop, wb) not in equivalent(op, b) or c != _APPLY[op](prev, b):
            return i
        prev = c
    return None


ERROR_KINDS = ("missing", "operation", "carried", "wrap", "plain")


def _step_verdicts(text: str, p: Problem) -> list[str | None]:
    """Per step of the problem: None when its line is right *locally* (for its own input), else the first kind of
    ERROR_KINDS that applies."""
    steps = {s[0]: s for s in parse_steps(text)}
    verdicts, prev = [], p.start
    for i, (op, b) in enumerate(p.ops):
        s = steps.get(i + 1)
        if s is None:
            verdicts.append("missing")
            prev = None
            continue
        _, a, wop, wb, c = s
        if (wop, wb) not in equivalent(op, b):
            verdicts.append("operation")
        elif prev is not None and a != prev:
            verdicts.append("carried")
        elif c != _APPLY[wop](a, wb):
            verdicts.append("wrap" if wraps(a, wop, wb) else "plain")
        else:
            verdicts.append(None)
        prev = c
    return verdicts


def step_errors(text: str, p: Problem) -> list[int]:
    """Every step that is wrong *locally*: its line is missing, or it does not write a form of the problem's
    step, or its input is not the line above's result (the start for step 1), or its result is not its own
    input op operand. A line computed correctly from an earlier wrong value is not counted again, so this
    counts the mistakes made, not the values they spoiled."""
    return [i for i, v in enumerate(_step_verdicts(text, p)) if v is not None]


def error_kinds(text: str, p: Problem) -> list[str]:
    """The kind of each locally wrong step (step_errors' steps, in order), the first that applies: "missing" (no
    line for the step), "operation" (the line writes neither form of the problem's step), "carried" (its input
    is not the line above's result), "wrap" or "plain" (a wrong result for its own input and operation, on a line
    that crosses the modulus or not)."""
    return [v for v in _step_verdicts(text, p) if v is not None]


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    min_steps: int = 3
    max_steps: int = 5
    max_operand: int = 3  # operands are 1 .. max_operand (small: learnable from scratch in minutes)
    train_size: int = 8000
    eval_size: int = 512
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"task.min_steps={self.min_steps}: must be in [1, task.max_steps={self.max_steps}]")
        if not 1 <= self.max_operand <= MODULUS - 1:
            raise ValueError(f"task.max_operand={self.max_operand}: must be in [1, {MODULUS - 1}]")
        for name in ("train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)}: must be >= 1")

    def training_identity(self) -> dict:
        """The settings the train split (and so a bootstrap trained on it) depends on: not eval_size."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "eval_size"}


def _random_problem(rng: np.random.Generator, cfg: ArithmeticConfig) -> Problem:
    n = int(rng.integers(cfg.min_steps, cfg.max_steps + 1))
    ops = tuple((str(rng.choice(list(_PHRASE))), int(rng.integers(1, cfg.max_operand + 1))) for _ in range(n))
    return Problem(int(rng.integers(0, MODULUS)), ops)


def is_eval_problem(p: Problem, seed: int) -> bool:
    """The problem's split, fixed by a hash of it and the task seed (independent of split sizes)."""
    digest = hashlib.blake2b(repr((seed, p.start, p.ops)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % EVAL_BUCKETS == 0


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
        self.stats: dict[str, int] = {}  # nothing to count: grading is exact and every example is usable
        self._keep: Callable[[Example], bool] = lambda ex: True
        self.tokenizer_dir = os.path.join(directory, "tokenizer")
        if not os.path.isfile(os.path.join(self.tokenizer_dir, "tokenizer.json")):
            save_tokenizer(self.tokenizer_dir, _tokenizer_corpus())
        self._splits = {name: self._draw(name, size) for name, size in (("eval", cfg.eval_size),
                                                                         ("train", cfg.train_size))}

    def _draw(self, name: str, size: int) -> list[Example]:
        cfg, want_eval = self.cfg, name == "eval"
        rng = np.random.default_rng([cfg.seed, 7919, int(want_eval)])
        seen: set[Problem] = set()
        out: list[Example] = []
        for _ in range(200 * size + 10_000):
            if len(out) == size:
                return out
            p = _random_problem(rng, cfg)
            if p in seen or is_eval_problem(p, cfg.seed) != want_eval:
                continue
            seen.add(p)
            out.append(Example(f"{name}-{len(out)}", problem_text(p), str(p.values()[-1]), solution_text(p)))
        raise ValueError(f"task.{name}_size={size}: not that many distinct {name} problems with "
                         f"task.min_steps={cfg.min_steps}, max_steps={cfg.max_steps}, max_operand={cfg.max_operand}")

    def split(self, name: str) -> Sequence[Example]:
        if name not in self._splits:
            raise ValueError(f"arithmetic task: unknown split {name!r} (train, eval)")
        return self._splits[name]

    def grade(self, response: str, example: Example) -> float:
        """The paper's grading: the last boxed answer against the reference answer. ``first_error`` and
        ``step_errors`` verify the steps themselves (either form of each), for diagnostics."""
        return float(last_boxed(response) == example.answer)

    def grade_batch(self, responses: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        return np.array([self.grade(r, ex) for r, ex in zip(responses, examples, strict=True)], np.float32)

    def set_filter(self, keep: Callable[[Example], bool]) -> None:
        self._keep = keep

    def prompt_iterator(self, seed: int) -> PromptIterator:
        """The train split in memory (examples `keep` rejects left out), reshuffled every epoch."""
        return PromptIterator([ex for ex in self.split("train") if self._keep(ex)], seed=seed)

    def close(self) -> None:
        """Nothing to release: grading runs in this process."""

    @staticmethod
    def problem_of(example: Example) -> Problem:
        return parse_problem(example.problem)
