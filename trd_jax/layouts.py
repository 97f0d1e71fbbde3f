"""Token layouts for scoring and distillation: the student sees x + y, the teacher sees c + y.

c is the teacher's context: x (OPD), x plus the privileged reference y* (OPSD), or the refine prompt
(TRD's refine-conditioned teacher). Both score the same response ids y.

Layout: the context is LEFT-padded to a common width C and the response RIGHT-padded to R, so every
row's response starts at column C. The hidden state at column C - 1 + r predicts response token r
in every row, for student and teacher alike, whatever their context lengths: slicing columns
[C - 1, C - 1 + R) of each gives f32[B, R, ...] arrays aligned token for token with `targets`.

    batch = distill_batch(prompts, responses, teacher_contexts, pad_id=0)
    h_s = student(batch.student.tokens, batch.student.positions, batch.student.mask)[0]
    h_s = response_slice(h_s, batch.student)        # [B, R, d]: predicts batch.targets
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from trd_jax.shapes import bucket


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tokens", "positions", "mask"],
                   meta_fields=["context_width"])
@dataclasses.dataclass(frozen=True)
class Layout:
    """One side's model input, on the host (numpy) and on device (jax arrays) alike: tokens i32[..., C + R];
    positions i32[..., C + R] (0 at each row's first real token); mask bool[..., C + R] (real tokens). A
    pytree whose context_width C is static metadata: the jitted steps read it from their argument and
    compile once per width. Leading axes are [B] or, micro-batched, [M, b]."""

    tokens: Any
    positions: Any
    mask: Any
    context_width: int

    def inputs(self) -> tuple:
        """(tokens, positions, mask): the model's call arguments."""
        return self.tokens, self.positions, self.mask


class DistillBatch(NamedTuple):
    student: Layout  # x + y
    teacher: Layout  # c + y
    targets: np.ndarray  # i32[B, R] response ids, pad_id after each row's end
    response_mask: np.ndarray  # bool[B, R]: r < len(y_b)


def _check_rows(name: str, rows: Sequence[Sequence[int]], batch: int, allow_empty: bool) -> None:
    if len(rows) != batch:
        raise ValueError(f"{name}: {len(rows)} rows, expected {batch}")
    if not allow_empty:
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"{name}[{i}]: empty")


def build_layout(contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, context_width: int,
                 response_width: int, name: str = "contexts") -> Layout:
    """Left-pads each context to context_width and right-pads each response to response_width. Padding
    in the model input is id 0 (masked anyway): a tokenizer's pad id may lie outside the embedding."""
    b = len(contexts)
    tokens = np.zeros((b, context_width + response_width), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, (ctx, resp) in enumerate(zip(contexts, responses)):
        if len(ctx) > context_width:
            raise ValueError(f"{name}[{i}]: {len(ctx)} tokens exceed the context width {context_width}")
        if len(resp) > response_width:
            raise ValueError(f"responses[{i}]: {len(resp)} tokens exceed the response width {response_width}")
        tokens[i, context_width - len(ctx):context_width] = ctx
        tokens[i, context_width:context_width + len(resp)] = resp
        mask[i, context_width - len(ctx):context_width + len(resp)] = True
    positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0).astype(np.int32)
    return Layout(tokens, positions, mask, context_width)


def distill_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  teacher_contexts: Sequence[Sequence[int]] | None = None, *, pad_id: int = 0,
                  student_width: int | None = None, teacher_width: int | None = None,
                  response_width: int | None = None) -> DistillBatch:
    """Student layout x + y and teacher layout c + y (c = x when teacher_contexts is None).

    Widths default to buckets of the longest row (trd_jax.shapes.bucket) so that steady-state steps
    reuse compiled code; pass them explicitly to pin shapes. Responses may be empty (a row with no
    response has an all-false response mask and contributes nothing to the loss).
    """
    b = len(prompts)
    if b == 0:
        raise ValueError("prompts: empty batch")
    _check_rows("prompts", prompts, b, allow_empty=False)
    _check_rows("responses", responses, b, allow_empty=True)
    contexts = prompts if teacher_contexts is None else teacher_contexts
    _check_rows("teacher_contexts", contexts, b, allow_empty=False)
    r = response_width or bucket(max(max(len(y) for y in responses), 1), 8)
    s_width = student_width or bucket(max(len(x) for x in prompts), 16)
    t_width = teacher_width or bucket(max(len(c) for c in contexts), 16)
    student = build_layout(prompts, responses, context_width=s_width, response_width=r, name="prompts")
    teacher = build_layout(contexts, responses, context_width=t_width, response_width=r, name="teacher_contexts")
    response_mask = student.mask[:, s_width:]
    targets = np.where(response_mask, student.tokens[:, s_width:], pad_id).astype(np.int32)
    return DistillBatch(student, teacher, targets.copy(), response_mask.copy())


def response_columns(x, context_width: int, response_width: int):
    """x [B, C + R, ...] -> [B, R, ...]: entry r is column C - 1 + r, the one that predicts response token r."""
    return x[:, context_width - 1:context_width - 1 + response_width]


def response_slice(x, layout: Layout):
    """response_columns for one side's layout."""
    return response_columns(x, layout.context_width, layout.tokens.shape[1] - layout.context_width)
