"""The update's aggregated loss with its gradient computed in the forward pass.

losses.fused_divergence and fused_token_logprobs return per-token values under a custom VJP whose backward
pass recomputes each chunk's student (and teacher) logits before the two gradient matmuls, because the
per-token cotangents are known only then. The update, though, only ever differentiates one scalar:

    full vocabulary:  loss = Σ_t w_t finish(raw_t),        raw_t = Σ_v terms(log p_t, log q_t)
    sampled token:    loss = Σ_t w_t f(log p_t(y_t), log q_t(y_t))   (k1 policy gradient, k3: elementwise)

where the weights w_t are the aggregation's (token_mean: mask / N; seq_mean: mask / (row tokens x rows);
sum: mask), constants of the step. So each token's cotangent (w_t finish'(raw_t), or w_t ∂f/∂log p) is known
while the chunk's logits are still in hand: one pass per chunk computes the value, dz, d hidden = dz Wᵀ and
d head += hᵀ dz, and the backward pass only scales those by the loss's cotangent. No logits are recomputed:
per chunk 4 [C, d] x [d, V] products instead of 6 for a full-vocabulary divergence (student and teacher
logits, two gradient matmuls) and 3 instead of 4 for a sampled-token loss.

It applies where one pass can see every vocabulary column at once (vocab_chunk None, the default), to the
sampled-token losses and the full-vocabulary divergences with per-vocab-entry terms (forward_kl, reverse_kl,
jsd, forward_kl_clipped). With vocabulary tiles the normalisers need a pass of their own anyway, and top-k
reverse KL has its own path: those keep losses.per_token_loss aggregated. Values and gradients agree
with that path up to rounding (tests/test_onepass_loss.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trd_jax import losses
from trd_jax.losses import _F32, LOSSES, _sg, _matmul_f32, _vocab_plan, position_chunks, unchunk

Array = jax.Array
FULL_VOCAB_ONE_PASS = ("forward_kl", "reverse_kl", "jsd", "forward_kl_clipped")


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
    return cfg.vocab_chunk is None and (cfg.kind == "sampled_token" or cfg.name in FULL_VOCAB_ONE_PASS)


def _one_pass(per_token, hidden: Array, head: Array, target: tuple, shared: Array | None, weights: Array, *,
              kind: str, temperature: float, chunk_size: int, mask: Array) -> tuple[Array, Array]:
    """(loss f32[], values f32[B, T]); the gradient reaches hidden and head through the loss only.

    kind "teacher": target = (teacher_hidden [B, T, d'],), shared = teacher_head [d', V]; per_token = (terms,
        finish) of the divergence: value = finish(Σ_v terms(log p, log q)).
    kind "tokens": target = (tokens i32[B, T], teacher_logp f32[B, T]), shared None; per_token(log p(token),
        teacher_logp) -> value, elementwise (a sampled-token loss)."""
    dtype = jnp.promote_types(hidden.dtype, head.dtype)
    t_dtype = None if shared is None else jnp.promote_types(target[0].dtype, shared.dtype)

    def chunk(head, shared, acc, xs):
        h, tgt, w = xs
        zs = _matmul_f32(h, head, dtype) / temperature
        logp = zs - jax.nn.logsumexp(zs, -1, keepdims=True)
        if kind == "teacher":
            terms, finish = per_token
            zq = _matmul_f32(tgt[0], shared, t_dtype) / temperature
            logq = zq - jax.nn.logsumexp(zq, -1, keepdims=True)
            t, vjp = jax.vjp(lambda lp: terms(lp, logq), logp)
            g = vjp(jnp.ones_like(t))[0]  # ∂terms/∂log p, elementwise
            raw = jnp.sum(t, -1)
            if finish is None:
                value, c = raw, w
            else:
                value, finish_vjp = jax.vjp(finish, raw)
                c = w * finish_vjp(jnp.ones_like(raw))[0]
            g_sum = jnp.sum(g, -1, keepdims=True)
        else:
            tok, teacher_logp = tgt
            g = (jnp.arange(logp.shape[-1])[None, :] == tok[:, None]).astype(_F32)  # ∂ log p(token) / ∂ log p
            token_logp = jnp.sum(jnp.where(g > 0, logp, 0.0), -1)
            value, vjp = jax.vjp(lambda lp: per_token(lp, teacher_logp), token_logp)
            c = w * vjp(jnp.ones_like(value))[0]
            g_sum = 1.0
        # chain rule through log softmax: ∂/∂z_v = (g_v - p_v Σ g) / τ, times the token's cotangent c
        dz = ((c / temperature)[:, None] * (g - jnp.exp(logp) * g_sum)).astype(dtype)
        dh = jnp.einsum("cv,dv->cd", dz, head.astype(dtype), preferred_element_type=_F32)
        acc = acc + jnp.einsum("cd,cv->dv", h.astype(dtype), dz, preferred_element_type=_F32)
        return acc, (jnp.sum(w * value), value, dh.astype(h.dtype))

    def forward(h_chunks, head, tgt_chunks, shared, w_chunks):
        acc, (partial_losses, values, dh) = jax.lax.scan(lambda a, xs: chunk(head, shared, a, xs),
                                                         jnp.zeros(head.shape, _F32), (h_chunks, tgt_chunks, w_chunks))
        return (jnp.sum(partial_losses), values), (dh, acc.astype(head.dtype))

    @jax.custom_vjp
    def run(h_chunks, head, tgt_chunks, shared, w_chunks):
        return forward(h_chunks, head, tgt_chunks, shared, w_chunks)[0]

    def bwd(res, cts):
        dh, dhead = res
        ct = cts[0]  # the values leave through stop_gradient below: their cotangent is zero
        # the target, the teacher's head and the weights are constants
        return (ct * dh).astype(dh.dtype), (ct * dhead).astype(dhead.dtype), None, None, None

    run.defvjp(forward, bwd)
    shape = hidden.shape[:2]
    chunks = lambda x: position_chunks(_sg(x), mask, chunk_size)  # noqa: E731
    loss, values = run(position_chunks(hidden, mask, chunk_size), head, tuple(chunks(x) for x in target),
                       None if shared is None else _sg(shared), chunks(weights))
    return loss, _sg(unchunk(values, shape))


def aggregated_loss(cfg: losses.LossConfig, hidden: Array, head: Array, *, targets: Array, mask: Array,
                    num_tokens=None, num_rows=None, teacher_hidden: Array | None = None,
                    teacher_head: Array | None = None, teacher_logp: Array | None = None) -> tuple[Array, Array]:
    """(loss f32[], per-token values f32[B, T], 0 where ~mask): losses.aggregate(per_token_loss(...), mask,
    cfg.aggregation, ...) with the gradient computed in the forward pass where one_pass_applies(cfg).
    The values carry no gradient on that path (they are for diagnostics)."""
    mask = jnp.asarray(mask, bool)
    if not one_pass_applies(cfg):
        values = losses.per_token_loss(cfg, hidden, head, targets=targets, mask=mask, teacher_hidden=teacher_hidden,
                                       teacher_head=teacher_head, teacher_logp=teacher_logp)
        loss = losses.aggregate(values, mask, cfg.aggregation, num_tokens=num_tokens, num_rows=num_rows)
        return loss, jnp.where(mask, values, 0.0)
    params = dict(cfg.params)
    losses._check_fused(hidden, head, cfg.temperature, "aggregated_loss student")
    weights = aggregation_weights(mask, cfg.aggregation, num_tokens=num_tokens, num_rows=num_rows)
    common = dict(temperature=cfg.temperature, chunk_size=cfg.chunk_size, mask=mask)
    if cfg.kind == "sampled_token":
        if targets.shape != hidden.shape[:2] or teacher_logp is None or teacher_logp.shape != targets.shape:
            got = None if teacher_logp is None else teacher_logp.shape
            raise ValueError(f"aggregated_loss: targets {targets.shape} and teacher_logp {got} must be [B, T] = "
                             f"{hidden.shape[:2]}")
        fn = LOSSES[cfg.name].fn
        loss, values = _one_pass(lambda lp, tl: fn(lp, tl, **params), hidden, head,
                                 (targets.astype(jnp.int32), teacher_logp.astype(_F32)), None, weights, kind="tokens",
                                 **common)
    else:
        params = losses._bind(cfg.name, params)
        params.pop("temperature")
        losses._check_fused(teacher_hidden, teacher_head, cfg.temperature, "aggregated_loss teacher")
        if head.shape[1] != teacher_head.shape[1] or hidden.shape[:2] != teacher_hidden.shape[:2]:
            raise ValueError(f"aggregated_loss: student hidden {hidden.shape} / head {head.shape} and teacher hidden "
                             f"{teacher_hidden.shape} / head {teacher_head.shape} must share [B, T] and V")
        loss, values = _one_pass(_vocab_plan(cfg.name, params), hidden, head, (teacher_hidden,), teacher_head,
                                 weights, kind="teacher", **common)
    return loss, jnp.where(mask, values, 0.0)
