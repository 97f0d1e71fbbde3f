"""TFDS builders that turn users' local dataset files into array_record datasets (no TensorFlow, no
downloads), read back by ``trd_jax.data.grain_source``.

    from trd_jax.data.builders import build
    path = build("math_train", name="deepscaler", manual_dir="~/data/deepscaler", data_dir="~/tfds",
                 splits={"train": ["deepscaler.json"]})
    # -> ~/tfds/math_train/deepscaler/1.0.0, with split "train"

Builders (``BUILDERS``): "math_train" (MathTrain), "math_eval" (MathEval): features id, problem, answer,
reference; "code_problems" (CodeProblems): id, problem, reference, tests, test_style. File formats are in
``files``, field aliases in ``math_sets`` and ``code_sets``. The same thing from a shell:
``python -m trd_jax.data.builders math_train --name deepscaler --manual-dir ... --data-dir ...``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trd_jax.data.builders import base
from trd_jax.data.builders.base import LocalFilesBuilder, LocalFilesConfig, dataset_dir
from trd_jax.data.builders.code_sets import CODE_ID_FIELDS, CODE_PROBLEM_FIELDS, CodeProblems, parse_code_row
from trd_jax.data.builders.files import SUPPORTED_EXTENSIONS, Record, read_records
from trd_jax.data.builders.math_sets import (ANSWER_FIELDS, ID_FIELDS, PROBLEM_FIELDS, REFERENCE_FIELDS,
                                             MathEval, MathTrain, parse_math_row)

BUILDERS: dict[str, type[LocalFilesBuilder]] = {b.name: b for b in (MathTrain, MathEval, CodeProblems)}


def builder_class(builder: str | type[LocalFilesBuilder]) -> type[LocalFilesBuilder]:
    if isinstance(builder, str):
        if builder not in BUILDERS:
            raise ValueError(f"unknown builder {builder!r}; one of {', '.join(BUILDERS)}")
        return BUILDERS[builder]
    return builder


def build(builder: str | type[LocalFilesBuilder], *, name: str, manual_dir: str, data_dir: str,
          splits: Mapping[str, Sequence[str]] | None = None, overwrite: bool = False, **options: Any) -> str:
    """Builds (or reuses) dataset ``name`` of ``builder`` and returns its folder; see ``base.build``."""
    return base.build(builder_class(builder), name=name, manual_dir=manual_dir, data_dir=data_dir,
                      splits=splits, overwrite=overwrite, **options)


__all__ = ["ANSWER_FIELDS", "BUILDERS", "CODE_ID_FIELDS", "CODE_PROBLEM_FIELDS", "CodeProblems", "ID_FIELDS",
           "LocalFilesBuilder", "LocalFilesConfig", "MathEval", "MathTrain", "PROBLEM_FIELDS",
           "REFERENCE_FIELDS", "Record", "SUPPORTED_EXTENSIONS", "build", "builder_class", "dataset_dir",
           "parse_code_row", "parse_math_row", "read_records"]
