"""Rows sorted by length into micro-batches of their own widths (train.length_buckets).

A step's rows share one layout padded to its longest context and longest response, and the update scans
its M micro-batches at that width: with long-tailed response lengths most of the update's tokens are
padding. Sorting the rows by length and giving each micro-batch the width of its own longest rows (bucketed,
so that few shapes compile) computes the same gradient over fewer padded tokens:

    plan = plan_micro_batches(context_lengths, response_lengths, num_micro, context_width=C, response_width=R)
    rows in micro-batch m: plan.order[m * b:(m + 1) * b]; its widths: plan.widths[m] = (C_m, R_m)

A micro-batch's layout is the full layout's columns [C - C_m, C + R_m): contexts are left-padded and
responses right-padded, so the columns cut are padding in every row of it and positions are unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from trd_jax.shapes import bucket

# The minimum widths distill_batch buckets to (contexts, responses): a micro-batch never compiles a shape the
# full layout could not have had.
CONTEXT_MIN, RESPONSE_MIN = 16, 8


@dataclasses.dataclass(frozen=True)
class MicroPlan:
    order: np.ndarray  # i64[B]: the rows in micro-batch order, longest first
    widths: tuple[tuple[int, int], ...]  # per micro-batch: (context width, response width)

    @property
    def rows_per_micro(self) -> int:
        return len(self.order) // len(self.widths)

    def padded_tokens(self) -> int:
        """Tokens the update computes over (rows x columns, padding included)."""
        return self.rows_per_micro * sum(c + r for c, r in self.widths)


def plan_micro_batches(context_lengths, response_lengths, num_micro: int, *, context_width: int,
                       response_width: int) -> MicroPlan:
    """Rows ordered by context + response length (longest first, ties in row order) and cut into num_micro
    micro-batches of equal row counts; each micro-batch's widths are buckets of its longest context and
    response, at most the full layout's widths."""
    ctx = np.asarray(context_lengths, np.int64)
    resp = np.asarray(response_lengths, np.int64)
    if ctx.shape != resp.shape or ctx.ndim != 1:
        raise ValueError(f"context_lengths {ctx.shape} and response_lengths {resp.shape}: one length per row")
    if num_micro < 1 or len(ctx) % num_micro:
        raise ValueError(f"{len(ctx)} rows do not split into {num_micro} micro-batches")
    if ctx.max(initial=0) > context_width or resp.max(initial=0) > response_width:
        raise ValueError(f"a row is longer than the layout (context width {context_width}, response width "
                         f"{response_width})")
    order = np.argsort(-(ctx + resp), kind="stable")
    b = len(ctx) // num_micro
    widths = []
    for m in range(num_micro):
        rows = order[m * b:(m + 1) * b]
        widths.append((min(bucket(int(ctx[rows].max()), CONTEXT_MIN), context_width),
                       min(bucket(max(int(resp[rows].max()), 1), RESPONSE_MIN), response_width)))
    return MicroPlan(order, tuple(widths))
