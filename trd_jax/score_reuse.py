"""The score phase from the refine pass's own states (distill.teacher_context=refine, refine.reuse_states).

Under refine-context scoring the teacher scores y_r in the very context it wrote y_r in: the refine
prompt. While writing it, the sampler computed the final-layer state at every position of y_r
(SampleOutput.hidden, keep_hidden), which is what a full forward over refine prompt + y_r gives there, up
to the rounding of a cached one-token forward against a whole-sequence one. So the score phase need not run
the teacher again over those rows: it takes their states as they are and computes only the log-probs
(one lm_head product). Rows trained on something else (a fallback to y_o, a correct y_o kept under
refine.rows=wrong) are scored as before, in a sub-batch of their own.

The states must come from the same weights the score phase would use: true within a step, since the
teacher's weights change only in the update that follows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trd_jax import losses
from trd_jax.layouts import DistillBatch, Layout
from trd_jax.shapes import bucket
from trd_jax.steps import ScoreOutput
from trd_jax.trajectories import StepRows

Array = jax.Array


def reused_rows(rows: StepRows) -> np.ndarray:
    """i32[B]: per batch row, the index of its rewrite in the refine call's outputs (rows.y_r order) when it
    trains on that rewrite in its refine context, else -1 (the row is scored by a forward of its own)."""
    src = np.full(rows.num_rows, -1, np.int32)
    for b, source in enumerate(rows.sources):
        if source == "y_r" and rows.teacher_contexts[b] == list(rows.refine_prompts.ids[b]):
            src[b] = rows.verdicts.rewrite_index[b]
    return src


def rows_to_recompute(src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows to score by a forward, padded to a bucketed count by repeating the first; slot i32[B]: each
    such row's place in that sub-batch, -1 for reused rows)."""
    missing = np.flatnonzero(src < 0)
    slot = np.full(src.shape, -1, np.int32)
    slot[missing] = np.arange(missing.size, dtype=np.int32)
    if missing.size == 0:
        return missing, slot
    padded = np.concatenate([missing, np.full(bucket(missing.size) - missing.size, missing[0])])
    return padded.astype(np.int64), slot


def sub_batch(batch: DistillBatch, index: np.ndarray) -> tuple[Layout, np.ndarray, np.ndarray]:
    """The teacher Layout, targets and mask of the rows `index` (host arrays)."""
    teacher = jax.tree.map(lambda x: np.asarray(x)[index], batch.teacher)
    return teacher, np.asarray(batch.targets)[index], np.asarray(batch.response_mask)[index]


def pad_rows(kept: Array) -> Array:
    """kept [N, W, d] padded with zero rows to bucket(N): few distinct shapes for the assembly to compile."""
    n = kept.shape[0]
    return kept if bucket(n) == n else jnp.pad(kept, ((0, bucket(n) - n), (0, 0), (0, 0)))


def assemble(graphdef, params, kept: Array, src: Array, recomputed: Array | None, slot: Array, targets: Array,
             mask: Array, *, temperature: float = 1.0, chunk_size: int = 512) -> ScoreOutput:
    """score()'s output from kept states: row b's hidden is kept[src[b]] (cut or zero-padded to the response
    width R) where src[b] >= 0, else recomputed[slot[b]]; zero where ~mask. kept [N, W, d], src/slot i32[B],
    recomputed [M, R, d] or None, targets i32[B, R], mask bool[B, R]."""
    r = targets.shape[1]
    w = kept.shape[1]
    kept = kept[:, :r] if w >= r else jnp.pad(kept, ((0, 0), (0, r - w), (0, 0)))
    hidden = kept[jnp.maximum(src, 0)]
    if recomputed is not None:
        hidden = jnp.where((src >= 0)[:, None, None], hidden, recomputed[jnp.maximum(slot, 0)].astype(hidden.dtype))
    hidden = jnp.where(mask[..., None], hidden, 0)
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    logp = losses.fused_token_logprobs(hidden, model.lm_head_weight(), targets, chunk_size=chunk_size,
                                       temperature=temperature, mask=mask)
    return ScoreOutput(hidden, jnp.where(mask, logp, 0.0))


def jit_assemble(graphdef, *, temperature: float = 1.0, chunk_size: int = 512):
    """assemble() compiled (one process: the states stay where the sampler left them)."""
    return jax.jit(functools.partial(assemble, graphdef, temperature=temperature, chunk_size=chunk_size))
