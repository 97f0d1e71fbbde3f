"""A math task over local files (trd_jax.data.local_task): the final answer is the last \\boxed{} of a
response, judged equal to the reference answer by math-verify in worker processes with a time limit per
answer (trd_jax.rewards.math_grading)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from trd_jax.data.local_task import LocalFilesTask
from trd_jax.data.task import Example
from trd_jax.prompts import MATH_ANSWER_INSTRUCTION
from trd_jax.rewards.math_grading import MathGrader


class MathTask(LocalFilesTask):
    kind = "math"
    instruction = MATH_ANSWER_INSTRUCTION
    builders = {"train": "math_train", "eval": "math_eval"}  # training sets carry reference solutions

    def __init__(self, name: str, files: Mapping[str, str], *, data_dir: str, dataset_name: str, tokenizer_dir: str,
                 timeout_s: float = 5.0, workers: int = 2):
        super().__init__(name, files, data_dir=data_dir, dataset_name=dataset_name, tokenizer_dir=tokenizer_dir)
        self.grader = MathGrader(workers=workers, timeout_s=timeout_s)

    def grade_batch(self, responses: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        grades = self.grader.grade_batch(responses, [ex.answer for ex in examples])
        for status, n in grades.counts().items():
            self.count(status, n)
        return grades.scores

    def close(self) -> None:
        self.grader.close()
