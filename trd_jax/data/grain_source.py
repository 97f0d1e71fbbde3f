"""Prompts from a dataset built by ``trd_jax.data.builders``, read through grain.

``GrainPromptIterator`` has PromptIterator's interface (``next``, ``state``, ``restore``), so the controller
can use either. Its order is grain's: a random-access ``MapDataset`` over the array_record split,
shuffled with a per-epoch seed and repeated without end. Element k of that infinite sequence depends only on
(seed, k), so the whole position is one integer: restoring it reproduces exactly the batches an
uninterrupted iterator would have produced, across epoch boundaries too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from trd_jax.data.task import Example

ITERATOR_KIND = "grain"


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def open_split(dataset_dir: str, split: str) -> RandomAccessSource:
    """The records of ``split`` of the dataset built in ``dataset_dir`` (<data_dir>/<builder>/<name>/<version>).

    Read through the folder's own dataset_info.json / features.json, so the builder class is not needed."""
    import tensorflow_datasets as tfds  # its import is slow; only readers of built datasets pay it

    builder = tfds.builder_from_directory(dataset_dir)
    if split not in builder.info.splits:
        raise ValueError(f"{dataset_dir} has no split {split!r} (it has {', '.join(builder.info.splits)})")
    return builder.as_data_source(split=split)


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record[key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_to_example(record: Mapping[str, Any]) -> Example:
    """An Example from a decoded record: math datasets' answer, or code datasets' tests (the JSON the grader
    runs) as the answer; an empty reference becomes None (no reference solution)."""
    answer = _text(record, "answer") if "answer" in record else _text(record, "tests")
    return Example(id=_text(record, "id"), problem=_text(record, "problem"), answer=answer,
                   reference=_text(record, "reference") or None)


def load_examples(dataset_dir: str, split: str) -> list[Example]:
    """All examples of a split in stored order (the source files' order): for evaluation sets."""
    source = open_split(dataset_dir, split)
    return [record_to_example(source[i]) for i in range(len(source))]


def _grain_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed (s + e): hashing the user's seed first keeps neighbouring seeds
    # (runs 0 and 1) from sharing epochs (run 1's first epoch = run 0's second) while staying deterministic.
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


class GrainPromptIterator:
    """Batches of examples from a random-access source (e.g. ``open_split``), reshuffled every epoch;
    a batch may span two epochs. ``state()`` / ``restore()`` carry the position through checkpoints."""

    def __init__(self, source: RandomAccessSource | Sequence[Mapping[str, Any]], *, seed: int,
                 shuffle: bool = True, decode=record_to_example):
        self.size = len(source)
        if self.size == 0:
            raise ValueError("GrainPromptIterator: the split has no examples")
        if int(seed) < 0:
            raise ValueError(f"GrainPromptIterator: seed must be non-negative, got {seed}")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        ds = grain.MapDataset.source(source)
        if self.shuffle:
            ds = ds.shuffle(seed=_grain_seed(self.seed))
        # repeat() passes indices past the first epoch through to shuffle, which reseeds per epoch
        self._dataset = ds.repeat().map(decode)  # decode: a stored record -> what next() returns
        self._position = 0  # index into the infinite sequence: epoch * size + index

    @classmethod
    def from_dataset(cls, dataset_dir: str, split: str, *, seed: int, shuffle: bool = True) -> GrainPromptIterator:
        return cls(open_split(dataset_dir, split), seed=seed, shuffle=shuffle)

    @property
    def epoch(self) -> int:
        return self._position // self.size

    @property
    def index(self) -> int:
        return self._position % self.size

    def next(self, size: int) -> list[Example]:
        out = [self._dataset[k] for k in range(self._position, self._position + size)]
        self._position += size
        return out

    def state(self) -> dict[str, Any]:
        # "records" rather than PromptIterator's "size": PromptIterator.restore rejects this state (its
        # size check fails) instead of silently replaying positions in its own, different order.
        return {"iterator": ITERATOR_KIND, "epoch": self.epoch, "index": self.index, "records": self.size,
                "seed": self.seed, "shuffle": self.shuffle}

    def restore(self, state: Mapping[str, Any]) -> None:
        expected = {"iterator": ITERATOR_KIND, "records": self.size, "seed": self.seed, "shuffle": self.shuffle}
        got = {k: state.get(k) for k in expected}
        if got != expected:
            raise ValueError(f"data iterator state {dict(state)} does not match this iterator {expected}: the "
                             f"dataset, data seed or iterator kind changed since the checkpoint")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.size:
            raise ValueError(f"data iterator state {dict(state)}: position out of range")
        self._position = epoch * self.size + index
