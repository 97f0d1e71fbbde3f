"""Attention kernels of the decoder: dense (materialises the scores) and blockwise (flash attention in plain
JAX, O(T) memory per head).

Both take queries grouped by the kv head they share and the mask as "query t sits at slot query_start + t and
sees key slot s iff s <= query_start + t and key_mask[b, s]" (causal by slot, padding anywhere):

    q f32|bf16[B, K, G, T, D]   k, v [B, K, S, D]   key_mask bool[B, S]   query_start i32[]  ->  [B, K, G, T, D]

Dense builds f32 scores [B, K, G, T, S]: at 8 x 40k tokens that is tens of GiB per layer, which is why the
refine prefill of a 16k-token recipe cannot use it. Blockwise (FlashAttention-2's algorithm) walks query
blocks, and per query block the key blocks it can see, with an online softmax: nothing larger than
[B, K, G, block_q, block_k] exists. Its custom VJP keeps only the output and a f32 log-sum-exp per query, and
recomputes the probabilities block by block in the backward pass, so the update step does not hold scores
either. Key blocks wholly in a query block's future are skipped (about half the work of causal attention).

It is written with lax loops, not a Pallas or cuDNN kernel, so one code path runs on CPU, GPU and TPU and is
differentiable; a fused kernel per backend would be faster but keeps the same memory.

"fused" (fused_attention) hands the forward without a cache (the update's and scoring's) to
jax.nn.dot_product_attention: cuDNN's flash attention on a GPU in bf16 / fp16, XLA's reference elsewhere
(the CPU path the tests compare). Those kernels take padding as per-row lengths of right-padded rows, while a
training row is [left padding | context | response | right padding]: each row's q, k, v are rotated left by its
left padding (its keys are one contiguous run, so it becomes right-padded, the causal order unchanged), attended
with query and key lengths, and the output rotated back; padding queries give zeros. Where it cannot run (a
cache: prefill; f32 on a GPU; TPU, whose Pallas splash kernel is not wired yet) the model uses blockwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array
_MASKED = -1e30  # finite, so that fully masked rows (padding queries) give a uniform softmax, not NaN
_F32 = jnp.float32


def dense_mask(key_mask: Array, query_start, num_queries: int) -> Array:
    """bool[B, T, S]: query t (slot query_start + t) sees slot s iff s <= its slot and key_mask[b, s].
    query_start: i32[] or, per row, i32[B]."""
    query_slot = jnp.asarray(query_start)[..., None] + jnp.arange(num_queries)  # [T] or [B, T]
    causal = jnp.arange(key_mask.shape[1]) <= query_slot[..., None]  # [T, S] or [B, T, S]
    return (causal if causal.ndim == 3 else causal[None]) & key_mask[:, None, :]


def dense_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """mask bool[B, T, S] (dense_mask). Fully masked rows average every slot's value (finite, never read)."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=_F32)
    scores = jnp.where(mask[:, None, None], scores * (1.0 / math.sqrt(q.shape[-1])), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v)


def blockwise_attention(q: Array, k: Array, v: Array, key_mask: Array, query_start, *, block_q: int = 512,
                        block_k: int = 512) -> Array:
    """Flash attention: the same result as dense_attention on every query that sees at least one slot (fully
    masked queries, i.e. padding, give zeros instead of dense's uniform average; nothing reads them)."""
    t, s = q.shape[3], k.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk  # padded to whole blocks; padded keys are masked out
    if tp != t:
        q = jnp.pad(q, [(0, 0)] * 3 + [(0, tp - t), (0, 0)])
    if sp != s:
        k = jnp.pad(k, [(0, 0), (0, 0), (0, sp - s), (0, 0)])
        v = jnp.pad(v, [(0, 0), (0, 0), (0, sp - s), (0, 0)])
        key_mask = jnp.pad(key_mask, [(0, 0), (0, sp - s)])
    out = _flash(q, k, v, key_mask, jnp.asarray(query_start, jnp.int32), bq, bk)
    return out[:, :, :, :t] if tp != t else out


def fused_backend_supports(dtype) -> bool:
    """Whether fused_attention runs here: cuDNN on a GPU takes bf16 / fp16 only; the CPU runs XLA's reference (the
    tests' path); on TPU the blockwise kernel stands in until Pallas splash attention is wired."""
    backend = jax.default_backend()
    if backend == "gpu":
        return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return backend == "cpu"


def fused_attention(q: Array, k: Array, v: Array, key_mask: Array) -> Array:
    """Self-attention without a cache (query t at slot t, T == S) through jax.nn.dot_product_attention, cuDNN on a
    GPU: q [B, K, G, T, D], k, v [B, K, T, D], key_mask bool[B, T] whose True entries are one contiguous run per
    row (a layout's left-padded context + right-padded response) -> [B, K, G, T, D], padding queries 0."""
    b, kh, g, t, d = q.shape
    if k.shape[2] != t or key_mask.shape != (b, t):
        raise ValueError(f"fused_attention: keys {k.shape} and key_mask {key_mask.shape} must cover the T={t} queries")
    lengths = jnp.sum(key_mask, axis=1, dtype=jnp.int32)
    first = jnp.argmax(key_mask, axis=1).astype(jnp.int32)  # the row's left padding (0 for an empty row)
    order = (jnp.arange(t)[None, :] + first[:, None]) % t  # rotated slot i holds original slot i + first
    rotate = jax.vmap(lambda x, idx: jnp.take(x, idx, axis=0))  # x [T, ...] per row
    q_r = rotate(q.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, d), order)  # heads h = kv * G + g
    k_r, v_r = (rotate(x.transpose(0, 2, 1, 3), order) for x in (k, v))  # [B, T, K, D]
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    out = jax.nn.dot_product_attention(q_r, k_r, v_r, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    back = (jnp.arange(t)[None, :] - first[:, None]) % t  # original slot j sits at rotated slot j - first
    out = jnp.where(key_mask[:, :, None, None], rotate(out, back), 0.0).astype(q.dtype)
    return out.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)


def _allowed(key_mask_block: Array, query_slots: Array, first_key_slot) -> Array:
    """bool[B, 1, 1, bq, bk]: the dense mask restricted to one (query block, key block) tile."""
    key_slots = first_key_slot + jnp.arange(key_mask_block.shape[1])
    causal = key_slots[None, :] <= query_slots[:, None]
    return (causal[None] & key_mask_block[:, None, :])[:, None, None]


def _key_blocks_seen(query_start, i, bq: int, bk: int, nk: int):
    """Key blocks [0, n) hold every slot query block i can see (its last query's slot and below)."""
    return jnp.minimum(nk, (query_start + (i + 1) * bq - 1) // bk + 1)


def _slice(x: Array, start, size: int, axis: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _forward(q, k, v, key_mask, query_start, bq: int, bk: int):
    b, kh, g, t, d = q.shape
    nq, nk = t // bq, k.shape[2] // bk
    scale = 1.0 / math.sqrt(d)
    acc_t = jnp.promote_types(q.dtype, _F32)  # accumulators: f32 (f64 under x64, for finite-difference tests)

    def query_block(i, carry):
        out, lse = carry
        qi = _slice(q, i * bq, bq, 3)
        query_slots = query_start + i * bq + jnp.arange(bq)

        def key_block(j, state):
            m, l, acc = state
            kj, vj = _slice(k, j * bk, bk, 2), _slice(v, j * bk, bk, 2)
            allowed = _allowed(_slice(key_mask, j * bk, bk, 1), query_slots, j * bk)
            scores = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=acc_t) * scale
            scores = jnp.where(allowed, scores, _MASKED)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.where(allowed, jnp.exp(scores - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            acc = acc * correction[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vj,
                                                           preferred_element_type=acc_t)
            return m_new, l * correction + p.sum(axis=-1), acc

        init = (jnp.full((b, kh, g, bq), _MASKED, acc_t), jnp.zeros((b, kh, g, bq), acc_t),
                jnp.zeros((b, kh, g, bq, d), acc_t))
        m, l, acc = jax.lax.fori_loop(0, _key_blocks_seen(query_start, i, bq, bk, nk), key_block, init)
        safe_l = jnp.where(l > 0, l, 1.0)  # l == 0: a padding query that sees no slot -> output 0
        out = jax.lax.dynamic_update_slice_in_dim(out, (acc / safe_l[..., None]).astype(q.dtype), i * bq, axis=3)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(safe_l), i * bq, axis=3)
        return out, lse

    return jax.lax.fori_loop(0, nq, query_block, (jnp.zeros_like(q), jnp.zeros((b, kh, g, t), acc_t)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, key_mask, query_start, bq: int, bk: int):
    return _forward(q, k, v, key_mask, query_start, bq, bk)[0]


def _flash_fwd(q, k, v, key_mask, query_start, bq, bk):
    out, lse = _forward(q, k, v, key_mask, query_start, bq, bk)
    return out, (q, k, v, key_mask, query_start, out, lse)


def _flash_bwd(bq, bk, residuals, d_out):
    """FlashAttention-2's backward: per key block, the query blocks that see it; probabilities recomputed from
    the saved log-sum-exp. dS = P * (dP - rowsum(dO * O))."""
    q, k, v, key_mask, query_start, out, lse = residuals
    b, kh, g, t, d = q.shape
    nq, nk = t // bq, k.shape[2] // bk
    scale = 1.0 / math.sqrt(d)
    acc_t = jnp.promote_types(q.dtype, _F32)
    delta = jnp.sum(d_out.astype(acc_t) * out.astype(acc_t), axis=-1)  # [B, K, G, T]

    def key_block(j, carry):
        dq, dk, dv = carry
        kj, vj = _slice(k, j * bk, bk, 2), _slice(v, j * bk, bk, 2)
        mask_j = _slice(key_mask, j * bk, bk, 1)

        def query_block(i, state):
            dq, dkj, dvj = state
            qi, doi = _slice(q, i * bq, bq, 3), _slice(d_out, i * bq, bq, 3)
            allowed = _allowed(mask_j, query_start + i * bq + jnp.arange(bq), j * bk)
            scores = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=acc_t) * scale
            p = jnp.where(allowed, jnp.exp(scores - _slice(lse, i * bq, bq, 3)[..., None]), 0.0)
            dvj = dvj + jnp.einsum("bkgts,bkgtd->bksd", p.astype(doi.dtype), doi, preferred_element_type=acc_t)
            dp = jnp.einsum("bkgtd,bksd->bkgts", doi, vj, preferred_element_type=acc_t)
            ds = (p * (dp - _slice(delta, i * bq, bq, 3)[..., None]) * scale).astype(q.dtype)
            dqi = _slice(dq, i * bq, bq, 3) + jnp.einsum("bkgts,bksd->bkgtd", ds, kj, preferred_element_type=acc_t)
            dkj = dkj + jnp.einsum("bkgts,bkgtd->bksd", ds, qi, preferred_element_type=acc_t)
            return jax.lax.dynamic_update_slice_in_dim(dq, dqi, i * bq, axis=3), dkj, dvj

        # Query blocks before the first that sees slot j * bk contribute nothing.
        first = jnp.clip((j * bk - query_start) // bq, 0, nq)
        zeros = jnp.zeros((b, kh, bk, d), acc_t)
        dq, dkj, dvj = jax.lax.fori_loop(first, nq, query_block, (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dkj, j * bk, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dvj, j * bk, axis=2)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, acc_t), jnp.zeros(k.shape, acc_t), jnp.zeros(v.shape, acc_t))
    dq, dk, dv = jax.lax.fori_loop(0, nk, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
