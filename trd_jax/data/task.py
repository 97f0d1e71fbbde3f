"""What the training loop needs from a dataset: examples, a grader and a tokenizer folder.

A task is any object with the attributes of :class:`Task`; the controller never looks further. The
prompt stream over a split is a :class:`PromptIterator`: a deterministic shuffle per epoch whose
position (epoch, index) is saved with each checkpoint, so a resumed run sees exactly the prompts
an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    problem: str  # x, the student's prompt text (ends with its answer instruction)
    answer: str  # a*, for grading only
    reference: str | None = None  # y*, the reference solution: OPSD's privileged context
    # Worked examples (problem, solution) shown before x as earlier chat turns: the few-shot prompt a small
    # model needs to follow the answer format. Refine and OPSD prompts show the problem alone.
    shots: tuple[tuple[str, str], ...] = ()

    def prompt(self) -> str | list[dict[str, str]]:
        """What the student is prompted with: x, or the worked examples' turns followed by x."""
        if not self.shots:
            return self.problem
        turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in self.shots]
        return [m for turn in turns for m in turn] + [{"role": "user", "content": self.problem}]


class NoUsableExamples(ValueError):
    """A split (or the training stream) holds no example that passes the task's and the trainer's filters."""


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """The run config's `task` section as plain values (config.resolve checks them; the fields' meanings are
    documented in config_defaults.py). Tasks are built from these, never from the config itself."""

    name: str
    prompt_mode: str
    max_prompt_tokens: int
    train_size: int
    eval_size: int
    data_seed: int
    shots: int
    mini_math_max_operand: int
    min_steps: int
    max_steps: int
    max_operand: int
    train_files: str
    eval_files: str
    data_dir: str
    dataset_name: str
    tokenizer: str
    grade_timeout_s: float
    grade_workers: int
    code_timeout_s: float
    code_memory_mb: int
    allow_unsandboxed: bool


class Task(Protocol):
    """Everything the loop asks of a task (ArithmeticTask, and the local-file tasks' LocalFilesTask, implement
    all of it; nothing is looked up with hasattr)."""

    name: str
    kind: str  # "math" | "code": which refine templates apply (trd_jax.prompts.TASKS)
    tokenizer_dir: str  # a local folder Tokenizer.from_dir reads
    stats: dict[str, int]  # counted grading outcomes and skipped examples, for summary.json (may stay empty)

    def split(self, name: str) -> Sequence[Example]:
        """The examples of split "train" or "eval", in a fixed order."""

    def grade(self, response: str, example: Example) -> float:
        """1.0 for a correct response (decoded text, special tokens skipped), else 0.0."""

    def grade_batch(self, responses: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        """grade() of each pair, in parallel where the task can."""

    def set_filter(self, keep: Callable[[Example], bool]) -> None:
        """Also skip the examples `keep` rejects (the trainer passes its prompt-length check)."""

    def prompt_iterator(self, seed: int):
        """The training prompts, in a per-epoch shuffled order fixed by `seed`; `next(size)`, `state()` and
        `restore(state)` like PromptIterator's."""

    def close(self) -> None:
        """Releases grading resources (worker processes); a later grade starts them again."""


class PromptIterator:
    """Batches of examples from one split, reshuffled every epoch with a seed derived from (seed, epoch);
    a batch may span two epochs. ``state()`` / ``restore()`` carry the position through checkpoints."""

    def __init__(self, examples: Sequence[Example], *, seed: int, shuffle: bool = True):
        if not examples:
            raise NoUsableExamples("PromptIterator: the split has no usable examples")
        self.examples = examples
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next(self, size: int) -> list[Example]:
        out = []
        while len(out) < size:
            if self.index == len(self.examples):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(out), len(self.examples) - self.index)
            out += [self.examples[i] for i in self._order[self.index:self.index + take]]
            self.index += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "size": len(self.examples), "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if state.get("size") != len(self.examples) or state.get("seed") != self.seed:
            raise ValueError(f"data iterator state {state} does not match this split ({len(self.examples)} "
                             f"examples, seed {self.seed}): the dataset or data seed changed since the checkpoint")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
