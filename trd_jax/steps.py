"""The jitted pure steps of distillation: score (teacher forward, no gradient) and update (student loss,
gradients, optax update), over sharded parameters.

Data flow of one step, all arrays device-resident:

    score(teacher_params, teacher layout)      -> ScoreOutput(hidden f32[B, R, d_t], logp f32[B, R])
    update(state, student layout, targets, mask, teacher hidden/head/logp) -> (state, metrics)

The teacher hands the student its final hidden states on the response slice, not its logits: with the
teacher's lm_head the loss recomputes teacher logits chunk by chunk (losses.fused_divergence), so
f32[B, R, V] never exists for either model. The gradient of the aggregated loss is computed in that same
pass (onepass_loss.py), so the backward pass recomputes no logits.

Gradient accumulation: batch arrays carry a leading micro-batch axis [M, b, ...]; the update scans the
micro-batches, normalises every micro-batch loss by the token count of the whole step (a global token
mean, not a mean of means), and applies the optimizer once. A non-finite loss or gradient leaves the
parameters and optimizer state untouched and counts the step in `state.skipped`.

LoRA (models/lora.py): the state's params are the adapters alone, so gradients and the optimizer state exist
for them only; the frozen base weights come in as a separate `frozen` argument that is never donated (OPSD's
initial teacher reads the very same buffers), and the model is nnx.merge(graphdef, adapters, frozen).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trd_jax import losses, multihost
from trd_jax.losses import LossConfig
from trd_jax.layouts import Layout, response_columns
from trd_jax.models import lora
from trd_jax.models.transformer import Transformer
from trd_jax.offline.topk import TopKTargets, topk_divergence
from trd_jax.onepass_loss import aggregated_loss
from trd_jax.sharding import BATCH_AXES, batch_sharding, replicated, shardings_like_params

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * learning_rate, after global-norm
    clipping (TRD_SPEC §5 defaults)."""

    learning_rate: float = 5e-6
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.005
    clip_norm: float = 1.0


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else cfg.learning_rate, peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


class TrainState(NamedTuple):
    params: Any  # nnx.State of the student's Params (LoRA: of its adapters only)
    opt_state: Any
    step: Array  # i32[]: optimizer steps applied
    skipped: Array  # i32[]: steps skipped for a non-finite loss or gradient
    ema_params: Any = None  # an EMA of params (OPSD's EMA teacher), or None


def init_state(params, optimizer: optax.GradientTransformation, *, ema: bool = False) -> TrainState:
    """A fresh state holding a COPY of params: the update step donates the state, and the caller's arrays
    must stay valid (e.g. as OPSD's frozen initial teacher). The EMA is kept in float32 so that a decay
    close to 1 is not rounded away in bf16."""
    ema_params = jax.tree.map(lambda p: p.astype(jnp.float32), params) if ema else None
    return TrainState(jax.tree.map(jnp.copy, params), optimizer.init(params), jnp.zeros((), jnp.int32),
                      jnp.zeros((), jnp.int32), ema_params)


def state_shardings(params, param_shardings, optimizer: optax.GradientTransformation, mesh, *,
                    ema: bool = False) -> TrainState:
    """TrainState of shardings: optimizer moments and the EMA sharded like the parameters."""
    opt_shapes = jax.eval_shape(optimizer.init, params)
    return TrainState(param_shardings, shardings_like_params(opt_shapes, params, param_shardings, mesh),
                      replicated(mesh), replicated(mesh), param_shardings if ema else None)


def init_sharded_state(params, param_shardings, optimizer: optax.GradientTransformation, mesh, *,
                       ema: bool = False) -> TrainState:
    """init_state compiled so that every array is created directly with its sharding."""
    shardings = state_shardings(params, param_shardings, optimizer, mesh, ema=ema)
    return jax.jit(functools.partial(init_state, optimizer=optimizer, ema=ema), out_shardings=shardings)(params)


OPSD_TEACHER_MODES = ("initial", "live", "ema")  # distill.opsd_teacher; roles.teacher_weights uses them


class ScoreOutput(NamedTuple):
    hidden: Array  # [B, R, d_teacher] final hidden states (compute dtype) predicting each response token
    logp: Array  # f32[B, R] teacher log-probability of each response token (temperature applied)


def merged_model(graphdef, params, frozen=None) -> Transformer:
    """The model of `params`, plus the frozen base weights under LoRA (then `params` are the adapters)."""
    if frozen is None:
        return nnx.merge(graphdef, params)
    # nnx.merge reuses the states' Variables; the base's come from outside a value_and_grad trace, where
    # nnx.remat could not update them: tree.map makes new ones (over the same arrays) in the current trace.
    return nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))


def _response_hidden(model: Transformer, seq: Layout, response_width: int) -> Array:
    hidden, _ = model(seq.tokens, seq.positions, seq.mask)
    return response_columns(hidden, seq.context_width, response_width)


def score(graphdef, params, seq: Layout, targets: Array, mask: Array, *, temperature: float = 1.0,
          chunk_size: int = 512) -> ScoreOutput:
    """Teacher forward under stop_gradient: hidden states and token log-probs (0 where ~mask) of the
    response slice. seq: the teacher's Layout [B, C + R]; targets i32[B, R], mask bool[B, R]."""
    params = jax.lax.stop_gradient(params)
    model: Transformer = nnx.merge(graphdef, params)
    hidden = _response_hidden(model, seq, targets.shape[-1])
    logp = losses.fused_token_logprobs(hidden, model.lm_head_weight(), targets, chunk_size=chunk_size,
                                       temperature=temperature, mask=mask)
    return ScoreOutput(hidden, jnp.where(mask, logp, 0.0))


class StepMetrics(NamedTuple):
    loss: Array  # f32[]: the aggregated loss of the step
    grad_norm: Array  # f32[]: global norm before clipping
    num_tokens: Array  # i32[]: response tokens in the step
    skipped: Array  # bool[]: this step was skipped (non-finite)
    per_token: Array  # f32[M, b, R] per-token divergence values (0 where masked), for diagnostics


def _micro_loss(params, graphdef, cfg: LossConfig, seq: Layout, targets, mask, teacher_hidden, teacher_head,
                teacher_logp, num_tokens, num_rows, frozen=None, dropout_key=None):
    model = merged_model(graphdef, params, frozen)
    if dropout_key is not None:
        lora.set_dropout_keys(model, dropout_key)
    hidden = _response_hidden(model, seq, targets.shape[-1])
    stored = isinstance(teacher_hidden, TopKTargets)  # offline: the teacher's stored top-k, not its states
    if stored and cfg.kind == "full_vocab":
        values = topk_divergence(cfg.name, hidden, model.lm_head_weight(), teacher_hidden, mask=mask,
                                 temperature=cfg.temperature, chunk_size=cfg.chunk_size, **dict(cfg.params))
        loss = losses.aggregate(values, mask, cfg.aggregation, num_tokens=num_tokens, num_rows=num_rows)
        return loss, jnp.where(mask, values, 0.0)
    # a sampled-token loss reads only teacher_logp (offline: the stored token log-probs)
    return aggregated_loss(cfg, hidden, model.lm_head_weight(), targets=targets, mask=mask, num_tokens=num_tokens,
                           num_rows=num_rows, teacher_hidden=None if stored else teacher_hidden,
                           teacher_head=teacher_head, teacher_logp=teacher_logp)


TEACHER_HEAD_SOURCES = ("given", "live", "ema")


class UpdateBatch(NamedTuple):
    """A step's trained rows as M micro-batches of b rows (to_micro_batches): the student's layout (context + response),
    the response targets and their mask."""

    seq: Layout  # [M, b, L] arrays
    targets: Array  # i32[M, b, R]
    mask: Array  # bool[M, b, R]


class TeacherSignal(NamedTuple):
    """What the loss reads of the teacher (fields a loss does not use stay None): its final-layer states on the
    response f32|bf16[M, b, R, d] (full-vocabulary losses; offline: the stored TopKTargets), its lm_head [d, V]
    (None with teacher_head_source live / ema: read from the state inside the step), and each target's log-prob
    f32[M, b, R] (sampled-token losses)."""

    hidden: Array | TopKTargets | None = None
    head: Array | None = None
    logp: Array | None = None


def _check_update_args(state: TrainState, ema_decay: float | None, teacher_head_source: str) -> None:
    if teacher_head_source not in TEACHER_HEAD_SOURCES:
        raise ValueError(f"teacher_head_source={teacher_head_source!r}: expected one of {TEACHER_HEAD_SOURCES}")
    if state.ema_params is not None and not (ema_decay is not None and 0.0 < ema_decay < 1.0):
        raise ValueError(f"ema_decay={ema_decay}: a state with an EMA needs 0 < ema_decay < 1")


def _with_teacher_head(state: TrainState, teacher: TeacherSignal, graphdef, frozen, teacher_head_source: str):
    """teacher with its lm_head: as given, or (live / ema) read from the state, detached."""
    if teacher_head_source == "given":
        return teacher
    source = state.params if teacher_head_source == "live" else state.ema_params
    if source is None:
        raise ValueError("teacher_head_source='ema' needs a state made with init_state(..., ema=True)")
    return teacher._replace(head=jax.lax.stop_gradient(merged_model(graphdef, source, frozen).lm_head_weight()))


def _accumulate(params, grads, total, seq: Layout, targets, mask, teacher_hidden, teacher_head, teacher_logp,
                num_tokens, num_rows, frozen, key, *, graphdef, cfg: LossConfig):
    """One micro-batch's loss and gradient added to the running (grads, total); also its per-token values."""
    (loss, per_token), g = jax.value_and_grad(_micro_loss, has_aux=True)(
        params, graphdef, cfg, seq, targets, mask, teacher_hidden, teacher_head, teacher_logp, num_tokens, num_rows,
        frozen, key)
    return jax.tree.map(jnp.add, grads, g), total + loss, per_token


def _apply_gradients(state: TrainState, grads, loss, *, optimizer: optax.GradientTransformation,
                     ema_decay: float | None) -> tuple[TrainState, Array, Array]:
    """The optimizer step on the accumulated gradients, skipped (state unchanged, `skipped` counted) when the
    loss or the gradient is not finite. Returns (state, grad_norm, ok)."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_ok(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    params = keep_if_ok(new_params, state.params)
    ema = state.ema_params
    if ema is not None:
        ema = keep_if_ok(jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p.astype(e.dtype), ema,
                                      new_params), ema)
    new_state = TrainState(params, keep_if_ok(new_opt, state.opt_state), state.step + ok.astype(jnp.int32),
                           state.skipped + (~ok).astype(jnp.int32), ema)
    return new_state, grad_norm, ok


def update(state: TrainState, batch: UpdateBatch, teacher: TeacherSignal, frozen=None, dropout_key: Array | None = None,
           *, graphdef, optimizer: optax.GradientTransformation, cfg: LossConfig, ema_decay: float | None = None,
           teacher_head_source: str = "given") -> tuple[TrainState, StepMetrics]:
    """One optimizer step over M micro-batches (every batch array [M, b, ...]), on-policy: the sampled-token
    losses take the detached student as the behaviour policy (one optimizer step per batch).

    frozen: under LoRA, the base weights (state.params are then the adapters); they get no gradient.
    dropout_key: the key of the adapters' dropout (LoRA with dropout > 0), folded with the micro-batch index.

    teacher_head_source: "given" uses teacher.head (a separate teacher, or OPSD's frozen initial weights);
    "live" / "ema" read the head from the state itself inside the step, because an argument aliasing the
    donated state would be invalidated by the donation. ema_decay in (0, 1) is required when the state
    carries an EMA."""
    _check_update_args(state, ema_decay, teacher_head_source)
    teacher = _with_teacher_head(state, teacher, graphdef, frozen, teacher_head_source)
    seq, targets, mask = batch
    num_tokens = jnp.sum(mask).astype(jnp.int32)
    num_rows = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.int32)
    frozen = None if frozen is None else jax.lax.stop_gradient(frozen)

    def micro(carry, xs):
        seq_m, tgt, msk, th, tl, index = xs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        grads, total, per_token = _accumulate(state.params, *carry, seq_m, tgt, msk, th, teacher.head, tl, num_tokens,
                                              num_rows, frozen, key, graphdef=graphdef, cfg=cfg)
        return (grads, total), per_token

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    indices = jnp.arange(mask.shape[0], dtype=jnp.int32)
    (grads, loss), per_token = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32)),
        (seq, targets, mask, teacher.hidden, teacher.logp, indices))
    new_state, grad_norm, ok = _apply_gradients(state, grads, loss, optimizer=optimizer, ema_decay=ema_decay)
    return new_state, StepMetrics(loss, grad_norm, num_tokens, ~ok, per_token)


# ------------------------------------------------------------------------------------------------
# Compiled entry points with explicit shardings


def shardings_of(tree):
    """The shardings of a placed pytree (e.g. a TrainState built from sharded params: optax states
    inherit their parameters' shardings), for use as in/out shardings."""
    return jax.tree.map(lambda x: x.sharding, tree)


def micro_batch_sharding(mesh) -> jax.sharding.NamedSharding:
    """[M, b, ...] arrays: micro-batch axis replicated, rows over (data, fsdp)."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, BATCH_AXES))


def to_micro_batches(tree, num_micro: int, mesh):
    """[B, ...] arrays (host or device) -> [num_micro, B / num_micro, ...] placed for jit_update."""
    sharding = micro_batch_sharding(mesh)

    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_micro} micro-batches")
        shape = (num_micro, x.shape[0] // num_micro) + x.shape[1:]
        if multihost.multi_process() and not isinstance(x, jax.Array):  # host rows, the same on every process
            return multihost.to_global(np.reshape(x, shape), sharding)
        return jax.device_put(jnp.reshape(x, shape), sharding)

    return jax.tree.map(split, tree)


def jit_update(graphdef, optimizer: optax.GradientTransformation, cfg: LossConfig, state_shardings, mesh, *,
               ema_decay: float | None = None, teacher_head_source: str = "given", frozen_shardings=None):
    """update() compiled for a mesh: ``step(state, batch, teacher, frozen=None, dropout_key=None) -> (state,
    metrics)``. The state is donated (replaced in place) and keeps its shardings; the batch's and the teacher's
    [M, b, ...] arrays (to_micro_batches; the layout compiled once per context width) are split over (data,
    fsdp), the teacher's head replicated; under LoRA ``frozen`` is the base (placed with frozen_shardings, never
    donated)."""
    rows = micro_batch_sharding(mesh)
    fn = functools.partial(update, graphdef=graphdef, optimizer=optimizer, cfg=cfg, ema_decay=ema_decay,
                           teacher_head_source=teacher_head_source)
    jitted = jax.jit(fn, in_shardings=(state_shardings, rows, TeacherSignal(rows, None, rows), frozen_shardings, None),
                     out_shardings=(state_shardings, None), donate_argnums=(0,))

    def step(state, batch: UpdateBatch, teacher: TeacherSignal, frozen=None, dropout_key=None):
        return jitted(state, batch, teacher, frozen, dropout_key)

    return step


def jit_score(graphdef, param_shardings, mesh, *, temperature: float = 1.0, chunk_size: int = 512):
    """score() compiled for a mesh, on [b, ...] arrays (one micro-batch, or all rows at once)."""
    rows = batch_sharding(mesh)
    fn = functools.partial(score, graphdef, temperature=temperature, chunk_size=chunk_size)
    return jax.jit(fn, in_shardings=(param_shardings, rows, rows, rows), out_shardings=ScoreOutput(rows, rows))
