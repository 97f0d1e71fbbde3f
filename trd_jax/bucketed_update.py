"""steps.update with rows sorted by length into micro-batches of their own widths (train.length_buckets).

steps.update scans M equal-shape micro-batches in one jit; here each micro-batch has the widths of its own
longest rows (length_buckets.plan_micro_batches), so the loop runs on the host: one jitted accumulate per
micro-batch (compiled once per (context width, response width) bucket, the gradient sum donated from call to
call), then one jitted optimizer step. The gradient is the scan's over the same rows up to float summation
order: every micro-batch loss is normalised by the whole step's token (or row) count, as in the scan.

The step's arrays are permuted once into micro-batch order and placed as [M, b, ...] (rows sharded over the
batch axes, like to_micro_batches); each accumulate call takes micro-batch m of them and cuts its columns inside
the jit. per_token comes back as [B, R] in the caller's row order (zero where masked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trd_jax import multihost
from trd_jax.layouts import Layout
from trd_jax.length_buckets import MicroPlan, plan_micro_batches
from trd_jax.losses import LossConfig
from trd_jax.sharding import replicated
from trd_jax.steps import (StepMetrics, TeacherSignal, TrainState, UpdateBatch, _accumulate, _apply_gradients,
                           _check_update_args, _with_teacher_head, to_micro_batches)


def _micro(batch: UpdateBatch, hidden, logp, m, widths: tuple[int, int]):
    """Micro-batch m of [M, b, ...] arrays, cut to its widths (static): the layout's columns [C - c, C + r), the
    response arrays' first r columns."""
    c, r = widths
    seq = batch.seq
    start = seq.context_width - c
    cols = lambda x: jax.lax.dynamic_index_in_dim(x, m, 0, keepdims=False)[:, start:seq.context_width + r]
    layout = Layout(cols(seq.tokens), cols(seq.positions), cols(seq.mask), c)
    head_cols = lambda x: None if x is None else jax.lax.dynamic_index_in_dim(x, m, 0, keepdims=False)[:, :r]
    return (layout, head_cols(batch.targets), head_cols(batch.mask), jax.tree.map(head_cols, hidden),
            head_cols(logp))


def _accumulate_micro(params, grads, total, batch: UpdateBatch, hidden, head, logp, m, num_tokens, num_rows,
                      frozen, dropout_key, *, widths, graphdef, cfg):
    seq, targets, mask, th, tl = _micro(batch, hidden, logp, m, widths)
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, m)
    frozen = None if frozen is None else jax.lax.stop_gradient(frozen)
    return _accumulate(params, grads, total, seq, targets, mask, th, head, tl, num_tokens, num_rows, frozen, key,
                       graphdef=graphdef, cfg=cfg)


class BucketedUpdate:
    """``step(state, batch, teacher, frozen=None, dropout_key=None, *, num_micro) -> (state, metrics)`` on a
    step's [B, ...] arrays (UpdateBatch of host or device arrays, TeacherSignal of [B, R, ...] arrays): rows sorted
    by length into num_micro micro-batches of their own widths. The state is donated, as with steps.jit_update;
    metrics.per_token is a host f32[B, R] in the caller's row order. `last_plan` is the last step's MicroPlan."""

    def __init__(self, graphdef, optimizer: optax.GradientTransformation, cfg: LossConfig, state_shardings, mesh, *,
                 ema_decay: float | None = None, teacher_head_source: str = "given"):
        self.mesh, self.ema_decay, self.teacher_head_source = mesh, ema_decay, teacher_head_source
        self.last_plan: MicroPlan | None = None
        param_sh = state_shardings.params
        self._zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=param_sh)
        self._head = jax.jit(lambda state, frozen: _with_teacher_head(state, TeacherSignal(), graphdef, frozen,
                                                                      teacher_head_source).head)
        self._permute = jax.jit(lambda tree, order: jax.tree.map(lambda x: jnp.take(x, order, axis=0), tree))
        self._accumulate = jax.jit(functools.partial(_accumulate_micro, graphdef=graphdef, cfg=cfg),
                                   static_argnames=("widths",), donate_argnums=(1,),
                                   out_shardings=(param_sh, None, None))
        self._apply = jax.jit(functools.partial(_apply_gradients, optimizer=optimizer, ema_decay=ema_decay),
                              donate_argnums=(0,), out_shardings=(state_shardings, None, None))

    @staticmethod
    def plan(seq: Layout, response_mask: np.ndarray, num_micro: int) -> MicroPlan:
        """The micro-batches of a step's rows: from each row's context length (the layout's mask) and response
        length (response_mask, host bool[B, R])."""
        mask = np.asarray(multihost.to_host(seq.mask))
        return plan_micro_batches(mask[:, :seq.context_width].sum(1), response_mask.sum(1), num_micro,
                                  context_width=seq.context_width, response_width=response_mask.shape[1])

    def _in_order(self, tree, order: np.ndarray):
        """tree's rows in micro-batch order: host arrays permuted here, device arrays by one jitted gather."""
        if any(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):
            return self._permute(tree, self._place(order))
        return jax.tree.map(lambda x: np.asarray(x)[order], tree)

    def __call__(self, state: TrainState, batch: UpdateBatch, teacher: TeacherSignal, frozen=None,
                 dropout_key=None, *, num_micro: int) -> tuple[TrainState, StepMetrics]:
        _check_update_args(state, self.ema_decay, self.teacher_head_source)
        if self.teacher_head_source != "given":
            teacher = teacher._replace(head=self._head(state, frozen))
        host_mask = np.asarray(multihost.to_host(batch.mask))
        plan = self.last_plan = self.plan(batch.seq, host_mask, num_micro)
        num_tokens, num_rows = np.int32(host_mask.sum()), np.int32(host_mask.any(-1).sum())
        order = plan.order
        # The layout and targets come from the host (the controller's), the teacher's signals from the device.
        mbatch, hidden, logp = to_micro_batches(
            (self._in_order(batch, order), *self._in_order((teacher.hidden, teacher.logp), order)), num_micro,
            self.mesh)
        grads = self._zeros(state.params)
        total = jnp.zeros((), jnp.float32)
        parts = []
        for m, widths in enumerate(plan.widths):
            grads, total, per_token = self._accumulate(state.params, grads, total, mbatch, hidden, teacher.head,
                                                       logp, self._place(np.int32(m)), self._place(num_tokens),
                                                       self._place(num_rows), frozen, dropout_key, widths=widths)
            parts.append(per_token)
        state, grad_norm, ok = self._apply(state, grads, total)
        b, width = plan.rows_per_micro, host_mask.shape[1]
        per_token = np.zeros((len(order), width), np.float32)
        for m, part in enumerate(parts):
            part = np.asarray(multihost.to_host(part))
            per_token[order[m * b:(m + 1) * b], :part.shape[1]] = part
        return state, StepMetrics(total, grad_norm, num_tokens, ~ok, per_token)

    def _place(self, x):
        """A host value every process holds alike, as an input of the jitted calls."""
        return multihost.to_global(x, replicated(self.mesh)) if multihost.multi_process() else x
