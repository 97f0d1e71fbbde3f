"""Stored teacher targets for offline distillation: the teacher's top-k log-probs per position plus the log of
the mass outside them, and the divergences a student can be trained on against them.

A teacher distribution q over V entries is kept as k + 1 buckets: its k most probable tokens (ids and
log-probs) and one bucket for the rest (log of 1 - their mass). The student's distribution p is projected
onto the same buckets (its log-probs at those ids, and the log of its mass outside them), and the loss is
the divergence between the two (k + 1)-bucket distributions. That is exact when k covers the vocabulary
(the tail bucket is empty on both sides); otherwise it ignores how each side spreads its tail mass over
the tail's tokens: forward KL, for instance, loses Σ_tail q log(q / p) - Q log(Q / P) >= 0 (Q, P: the tail
masses; log-sum inequality), so the top-k loss is a lower bound of the full one and equal where the
teacher's tail is one token or none. docs/offline.md reports the error on the embedded default.

The teacher's log-prob of the trained token is stored too, so that the sampled-token losses (k1 policy
gradient, k3) need nothing more.

Memory: both sides work on chunks of positions with the full vocabulary (chunk_size x V floats), and the
student's chunks are rematerialised in the backward pass (jax.checkpoint), so neither ever holds
[B, T, V].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from trd_jax import losses

Array = jax.Array
_F32 = jnp.float32

# Divergences that the (k + 1)-bucket projection supports, with their keyword parameters.
TOPK_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "forward_kl_clipped")


class TopKTargets(NamedTuple):
    """The teacher's targets at each response position (tempered by the loss temperature)."""

    ids: Array  # i32[B, T, k]: the k most probable token ids, most probable first
    logp: Array  # f32[B, T, k]: their log-probs
    tail: Array  # f32[B, T]: log of the mass outside them (-inf when k covers the vocabulary)
    token_logp: Array  # f32[B, T]: the log-prob of the trained token


def _chunked(fn, chunk_size: int, mask: Array, *arrays: Array):
    """fn over chunks of positions: arrays [B, T, ...] -> fn's outputs [B, T, ...] (masked positions zeroed)."""
    shape = arrays[0].shape[:2]
    chunks = [losses.position_chunks(a, mask, chunk_size) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(chunks))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:shape[0] * shape[1]].reshape(*shape, *o.shape[2:]),
                        out)


def _tail_log_mass(logp: Array, ids: Array) -> Array:
    """log of the mass of log-probs logp [C, V] outside the ids [C, k], computed over those entries
    themselves (no 1 - Σ cancellation): -inf where the ids cover every entry."""
    outside = jnp.ones(logp.shape, bool).at[jnp.arange(logp.shape[0])[:, None], ids].set(False)
    return jax.nn.logsumexp(jnp.where(outside, logp, -jnp.inf), axis=-1)


def teacher_topk(hidden: Array, head: Array, tokens: Array, mask: Array, *, k: int, temperature: float = 1.0,
                 chunk_size: int = 512) -> TopKTargets:
    """The teacher's TopKTargets from its final-layer states: hidden [B, T, d], head [d, V], tokens int[B, T]
    (the trained tokens), mask bool[B, T]. Masked positions hold zeros (ids 0, log-probs 0)."""
    vocab = head.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k}: must be in [1, {vocab}] (the vocabulary)")

    def chunk(h, t):
        logp = jax.nn.log_softmax(jnp.einsum("cd,dv->cv", h, head, preferred_element_type=_F32) / temperature)
        top, ids = jax.lax.top_k(logp, k)
        token = jnp.take_along_axis(logp, t[:, None].astype(jnp.int32), axis=-1)[:, 0]
        return ids.astype(jnp.int32), top, _tail_log_mass(logp, ids), token

    ids, top, tail, token = _chunked(chunk, chunk_size, mask, jax.lax.stop_gradient(hidden), tokens)
    return TopKTargets(ids, jnp.where(mask[..., None], top, 0.0), jnp.where(mask, tail, 0.0),
                       jnp.where(mask, token, 0.0))


def _bucket_terms(name: str, params: dict):
    """(terms, finish) of a divergence between (k + 1)-bucket log-prob vectors: the full-vocabulary losses'
    own per-entry terms (losses._vocab_plan), which apply to any support."""
    if name not in TOPK_DIVERGENCES:
        raise ValueError(f"loss.name={name!r}: stored top-k targets support {', '.join(TOPK_DIVERGENCES)} (full-"
                         "vocabulary losses) and the sampled-token losses; this one needs the teacher's whole "
                         "distribution")
    return losses._vocab_plan(name, params)


def topk_divergence(name: str, hidden: Array, head: Array, targets: TopKTargets, *, mask: Array,
                    temperature: float = 1.0, chunk_size: int = 512, **params) -> Array:
    """f32[B, T]: divergence `name` between the student's distribution (softmax(hidden @ head / τ), hidden
    [B, T, d], head [d, V]) and the stored teacher targets, both projected onto the targets' k ids and one
    tail bucket; 0 where ~mask. Differentiable in hidden and head."""
    terms, finish = _bucket_terms(name, params)
    losses._check_temperature(temperature)

    full = targets.ids.shape[-1] == head.shape[1]  # k covers the vocabulary: no tail bucket (exact)

    @jax.checkpoint  # the backward pass recomputes a chunk's [C, V] logits instead of keeping them
    def chunk(h, ids, q_top, q_tail):
        logits = jnp.einsum("cd,dv->cv", h, head, preferred_element_type=_F32)
        logp = jax.nn.log_softmax(logits / temperature)
        student = jnp.take_along_axis(logp, ids, axis=-1)
        teacher = q_top
        if not full:
            student = jnp.concatenate([student, _tail_log_mass(logp, ids)[:, None]], axis=-1)
            teacher = jnp.concatenate([q_top, q_tail[:, None]], axis=-1)
        value = jnp.sum(terms(student, teacher), axis=-1)
        return value if finish is None else finish(value)

    # Masked positions come in as zeros (log-probs 0: not a distribution, but every term is finite) and go out
    # as 0 with a zero cotangent.
    values = _chunked(chunk, chunk_size, mask, hidden, targets.ids, targets.logp, targets.tail)
    return jnp.where(mask, values, 0.0)
