"""What math and code tasks over local files share: the files are built once into array_record datasets by
the TFDS builders (trd_jax.data.builders), training prompts stream through grain (deterministic per-epoch
shuffle, checkpointable position), every prompt gets the task's answer instruction exactly once, and
examples the task cannot use (a prompt over the token limit, a problem the grader cannot run) are skipped
and counted rather than stopping a run hours in."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trd_jax.errors import ConfigError
from trd_jax.data.grain_source import GrainPromptIterator, load_examples
from trd_jax.data.task import Example, NoUsableExamples
from trd_jax.prompts import strip_answer_instruction

log = logging.getLogger(__name__)
Keep = Callable[[Example], bool]


def build_split(builder: str, files: str, *, name: str, data_dir: str, split: str, key: str) -> str:
    """Builds (or reuses) the dataset of `files` (a path or glob) for `split` and returns its folder. The
    dataset's folder name carries a digest of the files' paths, sizes and times, so other files (or edited
    ones) get a fresh build instead of a conflict; `key` names the config field in errors."""
    from trd_jax.data.builders import build

    matches = sorted(glob.glob(os.path.abspath(os.path.expanduser(files))))
    if not matches:
        raise ConfigError(key, f"no file matches {files!r}")
    root = os.path.commonpath([os.path.dirname(m) for m in matches])
    digest = hashlib.sha256()
    for m in matches:
        st = os.stat(m)
        digest.update(f"{m}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    try:
        return build(builder, name=f"{name}-{split}-{digest.hexdigest()[:10]}", manual_dir=root, data_dir=data_dir,
                     splits={split: [os.path.relpath(m, root) for m in matches]})
    except ValueError as e:
        raise ConfigError(key, " ".join(str(e).split())) from None


class _FilteredIterator:
    """Grain prompts with the answer instruction, skipping examples `keep` rejects; state passes through."""

    def __init__(self, inner: GrainPromptIterator, prepare: Callable[[Example], Example], keep: Keep,
                 on_skip: Callable[[], None]):
        self.inner, self.prepare, self.keep, self.on_skip = inner, prepare, keep, on_skip

    def next(self, size: int) -> list[Example]:
        out: list[Example] = []
        skipped_in_a_row = 0
        while len(out) < size:
            for ex in map(self.prepare, self.inner.next(size - len(out))):
                if self.keep(ex):
                    out.append(ex)
                    skipped_in_a_row = 0
                else:
                    self.on_skip()
                    skipped_in_a_row += 1
            if skipped_in_a_row > self.inner.size:  # a whole epoch without a usable example
                raise NoUsableExamples("no training example is usable (a whole epoch skipped: prompt too long or "
                                       "not gradable)")
        return out

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.inner.restore(state)


class LocalFilesTask:
    """Base of MathTask and CodeTask. Subclasses set `kind`, `instruction` and `builders` (the TFDS builder
    of each split), and implement `grade_batch` and (optionally) `gradable`."""

    kind = ""
    instruction = ""
    builders: Mapping[str, str] = {}

    def __init__(self, name: str, files: Mapping[str, str], *, data_dir: str, dataset_name: str,
                 tokenizer_dir: str):
        self.name = name
        self.tokenizer_dir = tokenizer_dir
        self.stats: dict[str, int] = {}  # grading outcomes and skipped examples, for summary.json
        self.keep: Keep = self.gradable
        if not files.get("eval"):
            raise ConfigError("task.eval_files", "is empty: give the evaluation set (a local file or glob)")
        self.dirs = {split: build_split(self.builders[split], f, name=dataset_name, data_dir=data_dir, split=split,
                                        key=f"task.{split}_files")
                     for split, f in files.items() if f}
        self._cache: dict[str, list[Example]] = {}

    def prepare(self, ex: Example) -> Example:
        """x = the problem followed by the task's answer instruction, exactly once whatever the file had."""
        return dataclasses.replace(ex, problem=f"{strip_answer_instruction(ex.problem)}\n\n{self.instruction}")

    def gradable(self, ex: Example) -> bool:
        return True

    def set_filter(self, keep: Keep) -> None:
        """Also skip examples `keep` rejects (the trainer passes its prompt-length check)."""
        self.keep = lambda ex: self.gradable(ex) and keep(ex)
        self._cache.clear()

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def split(self, name: str) -> Sequence[Example]:
        if name not in self.dirs:
            raise ValueError(f"task {self.name!r} has no {name!r} split (task.{name}_files is empty)")
        if name not in self._cache:
            examples = [self.prepare(ex) for ex in load_examples(self.dirs[name], name)]
            self._cache[name] = [ex for ex in examples if self.keep(ex)]
            if len(self._cache[name]) < len(examples):
                log.warning("task %s: %d of %d %s examples skipped (prompt too long or not gradable)", self.name,
                            len(examples) - len(self._cache[name]), len(examples), name)
            if not self._cache[name]:
                raise ValueError(f"task {self.name!r}: no usable {name} example")
        return self._cache[name]

    def prompt_iterator(self, seed: int) -> _FilteredIterator:
        """Training prompts through grain, in a per-epoch shuffled order fixed by `seed`."""
        if "train" not in self.dirs:
            raise ConfigError("task.train_files", "is empty: training needs a training set")
        return _FilteredIterator(GrainPromptIterator.from_dataset(self.dirs["train"], "train", seed=seed),
                                 self.prepare, self.keep, lambda: self.count("skipped_train_examples"))

    def grade_batch(self, responses: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        raise NotImplementedError

    def grade(self, response: str, example: Example) -> float:
        return float(self.grade_batch([response], [example])[0])

    def close(self) -> None:
        """Releases grading resources (worker processes)."""
