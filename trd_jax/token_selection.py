"""Token selection: from a row's logits to its next token (greedy, temperature, top-k, top-p) with one uniform per
row, and the sampling settings; the samplers (sampling.py, continuous.py, speculative.py) call it every step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k}: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p={self.top_p}: must be in (0, 1]")



# ------------------------------------------------------------------------------------------------
# Token selection
#
# XLA's CPU top_k, sort, argmax and cumsum over a full vocabulary cost milliseconds per call (top_k over
# 32k entries: ~40 ms), more than a small model's whole decode step. Every selection below therefore
# uses plain elementwise ops and reductions: a chunked inverse CDF for the draw, a bitwise search for
# the top-k and top-p thresholds, and max/min reductions for argmax.


def first_argmax(x: Array) -> Array:
    """First index of the maximum along the last axis, from two cheap reductions."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def _ordered_bits(x: Array) -> Array:
    """float32 -> uint32 with the same order (sign bit flipped for >= 0, all bits for < 0)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 0, u | jnp.uint32(1 << 31), ~u)


def _largest_key_where(keys: Array, predicate) -> Array:
    """The largest uint32 t (per row) with predicate(keys >= t) true, for a predicate that holds at
    t = 0 and is monotone (true below some t, false above); built from the top bit down in 32 steps."""
    t = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
    for bit in range(31, -1, -1):
        cand = t | jnp.uint32(1 << bit)
        t = jnp.where(predicate(keys >= cand), cand, t)
    return t


def _chunk_size(vocab: int, target_chunks: int = 256) -> int:
    per_chunk = -(-vocab // target_chunks)
    return max(128, (per_chunk + 127) // 128 * 128)


def _as_chunks(x: Array, chunk: int, fill) -> Array:
    """[B, V] -> [B, ceil(V / chunk), chunk], padded with `fill`."""
    b, v = x.shape
    pad = -v % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(b, -1, chunk)


def top_k_candidates(x: Array, k: int) -> tuple[Array, Array]:
    """(values [B, M], vocab ids [B, M]) of a candidate set holding each row's top k entries, with
    everything below the k-th largest set to -inf (ties at the threshold kept).

    The top k entries all lie in the k chunks with the largest maxima, so only those k * chunk
    candidates are gathered and searched (M = V when there are no more than k chunks)."""
    b, v = x.shape
    chunk = _chunk_size(v)
    if -(-v // chunk) > k:
        chunks = _as_chunks(x, chunk, -jnp.inf)
        _, best = jax.lax.top_k(jnp.max(chunks, axis=-1), k)  # top_k is cheap over [B, V / chunk]
        x = jnp.take_along_axis(chunks, best[:, :, None], axis=1).reshape(b, -1)
        ids = (best[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(b, -1)
    else:
        ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    keys = _ordered_bits(x)
    thresh = _largest_key_where(keys, lambda ge: jnp.sum(ge, axis=-1, keepdims=True) >= k)
    return jnp.where(keys >= thresh, x, -jnp.inf), ids


def top_p_mask(probs: Array, top_p: float) -> Array:
    """bool[B, V]: the smallest set of most probable entries whose mass reaches top_p of the row's
    total (ties at the threshold kept), i.e. nucleus filtering without a sort."""
    keys = _ordered_bits(probs)
    need = top_p * jnp.sum(probs, axis=-1, keepdims=True)
    thresh = _largest_key_where(keys, lambda ge: jnp.sum(jnp.where(ge, probs, 0.0), -1, keepdims=True) >= need)
    return keys >= thresh


def _row_uniforms(key: Array, b: int, row_offset: Array | None = None, total_rows: int = 0) -> Array:
    """f32[b, 1] in [0, 1): uniform(key, (b, 1)), or with a row offset rows [row_offset, row_offset + b) of
    uniform(key, (total_rows, 1)) (rows past total_rows, padding, get 1.0). A batch computed in groups thus
    draws exactly the numbers a single call over all total_rows rows draws, whatever the PRNG
    implementation's partitioning (the table costs total_rows numbers per step, nothing next to a vocabulary)."""
    if row_offset is None:
        return jax.random.uniform(key, (b, 1))
    table = jnp.concatenate([jax.random.uniform(key, (total_rows, 1)), jnp.ones((b, 1), jnp.float32)])
    return jax.lax.dynamic_slice_in_dim(table, row_offset, b, axis=0)


def _categorical(probs: Array, key: Array, row_offset: Array | None = None, total_rows: int = 0) -> Array:
    """One draw per row from unnormalised probs f32[B, V] >= 0 by inverse CDF: one uniform per row
    (instead of a Gumbel per entry), a cumulative sum over chunk totals, then within one chunk.
    row_offset / total_rows: see _row_uniforms."""
    return inverse_cdf(probs, _row_uniforms(key, probs.shape[0], row_offset, total_rows))


def inverse_cdf(probs: Array, uniforms: Array) -> Array:
    """The draw of each row from unnormalised probs f32[B, V] >= 0 that the uniform f32[B, 1] in [0, 1)
    picks (see _categorical)."""
    b, v = probs.shape
    chunk = _chunk_size(v)
    chunks = _as_chunks(probs, chunk, 0.0)
    totals = jnp.sum(chunks, axis=-1)  # [B, C]
    ends = jnp.cumsum(totals, axis=-1)
    u = 1.0 - uniforms  # (0, 1]: a zero-probability entry is never drawn
    target = u * ends[:, -1:]
    c = jnp.minimum(jnp.sum(ends < target, axis=-1), ends.shape[1] - 1)
    rest = target[:, 0] - (jnp.take_along_axis(ends, c[:, None], axis=1)[:, 0]
                           - jnp.take_along_axis(totals, c[:, None], axis=1)[:, 0])
    inside = jnp.take_along_axis(chunks, c[:, None, None], axis=1)[:, 0]  # [B, chunk]
    cdf = jnp.cumsum(inside, axis=-1)
    i = jnp.sum(cdf < rest[:, None], axis=-1)
    # `rest` is exact only up to an ulp: it can land a hair above the chunk's total or at/below zero.
    # Clamp to the chunk's first and last nonzero entries so a zero-probability id is never drawn.
    iota = jax.lax.broadcasted_iota(jnp.int32, inside.shape, 1)
    first = jnp.min(jnp.where(inside > 0, iota, chunk), axis=-1)
    last = jnp.max(jnp.where(inside > 0, iota, 0), axis=-1)
    return (c * chunk + jnp.clip(i, first, last)).astype(jnp.int32)


def select_tokens(logits: Array, key: Array | None, cfg: SamplingConfig, *, row_offset: Array | None = None,
                  total_rows: int = 0, uniforms: Array | None = None) -> tuple[Array, Array]:
    """logits f32[B, V] -> (tokens i32[B], log-probs f32[B] under softmax(logits / temperature)).
    row_offset / total_rows: the rows are rows [row_offset, row_offset + B) of a batch of total_rows rows
    (their draws are that batch's; see _row_uniforms). uniforms f32[B, 1]: each row's draw given instead of
    a key (continuous batching: rows at different steps, continuous.py)."""
    logits = logits.astype(jnp.float32)
    scaled = logits if cfg.temperature == 0.0 else logits / cfg.temperature
    top = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.exp(scaled - top)  # unnormalised softmax
    log_norm = top[:, 0] + jnp.log(jnp.sum(weights, axis=-1))
    if cfg.temperature == 0.0:
        tokens = first_argmax(scaled)
    else:
        if 0 < cfg.top_k < logits.shape[-1]:
            values, ids = top_k_candidates(scaled, cfg.top_k)
            weights = jnp.exp(values - top)
        else:
            ids = None
        if cfg.top_p < 1.0:
            weights = jnp.where(top_p_mask(weights, cfg.top_p), weights, 0.0)
        tokens = (inverse_cdf(weights, uniforms) if uniforms is not None
                  else _categorical(weights, key, row_offset, total_rows))
        if ids is not None:
            tokens = jnp.take_along_axis(ids, tokens[:, None], axis=-1)[:, 0]
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - log_norm
