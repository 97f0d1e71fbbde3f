"""The update's aggregated full-vocabulary loss with its gradient computed in the forward pass.

losses.fused_divergence returns per-token values under a custom VJP whose backward pass recomputes each
chunk's student and teacher logits (2 C d V + 2 C d' V FLOPs) before the two gradient matmuls, because the
per-token cotangents are known only then. The update, though, only ever differentiates one scalar:

    loss = Σ_t w_t finish(raw_t),   raw_t = Σ_v terms(log p_t, log q_t)

where the weights w_t are the aggregation's (token_mean: mask / N; seq_mean: mask / (row tokens x rows);
sum: mask), constants of the step. So the cotangent of raw_t, w_t finish'(raw_t), is known while the chunk's
logits are still in hand: one pass per chunk computes the value, dz, d hidden = dz Wᵀ and d head += hᵀ dz, and
the backward pass only scales those by the loss's cotangent. A third fewer head FLOPs for the student
(forward, two gradient matmuls) and half for the teacher (forward only), no second pass over the teacher's
hidden states.

It applies where one pass can see every vocabulary column at once (vocab_chunk None, the default) and the
loss is a full-vocabulary divergence with per-vocab-entry terms (forward_kl, reverse_kl, jsd,
forward_kl_clipped). Elsewhere (vocabulary tiles, where the normalisers need a pass of their own, top-k,
the sampled-token losses, whose per-token cotangent depends on the log-probs of every chunk) the loss is
losses.per_token_loss aggregated, as before. Values and gradients agree with that path up to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trd_jax import losses
from trd_jax.losses import _F32, _sg, _matmul_f32, _vocab_plan, position_chunks, unchunk

Array = jax.Array
ONE_PASS_LOSSES = ("forward_kl", "reverse_kl", "jsd", "forward_kl_clipped")


def aggregation_weights(mask: Array, mode: str, *, num_tokens=None, num_rows=None) -> Array:
    """f32[B, T] w with Σ w * values = losses.aggregate(values, mask, mode, ...) for finite values."""
    mask = jnp.asarray(mask, bool)
    if mode == "token_mean":
        count = jnp.sum(mask) if num_tokens is None else num_tokens
        return jnp.where(mask, 1.0 / jnp.maximum(count, 1).astype(_F32), 0.0)
    if mode == "seq_mean":
        per_row = jnp.sum(mask, axis=-1, keepdims=True)
        rows = jnp.sum(per_row > 0) if num_rows is None else num_rows
        scale = 1.0 / (jnp.maximum(per_row, 1).astype(_F32) * jnp.maximum(rows, 1).astype(_F32))
        return jnp.where(mask, scale, 0.0)
    if mode == "sum":
        return mask.astype(_F32)
    raise ValueError(f"aggregation_weights: unknown mode {mode!r}; expected 'token_mean', 'seq_mean' or 'sum'")


def one_pass_applies(cfg: losses.LossConfig) -> bool:
    return cfg.name in ONE_PASS_LOSSES and cfg.vocab_chunk is None


def _one_pass(name: str, params: dict, hidden: Array, head: Array, teacher_hidden: Array, teacher_head: Array,
              weights: Array, *, temperature: float, chunk_size: int, mask: Array) -> tuple[Array, Array]:
    """(loss f32[], values f32[B, T]); the gradient reaches hidden and head through the loss only."""
    terms, finish = _vocab_plan(name, params)
    dtype = jnp.promote_types(hidden.dtype, head.dtype)
    t_dtype = jnp.promote_types(teacher_hidden.dtype, teacher_head.dtype)

    def chunk(head, teacher_head, acc, xs):
        h, ht, w = xs
        zs = _matmul_f32(h, head, dtype) / temperature
        zq = _matmul_f32(ht, teacher_head, t_dtype) / temperature
        logp = zs - jax.nn.logsumexp(zs, -1, keepdims=True)
        logq = zq - jax.nn.logsumexp(zq, -1, keepdims=True)
        t, vjp = jax.vjp(lambda lp: terms(lp, logq), logp)
        g = vjp(jnp.ones_like(t))[0]  # ∂terms/∂log p, elementwise
        raw = jnp.sum(t, -1)
        if finish is None:
            value, c = raw, w
        else:
            value, finish_vjp = jax.vjp(finish, raw)
            c = w * finish_vjp(jnp.ones_like(raw))[0]
        # chain rule through log softmax: ∂/∂z_v = (g_v - p_v Σ g) / τ, times the token's cotangent c
        dz = ((c / temperature)[:, None] * (g - jnp.exp(logp) * jnp.sum(g, -1, keepdims=True))).astype(dtype)
        dh = jnp.einsum("cv,dv->cd", dz, head.astype(dtype), preferred_element_type=_F32)
        acc = acc + jnp.einsum("cd,cv->dv", h.astype(dtype), dz, preferred_element_type=_F32)
        return acc, (jnp.sum(w * value), value, dh.astype(h.dtype))

    def forward(h_chunks, head, ht_chunks, teacher_head, w_chunks):
        acc, (partial_losses, values, dh) = jax.lax.scan(lambda a, xs: chunk(head, teacher_head, a, xs),
                                                         jnp.zeros(head.shape, _F32), (h_chunks, ht_chunks, w_chunks))
        return (jnp.sum(partial_losses), values), (dh, acc.astype(head.dtype))

    @jax.custom_vjp
    def run(h_chunks, head, ht_chunks, teacher_head, w_chunks):
        return forward(h_chunks, head, ht_chunks, teacher_head, w_chunks)[0]

    def bwd(res, cts):
        dh, dhead = res
        ct = cts[0]  # the values leave through stop_gradient below: their cotangent is zero
        # the teacher and the weights are constants
        return (ct * dh).astype(dh.dtype), (ct * dhead).astype(dhead.dtype), None, None, None

    run.defvjp(forward, bwd)
    shape = hidden.shape[:2]
    loss, values = run(position_chunks(hidden, mask, chunk_size), head,
                       position_chunks(_sg(teacher_hidden), mask, chunk_size), _sg(teacher_head),
                       position_chunks(_sg(weights), mask, chunk_size))
    return loss, _sg(unchunk(values, shape))


def aggregated_loss(cfg: losses.LossConfig, hidden: Array, head: Array, *, targets: Array, mask: Array,
                    num_tokens=None, num_rows=None, teacher_hidden: Array | None = None,
                    teacher_head: Array | None = None, teacher_logp: Array | None = None) -> tuple[Array, Array]:
    """(loss f32[], per-token values f32[B, T], 0 where ~mask): losses.aggregate(per_token_loss(...), mask,
    cfg.aggregation, ...) with the gradient computed in the forward pass where one_pass_applies(cfg).
    The values carry no gradient on that path (they are for diagnostics)."""
    mask = jnp.asarray(mask, bool)
    if one_pass_applies(cfg):
        params = losses._bind(cfg.name, dict(cfg.params))
        params.pop("temperature")
        losses._check_fused(hidden, head, cfg.temperature, "aggregated_loss student")
        losses._check_fused(teacher_hidden, teacher_head, cfg.temperature, "aggregated_loss teacher")
        if head.shape[1] != teacher_head.shape[1] or hidden.shape[:2] != teacher_hidden.shape[:2]:
            raise ValueError(f"aggregated_loss: student hidden {hidden.shape} / head {head.shape} and teacher hidden "
                             f"{teacher_hidden.shape} / head {teacher_head.shape} must share [B, T] and V")
        weights = aggregation_weights(mask, cfg.aggregation, num_tokens=num_tokens, num_rows=num_rows)
        loss, values = _one_pass(cfg.name, params, hidden, head, teacher_hidden, teacher_head, weights,
                                 temperature=cfg.temperature, chunk_size=cfg.chunk_size, mask=mask)
    else:
        values = losses.per_token_loss(cfg, hidden, head, targets=targets, mask=mask, teacher_hidden=teacher_hidden,
                                       teacher_head=teacher_head, teacher_logp=teacher_logp)
        loss = losses.aggregate(values, mask, cfg.aggregation, num_tokens=num_tokens, num_rows=num_rows)
    return loss, jnp.where(mask, values, 0.0)
