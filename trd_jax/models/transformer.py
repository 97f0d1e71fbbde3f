"""One decoder-only transformer in Flax NNX for the Llama (SmolLM2 included), Mistral, Qwen2 and Qwen3
families: GQA, RoPE (with Llama-3 scaling), RMSNorm, SwiGLU, tied or untied embeddings, optional q/k/v
bias (Qwen2) and q/k RMSNorm (Qwen3).

Every parameter carries logical axis names (`out_sharding` metadata, never applied eagerly) from
{vocab, embed, heads, kv_heads, head_dim, mlp}; sharding.py maps them onto a device mesh. The projections
may carry LoRA adapters (models/lora.py), which `adapted` adds where a module has them.

One call signature serves training, scoring, prefill and decode:

    hidden, cache = model(tokens: i32[B, T], positions: i32[B, T], key_mask: bool[B, S],
                          cache=None | KVCache, cache_index=i32[] | i32[B])

Without a cache the keys are the T input positions (S == T). With a cache of length S, the new keys
and values are written at slots [cache_index, cache_index + T) and the queries attend over all S
slots. Either way query t sits at slot cache_index + t and sees slot s iff s <= cache_index + t and
key_mask[b, s]: causal by slot, padding masked by key_mask (left or right padding both work). A
per-row cache_index i32[B] (speculative decoding: rows advance by different counts) writes each row at
its own slot and always uses the dense kernel.

cfg.attention picks the kernel of every call with more than one query (models/attention.py): "dense" builds the
[B, T, S] mask and f32 scores; "blockwise" (flash attention) never does; "fused" runs jax.nn.dot_product_attention
(cuDNN on a GPU) without a cache and blockwise with one. Decode's single query is always dense.

Without a cache each layer runs under nnx.remat when cfg.remat is "full" or "dots" (``with_runtime``): the
update's backward pass then recomputes activations instead of keeping them. Forward-only calls (scoring)
lower to the same computation, since jax.checkpoint only acts under differentiation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trd_jax.models import attention, paged
from trd_jax.models.config import ModelConfig
from trd_jax.models.lora import adapted

Array = jax.Array


class Mask(NamedTuple):
    """Who sees whom: query t sits at slot query_start + t and sees slot s iff s <= query_start + t and
    key_mask[b, s]. `dense` is that as bool[B, T, S] for the dense kernel, None for the blockwise one."""

    key_mask: Array | None  # bool[B, S] (None with a paged cache: a row has no padding)
    query_start: Array  # i32[] (or i32[B] with the dense kernel or a paged cache)
    dense: Array | None
    page_table: Array | None = None  # i32[B, W]: a paged cache's pages of each row (models/paged.py)
    block_pages: int = 8  # pages per block of paged attention
    page_shards: paged.PageShards | None = None  # the pool and rows split over the batch axes


class LayerCache(NamedTuple):
    k: Array  # [B, kv_heads, S, head_dim]: slot axis third, so q·k and p·v are plain batched matmuls
    v: Array  # [B, kv_heads, S, head_dim]


KVCache = tuple[LayerCache, ...]  # or tuple[paged.PagedLayerCache, ...] with a page table


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, scale: float | None) -> nnx.Param:
    """scale=None: ones (norm weights); 0.0: zeros (biases); else normal(0, scale)."""
    if scale is None:
        value = jnp.ones(shape, dtype)
    elif scale == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """f32[head_dim // 2] rotary frequencies, float32 arithmetic as in the reference implementations."""
    d = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    inv = inv.astype(np.float32)
    if cfg.rope_llama3_scaling is not None:
        factor, lo, hi, orig = cfg.rope_llama3_scaling
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = orig / lo, orig / hi
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)  # long wavelengths: interpolate
        smooth = (orig / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, blended, scaled).astype(np.float32)
    return inv


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, N, D]; cos, sin: f32[B, T, D/2]. Rotates the two halves of D (the HF layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype):
        self.weight = _param(None, (dim,), (axis_name,), param_dtype, None)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd, std = jnp.dtype(cfg.param_dtype), 0.02
        self.cfg = cfg
        self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, std)
        self.k_proj = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, std)
        self.v_proj = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, std)
        self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, std)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pd, 0.0)
            self.k_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, 0.0)
            self.v_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, 0.0)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", pd)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", pd)

    def __call__(self, x, cos, sin, mask, cache: LayerCache | None, cache_index):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        b, t, _ = x.shape
        kvh, groups = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(dt))
        q, k, v = adapted(self, "q", x, q), adapted(self, "k", x, k), adapted(self, "v", x, v)  # LoRA, if any
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.transpose(0, 2, 1, 3)  # [B, kv_heads, T, hd]
        v = v.transpose(0, 2, 1, 3)
        # q grouped by the kv head it shares: head h = kv_head * groups + g (HF's repeat_kv order).
        q = q.reshape(b, t, kvh, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]
        if isinstance(cache, paged.PagedLayerCache):  # each row at its own logical positions, in its pages
            out, cache = paged.write_and_attend(q, k, v, cache, mask.page_table, mask.query_start,
                                                block_pages=mask.block_pages, shards=mask.page_shards)
        else:
            if cache is not None and jnp.ndim(cache_index) == 1:  # each row at its own slot
                put = jax.vmap(lambda full, part, i: jax.lax.dynamic_update_slice(full, part, (0, i, 0)))
                cache = LayerCache(put(cache.k, k.astype(cache.k.dtype), cache_index),
                                   put(cache.v, v.astype(cache.v.dtype), cache_index))
                k, v = cache.k.astype(dt), cache.v.astype(dt)
            elif cache is not None:
                at = (0, 0, cache_index, 0)
                cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at),
                                   jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at))
                k, v = cache.k.astype(dt), cache.v.astype(dt)
            out = self._attend(q, k, v, mask, cache)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, cfg.head_dim)
        return adapted(self, "o", out, jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(dt))), cache

    def _attend(self, q, k, v, mask, cache):
        """The kernel for a contiguous cache or none: dense (a mask given), fused (cuDNN, no cache), blockwise."""
        cfg = self.cfg
        if mask.dense is not None:
            return attention.dense_attention(q, k, v, mask.dense)
        if cfg.attention == "fused" and cache is None and attention.fused_backend_supports(jnp.dtype(cfg.dtype)):
            return attention.fused_attention(q, k, v, mask.key_mask)
        return attention.blockwise_attention(q, k, v, mask.key_mask, mask.query_start,
                                             block_q=cfg.attention_block, block_k=cfg.attention_block)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, m, pd = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
        self.gate_proj = _param(rngs, (d, m), ("embed", "mlp"), pd, 0.02)
        self.up_proj = _param(rngs, (d, m), ("embed", "mlp"), pd, 0.02)
        self.down_proj = _param(rngs, (m, d), ("mlp", "embed"), pd, 0.02)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        dt = self.dtype
        gate = jax.nn.silu(adapted(self, "gate", x, x @ self.gate_proj[...].astype(dt)))
        h = gate * adapted(self, "up", x, x @ self.up_proj[...].astype(dt))
        return adapted(self, "down", h, h @ self.down_proj[...].astype(dt))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pd)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pd)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, mask, cache, cache_index):
        a, cache = self.attn(self.input_norm(x), cos, sin, mask, cache, cache_index)
        x = x + a
        return x + self.mlp(self.post_attn_norm(x)), cache


def _layer_without_cache(layer: DecoderLayer, x, cos, sin, mask):
    return layer(x, cos, sin, mask, None, 0)[0]


# ModelConfig.remat -> the decoder layer under nnx.remat (jax.checkpoint): the backward pass recomputes what the
# policy does not save. "full" saves only the layer's inputs; "dots" also the outputs of matmuls without batch
# dimensions (the q/k/v/o and MLP projections), so attention (scores, softmax) and the elementwise ops are
# recomputed. prevent_cse keeps XLA from merging the recomputation back into the forward pass.
_REMAT_LAYER = {
    "full": nnx.remat(_layer_without_cache, prevent_cse=True),
    "dots": nnx.remat(_layer_without_cache, prevent_cse=True,
                      policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, 0.02)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, 0.02)

    def __call__(self, tokens: Array, positions: Array, key_mask: Array | None, *,
                 cache: KVCache | None = None, cache_index=0, page_table: Array | None = None,
                 block_pages: int = 8, page_shards: paged.PageShards | None = None) -> tuple[Array, KVCache | None]:
        """Returns the final-normed hidden states [B, T, hidden] and the updated cache (or None).
        With a paged cache (models/paged.py; page_table i32[B, W]): cache_index i32[B] is each row's logical
        position of its first input token, key_mask is unused, and attention reads the rows' pages."""
        dt = jnp.dtype(self.cfg.dtype)
        t = tokens.shape[1]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(self.cfg))
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if page_table is not None:
            if page_shards is not None:
                x = page_shards.rows(x)
            mask = Mask(None, cache_index, None, page_table, block_pages, page_shards)
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, c = layer(x, cos, sin, mask, cache[i], cache_index)
                new_cache.append(c)
            return self.final_norm(x), tuple(new_cache)
        blockwise = self.cfg.blockwise_prefill and t > 1 and cache_index.ndim == 0  # "fused" too (Attention picks)
        mask = Mask(key_mask, cache_index, None if blockwise else attention.dense_mask(key_mask, cache_index, t))
        if cache is None and self.cfg.remat != "none":  # training / scoring forward: remat each layer
            remat_layer = _REMAT_LAYER[self.cfg.remat]
            for layer in self.layers:
                x = remat_layer(layer, x, cos, sin, mask)
            return self.final_norm(x), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_index)
            new_cache.append(c)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    def lm_head_weight(self) -> Array:
        """[hidden, vocab] in the compute dtype (the transposed embedding when tied)."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_word_embeddings:
            return self.embed[...].astype(dt).T
        return self.lm_head[...].astype(dt)

    def logits(self, hidden: Array, head: Array | None = None) -> Array:
        """hidden [..., hidden] -> f32[..., vocab]. `head`: a precomputed lm_head_weight() (the decode
        loop materialises the tied embedding's transpose once rather than every step)."""
        head = self.lm_head_weight() if head is None else head
        return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)


def with_runtime(model: Transformer, **fields) -> Transformer:
    """`model` with the ModelConfig fields that say how it runs (remat, attention, attention_block) set, in place
    (the parameters are untouched; every module holding the config gets the new one) and returned. The config
    is part of the graph definition, so nnx.split gives a new jit static and the steps compile anew."""
    cfg = model.cfg.replace(**fields)  # validates
    if cfg == model.cfg:
        return model
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "cfg", None), ModelConfig):
            node.cfg = cfg
    return model


def init_for_tokenizer(tokenizer, *, seed: int, **fields) -> Transformer:
    """A randomly initialised model whose vocabulary, EOS and pad ids are the tokenizer's (anything with
    vocab_size, eos_id and pad_id); ``fields`` are the other ModelConfig fields."""
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                      **fields)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def causal_lm_positions(mask: Array) -> Array:
    """Positions of the valid tokens of each row (padding anywhere): cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
