"""A math task over local dataset files: they are built once into array_record datasets by the TFDS builders
(trd_jax.data.builders), training prompts are read through grain (deterministic shuffle, checkpointable
position), and the final answer is the last \\boxed{} of a response, judged equal to the reference answer
by math-verify in worker processes with a time limit per answer (trd_jax.rewards.math_grading)."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trd_jax.data.grain_source import GrainPromptIterator, load_examples
from trd_jax.data.task import Example
from trd_jax.refine import MATH_ANSWER_INSTRUCTION, strip_answer_instruction
from trd_jax.rewards.math_grading import MathGrader


def with_instruction(ex: Example) -> Example:
    """x = the problem followed by the boxed-answer instruction (exactly once, whatever the file had)."""
    return dataclasses.replace(ex, problem=f"{strip_answer_instruction(ex.problem)}\n\n{MATH_ANSWER_INSTRUCTION}")


def build_split(builder: str, files: str, *, name: str, data_dir: str, split: str, field: str) -> str:
    """Builds (or reuses) the dataset of `files` (a path or glob) and returns its folder; `field` names the
    config key in errors."""
    from trd_jax.data.builders import build

    pattern = os.path.abspath(os.path.expanduser(files))
    if not glob.glob(pattern):
        raise ValueError(f"{field}: no file matches {files!r}")
    return build(builder, name=name, manual_dir=os.path.dirname(pattern), data_dir=data_dir,
                 splits={split: [os.path.basename(pattern)]})


class _InstructedIterator:
    """A prompt iterator whose examples get the answer instruction; state and restore pass through."""

    def __init__(self, inner: GrainPromptIterator):
        self.inner = inner

    def next(self, size: int) -> list[Example]:
        return [with_instruction(ex) for ex in self.inner.next(size)]

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.inner.restore(state)


class MathTask:
    kind = "math"

    def __init__(self, name: str, *, train_dir: str | None, eval_dir: str, tokenizer_dir: str,
                 timeout_s: float = 5.0, workers: int = 2):
        self.name = name
        self.train_dir, self.eval_dir = train_dir, eval_dir
        self.tokenizer_dir = tokenizer_dir
        self._eval = [with_instruction(ex) for ex in load_examples(eval_dir, "eval")]
        self._train: list[Example] | None = None
        self.grader = MathGrader(workers=workers, timeout_s=timeout_s)
        self.stats: dict[str, int] = {}  # answers per grading status (exact, match, timeout, ...) so far

    def split(self, name: str) -> Sequence[Example]:
        if name == "eval":
            return self._eval
        if name == "train" and self.train_dir:
            if self._train is None:
                self._train = [with_instruction(ex) for ex in load_examples(self.train_dir, "train")]
            return self._train
        raise ValueError(f"task {self.name!r} has no {name!r} split")

    def prompt_iterator(self, seed: int) -> _InstructedIterator:
        """Training prompts through grain, in a per-epoch shuffled order fixed by `seed`."""
        if not self.train_dir:
            raise ValueError(f"task {self.name!r}: no training files (task.train_files)")
        return _InstructedIterator(GrainPromptIterator.from_dataset(self.train_dir, "train", seed=seed))

    def grade_batch(self, responses: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        grades = self.grader.grade_batch(responses, [ex.answer for ex in examples])
        for status, n in grades.counts().items():
            self.stats[status] = self.stats.get(status, 0) + n
        return grades.scores

    def grade(self, response: str, example: Example) -> float:
        return float(self.grade_batch([response], [example])[0])

    def close(self) -> None:
        self.grader.close()
