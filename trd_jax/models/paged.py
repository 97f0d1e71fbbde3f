"""A paged KV cache and the attention that reads it (plain JAX: the reference path, and the one CPU runs).

The cache of a layer is a pool of fixed-size pages shared by all rows,

    k, v [pages, kv_heads, page_size, head_dim]

and each row owns the pages its page table lists: logical position j of row b lives in page
table[b, j // page_size] at offset j % page_size. A row's positions are contiguous from 0 (its prompt, with no
padding, then its tokens), so a cache is sized by the tokens in flight, not rows x the longest row, and a
finished row's pages go back to the pool (continuous.py allocates them on the host between segments).

Attention takes T queries per row, query t at logical position query_pos[b] + t, seeing every position <= its
own (causal; nothing else is masked, a row has no padding). It walks blocks of `block_pages` pages up to the
longest row's last position with an online softmax (FlashAttention's), gathering only those pages: a decode step
reads the filled part of the cache, not the whole of every row's maximum length. Table entries past a row's
length point anywhere (the allocator's scratch page): they are masked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Array = jax.Array
_MASKED = -1e30
_F32 = jnp.float32


class PagedLayerCache(NamedTuple):
    k: Array  # [pages, kv_heads, page_size, head_dim]
    v: Array  # [pages, kv_heads, page_size, head_dim]


@dataclasses.dataclass(frozen=True)
class PageShards:
    """The pool's pages and the rows over the mesh axes `batch` (their product: `count` parts, each row's pages in
    its own part, its table's ids local to it), kv heads over `heads` (None: whole)."""

    mesh: Mesh
    batch: tuple[str, ...]
    heads: str | None = None

    @property
    def count(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch)

    def spec(self) -> P:
        """Of a pool [pages, kv_heads, ...], keys / values [B, kv_heads, ...] and queries [B, kv_heads, ...]."""
        return P(self.batch, self.heads)

    def rows(self, x: Array) -> Array:
        """x [B, ...] kept split over the batch axes like its rows' pages: the whole decode step runs per shard,
        not only its attention."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(self.batch)))


def init_paged_cache(cfg, pages: int, page_size: int, dtype=None) -> tuple[PagedLayerCache, ...]:
    shape = (pages, cfg.num_kv_heads, page_size, cfg.head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    return tuple(PagedLayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def page_slots(table: Array, positions: Array, page_size: int, valid: Array | None = None) -> tuple[Array, Array]:
    """(page, offset) of logical positions i32[B, T] of each row, table i32[B, W]. valid bool[B, T]: where False,
    the page is out of range (-> dropped by a scatter with mode="drop")."""
    page = jnp.take_along_axis(table, jnp.clip(positions // page_size, 0, table.shape[1] - 1), axis=1)
    if valid is not None:
        page = jnp.where(valid, page, jnp.iinfo(jnp.int32).max)
    return page, positions % page_size


def write(cache: PagedLayerCache, k: Array, v: Array, table: Array, positions: Array,
          valid: Array | None = None) -> PagedLayerCache:
    """Keys and values [B, kv_heads, T, head_dim] of each row written at its logical positions i32[B, T]."""
    page, offset = page_slots(table, positions, cache.k.shape[2], valid)
    # Advanced indices on axes 0 and 2 around a slice: the indexed view is [B, T, kv_heads, head_dim].
    put = lambda pool, x: pool.at[page, :, offset].set(x.transpose(0, 2, 1, 3).astype(pool.dtype),  # noqa: E731
                                                       mode="drop")
    return PagedLayerCache(put(cache.k, k), put(cache.v, v))


def gather(cache: PagedLayerCache, table: Array) -> tuple[Array, Array]:
    """The pages of table i32[B, W] as contiguous keys and values [B, kv_heads, W * page_size, head_dim]."""
    def one(pool):
        x = pool[table]  # [B, W, K, page, D]
        b, w, kh, p, d = x.shape
        return x.transpose(0, 2, 1, 3, 4).reshape(b, kh, w * p, d)

    return one(cache.k), one(cache.v)


def paged_attention(q: Array, cache: PagedLayerCache, table: Array, query_pos: Array, *,
                    block_pages: int = 8) -> Array:
    """q [B, K, G, T, D] (grouped by kv head), table i32[B, W] (W a multiple of block_pages), query_pos i32[B]
    -> [B, K, G, T, D]. Only the blocks up to the longest row's last query position are read."""
    b, kh, g, t, d = q.shape
    page_size = cache.k.shape[2]
    width = table.shape[1]
    if width % block_pages:
        raise ValueError(f"page table width {width} is not a multiple of block_pages={block_pages}")
    block = block_pages * page_size
    scale = 1.0 / math.sqrt(d)
    acc_t = jnp.promote_types(q.dtype, _F32)
    query_at = query_pos[:, None] + jnp.arange(t)  # [B, T]
    blocks = jnp.minimum((jnp.max(query_at) // block) + 1, width // block_pages)

    def key_block(j, state):
        m, l, acc = state
        ids = jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages, axis=1)
        kj, vj = gather(cache, ids)  # [B, K, block, D]
        key_at = j * block + jnp.arange(block)
        allowed = (key_at[None, None, :] <= query_at[:, :, None])[:, None, None]  # [B, 1, 1, T, block]
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, kj.astype(q.dtype), preferred_element_type=acc_t) * scale
        scores = jnp.where(allowed, scores, _MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.where(allowed, jnp.exp(scores - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(q.dtype), vj.astype(q.dtype),
                                                       preferred_element_type=acc_t)
        return m_new, l * correction + p.sum(axis=-1), acc

    init = (jnp.full((b, kh, g, t), _MASKED, acc_t), jnp.zeros((b, kh, g, t), acc_t),
            jnp.zeros((b, kh, g, t, d), acc_t))
    _, l, acc = jax.lax.fori_loop(0, blocks, key_block, init)
    return (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)


def write_and_attend(q: Array, k: Array, v: Array, cache: PagedLayerCache, table: Array, query_pos: Array, *,
                     block_pages: int = 8, shards: PageShards | None = None) -> tuple[Array, PagedLayerCache]:
    """A step's keys and values k, v [B, kv_heads, T, head_dim] written at each row's logical positions query_pos
    i32[B] + t, then its queries q [B, K, G, T, D] attending: (attention out, the cache). shards: per batch
    shard, on its own rows and pages (table ids local to the shard's part of the pool)."""
    def local(q, k, v, pool_k, pool_v, table, query_pos):
        written = write(PagedLayerCache(pool_k, pool_v), k, v, table, query_pos[:, None] + jnp.arange(k.shape[2]))
        return paged_attention(q, written, table, query_pos, block_pages=block_pages), written.k, written.v

    if shards is None:
        out, pool_k, pool_v = local(q, k, v, cache.k, cache.v, table, query_pos)
    else:
        both, rows = shards.spec(), P(shards.batch)
        # Every value is local to its shard (nothing is reduced across them): the loop's carries need no
        # varying-axes bookkeeping.
        out, pool_k, pool_v = jax.shard_map(local, mesh=shards.mesh, in_specs=(both,) * 5 + (rows, rows),
                                            out_specs=(both, both, both), check_vma=False)(
            q, k, v, cache.k, cache.v, table, query_pos)
    return out, PagedLayerCache(pool_k, pool_v)
