"""A code task over local files (TACO / MBPP / HumanEval style, built by trd_jax.data.builders): the program
in a response runs against the problem's tests in the sandbox (trd_jax.rewards.sandbox): own namespaces,
no network, read-only file system, resource limits. Without namespaces the task refuses to grade unless
task.allow_unsandboxed is set."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trd_jax.config import ConfigError
from trd_jax.data.grain_source import GrainPromptIterator, load_examples
from trd_jax.data.task import Example
from trd_jax.refine import CODE_ANSWER_INSTRUCTION, strip_answer_instruction
from trd_jax.rewards.code import AssertTests, CodeTests, HumanEvalTests, StdioTests, grade_code_batch
from trd_jax.rewards.sandbox import SandboxConfig, probe_isolation

log = logging.getLogger(__name__)


def tests_of(ex: Example) -> CodeTests:
    """The grader's tests from an example's answer (the builders' tests JSON; the keys say the style)."""
    spec = json.loads(ex.answer)
    if "entry_point" in spec:  # HumanEval: the problem is the function's prompt, continued by the program
        return HumanEvalTests(prompt=strip_answer_instruction(ex.problem), test=spec["test"],
                              entry_point=spec["entry_point"])
    if "asserts" in spec:
        return AssertTests(tests=tuple(spec["asserts"]), setup=spec.get("setup", ""))
    if spec.get("fn_name"):
        raise ValueError(f"example {ex.id!r}: call-based problem (fn_name={spec['fn_name']!r}) is not supported")
    return StdioTests(inputs=tuple(map(str, spec["inputs"])), outputs=tuple(map(str, spec["outputs"])))


def gradable(ex: Example) -> bool:
    try:
        tests_of(ex)
        return True
    except (ValueError, KeyError):
        return False


def with_instruction(ex: Example) -> Example:
    return dataclasses.replace(ex, problem=f"{strip_answer_instruction(ex.problem)}\n\n{CODE_ANSWER_INSTRUCTION}")


class _InstructedIterator:
    """Training prompts with the answer instruction, skipping problems the grader cannot run."""

    def __init__(self, inner: GrainPromptIterator):
        self.inner = inner

    def next(self, size: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < size:
            out += [with_instruction(ex) for ex in self.inner.next(size - len(out)) if gradable(ex)]
        return out

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.inner.restore(state)


class CodeTask:
    kind = "code"

    def __init__(self, name: str, *, train_dir: str | None, eval_dir: str, tokenizer_dir: str,
                 sandbox: SandboxConfig, workers: int = 2):
        self.name = name
        self.train_dir, self.eval_dir = train_dir, eval_dir
        self.tokenizer_dir = tokenizer_dir
        self.sandbox = sandbox
        self.workers = workers
        evals = load_examples(eval_dir, "eval")
        self._eval = [with_instruction(ex) for ex in evals if gradable(ex)]
        if len(self._eval) < len(evals):
            log.warning("code task: %d of %d eval problems are call-based and skipped", len(evals) - len(self._eval),
                        len(evals))
        if not self._eval:
            raise ValueError(f"{eval_dir}: no eval problem the grader can run")
        self.stats: dict[str, int] = {}

    def split(self, name: str) -> Sequence[Example]:
        if name == "eval":
            return self._eval
        if name == "train" and self.train_dir:
            return [with_instruction(ex) for ex in load_examples(self.train_dir, "train") if gradable(ex)]
        raise ValueError(f"task {self.name!r} has no {name!r} split")

    def prompt_iterator(self, seed: int) -> _InstructedIterator:
        if not self.train_dir:
            raise ValueError(f"task {self.name!r}: no training files (task.train_files)")
        return _InstructedIterator(GrainPromptIterator.from_dataset(self.train_dir, "train", seed=seed))

    def grade_batch(self, responses: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        grades = grade_code_batch(responses, [tests_of(ex) for ex in examples], self.sandbox,
                                  max_workers=self.workers)
        rewards = np.array([g.reward for g in grades], np.float32)
        self.stats["passed"] = self.stats.get("passed", 0) + int(rewards.sum())
        self.stats["failed"] = self.stats.get("failed", 0) + int(len(rewards) - rewards.sum())
        return rewards

    def grade(self, response: str, example: Example) -> float:
        return float(self.grade_batch([response], [example])[0])


def make_code_task(task_cfg, files: dict[str, str], data_dir: str, tokenizer: str) -> CodeTask:
    from trd_jax.data.math_task import build_split

    try:
        sandbox = SandboxConfig(timeout_s=task_cfg.code_timeout_s, memory_mb=task_cfg.code_memory_mb,
                                allow_unsandboxed=task_cfg.allow_unsandboxed)
    except ValueError as e:
        raise ConfigError("task.code_timeout_s", str(e)) from None
    isolated, why = probe_isolation()
    if not isolated and not task_cfg.allow_unsandboxed:
        # Refuse before any training: grading would fail at the first rollout otherwise.
        raise ConfigError("task.allow_unsandboxed", f"no sandbox on this machine ({why}); model-written code would "
                                                    "run with network and file system access. Set it to True only "
                                                    "for code you trust")
    dirs = {}
    for split in ("train", "eval"):
        if files[split]:
            try:
                dirs[split] = build_split("code_problems", files[split], name=task_cfg.dataset_name,
                                          data_dir=data_dir, split=split, field=f"task.{split}_files")
            except ValueError as e:
                raise ConfigError(f"task.{split}_files", " ".join(str(e).split())) from None
    return CodeTask(task_cfg.name, train_dir=dirs.get("train"), eval_dir=dirs["eval"], tokenizer_dir=tokenizer,
                    sandbox=sandbox, workers=task_cfg.grade_workers)
