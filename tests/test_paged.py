"""The paged KV cache (trd_jax/models/paged.py): writes land at the page and offset the table names, paged
attention equals softmax attention computed in numpy over each row's positions (causal, T >= 1 queries, rows of
different lengths, pages in any order, stale data in unlisted pages masked), and a model decoding through a
paged cache gives the hidden states of one through the contiguous cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trd_jax.models.config import ModelConfig
from trd_jax.models.paged import PagedLayerCache, gather, init_paged_cache, paged_attention, write
from trd_jax.models.transformer import Transformer

PAGE = 4


def _numpy_attention(q, k_rows, v_rows, query_pos):
    """q [B, K, G, T, D]; k_rows[b] [K, L_b, D]: row b's keys at logical positions 0..L_b-1."""
    b, kh, g, t, d = q.shape
    out = np.zeros(q.shape, np.float64)
    for r in range(b):
        for i in range(t):
            seen = query_pos[r] + i + 1
            s = np.einsum("kgd,ksd->kgs", q[r, :, :, i], k_rows[r][:, :seen]) / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[r, :, :, i] = np.einsum("kgs,ksd->kgd", p, v_rows[r][:, :seen])
    return out


@pytest.mark.parametrize("t,block_pages", [(1, 1), (1, 2), (3, 2)])
def test_paged_attention_against_numpy(t, block_pages):
    rng = np.random.default_rng(t + block_pages)
    b, kh, g, d, pages, width = 3, 2, 2, 8, 16, 4
    lengths = np.array([3, 14, 9])  # positions each row has, queries included
    query_pos = lengths - t
    pool_k = rng.normal(size=(pages, kh, PAGE, d)).astype(np.float32)  # every page full of stale values
    pool_v = rng.normal(size=(pages, kh, PAGE, d)).astype(np.float32)
    table = rng.permutation(pages - 1)[:b * width].reshape(b, width).astype(np.int32)  # pages in any order
    table[0, 1:] = pages - 1  # row 0 needs one page: the rest point at a scratch page
    q = rng.normal(size=(b, kh, g, t, d)).astype(np.float32)
    rows_k = [np.concatenate([pool_k[p] for p in table[r]], axis=1)[:, :lengths[r]] for r in range(b)]
    rows_v = [np.concatenate([pool_v[p] for p in table[r]], axis=1)[:, :lengths[r]] for r in range(b)]
    got = paged_attention(jnp.asarray(q), PagedLayerCache(jnp.asarray(pool_k), jnp.asarray(pool_v)),
                          jnp.asarray(table), jnp.asarray(query_pos, jnp.int32), block_pages=block_pages)
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, rows_k, rows_v, query_pos), atol=2e-5)


def test_write_puts_each_token_at_its_page_and_offset():
    cache = PagedLayerCache(jnp.zeros((6, 1, PAGE, 2)), jnp.zeros((6, 1, PAGE, 2)))
    table = jnp.asarray([[4, 1], [2, 5]], jnp.int32)
    k = jnp.arange(2 * 1 * 3 * 2, dtype=jnp.float32).reshape(2, 1, 3, 2) + 1
    positions = jnp.asarray([[2, 3, 4], [0, 1, 2]], jnp.int32)  # row 0 crosses into its second page
    out = write(cache, k, -k, table, positions)
    kk = np.asarray(out.k)
    np.testing.assert_array_equal(kk[4, 0, 2:4], np.asarray(k[0, 0, :2]))
    np.testing.assert_array_equal(kk[1, 0, 0], np.asarray(k[0, 0, 2]))
    np.testing.assert_array_equal(kk[2, 0, :3], np.asarray(k[1, 0]))
    np.testing.assert_array_equal(np.asarray(out.v), -kk)
    assert np.count_nonzero(kk[[0, 3, 5]]) == 0 and np.count_nonzero(kk[4, 0, :2]) == 0
    k_rows, _ = gather(out, table)  # [B, K, 2 * PAGE, D]: the rows as contiguous caches
    np.testing.assert_array_equal(np.asarray(k_rows[0, 0, 2:5]), np.asarray(k[0, 0]))


def test_a_model_decodes_through_pages_as_through_a_contiguous_cache():
    """Prefill two prompts of different lengths, then decode 6 tokens; the paged model (its rows' pages shuffled
    through the pool) gives, at every step, the hidden state of a plain causal forward over the whole row."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    lengths, steps = [5, 11], 6
    total = max(lengths) + steps
    tokens = rng.integers(1, 64, size=(2, total)).astype(np.int32)
    width = -(-total // PAGE)
    width += width % 2  # whole blocks of 2 pages
    table = jnp.asarray(rng.permutation(2 * width + 3)[:2 * width].reshape(2, width), jnp.int32)

    @functools.partial(jax.jit, static_argnames="block_pages")
    def paged_call(params, cache, inp, at, block_pages):
        positions = at[:, None] + jnp.arange(inp.shape[1])
        return nnx.merge(graphdef, params)(inp, positions, None, cache=cache, cache_index=at, page_table=table,
                                           block_pages=block_pages)

    full = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x, jnp.tile(jnp.arange(x.shape[1]), (2, 1)),
                                                                  jnp.ones(x.shape, bool))[0])
    ref = np.asarray(full(params, jnp.asarray(tokens)))  # [2, total, d]: causal, so position j sees 0..j
    # Prefill: each row's prompt at positions [0, L) (the shorter row's padding positions are overwritten later).
    prompt = np.where(np.arange(max(lengths))[None] < np.asarray(lengths)[:, None], tokens[:, :max(lengths)], 0)
    hidden, cache = paged_call(params, init_paged_cache(cfg, 2 * width + 3, PAGE), jnp.asarray(prompt),
                               jnp.zeros(2, jnp.int32), block_pages=1)
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(hidden[r, :n]), ref[r, :n], atol=1e-5)
    at = np.asarray(lengths, np.int32)
    for t in range(steps):  # row r's t-th input token at position L_r + t, both rows in one batch
        inp = jnp.asarray(tokens[np.arange(2), at][:, None])
        hidden, cache = paged_call(params, cache, inp, jnp.asarray(at), block_pages=2 if t % 2 else 1)
        np.testing.assert_allclose(np.asarray(hidden[:, 0]), ref[np.arange(2), at], atol=1e-5)
        at = at + 1


def test_table_width_must_be_whole_blocks():
    cache = PagedLayerCache(jnp.zeros((4, 1, PAGE, 2)), jnp.zeros((4, 1, PAGE, 2)))
    with pytest.raises(ValueError, match="block_pages"):
        paged_attention(jnp.zeros((1, 1, 1, 1, 2)), cache, jnp.zeros((1, 3), jnp.int32), jnp.zeros(1, jnp.int32),
                        block_pages=2)


def test_the_page_pool_grows_frees_and_renumbers_slots():
    from trd_jax.page_pool import PagePool

    pool = PagePool(pages=6, page_size=4, slots=3, table_width=3)  # 5 usable pages, page 5 is scratch
    assert (pool.table == 5).all() and pool.capacity == 5
    pool.grow(0, 9)  # 9 positions: 3 pages
    pool.grow(2, 3)
    assert pool.owned == [3, 0, 1] and pool.used() == 4 and pool.missing(2, 8) == 1 and pool.missing(0, 8) == 0
    owned = set(pool.table[0]) | {pool.table[2, 0]}
    assert len(owned) == 4 and 5 not in owned  # distinct pages, never the scratch one
    with pytest.raises(RuntimeError, match="slot 2 needs 2 pages, 1 free"):
        pool.grow(2, 12)
    pool.release(0)
    assert pool.used() == 1 and (pool.table[0] == 5).all() and pool.peak == 4
    pool.keep([2, 0])  # slot 2 becomes slot 0
    assert pool.owned == [1, 0] and pool.table.shape == (2, 3) and pool.table[0, 0] in owned
    with pytest.raises(ValueError, match="still owns pages"):
        pool.keep([1])
    with pytest.raises(ValueError, match="exceed the page table"):
        PagePool(pages=9, page_size=4, slots=1, table_width=2).grow(0, 9)


def test_a_pool_split_over_shards_keeps_each_slot_in_its_part():
    """PagePool(shards=2): slots 0-1 draw from part 0, slots 2-3 from part 1, each part with its own free list
    and scratch page (ids local to the part); compaction keeps every slot in its part."""
    from trd_jax.page_pool import PagePool

    pool = PagePool(pages=4, page_size=4, slots=4, table_width=3, shards=2)  # 3 usable pages a part, scratch 3
    assert pool.capacity == 3 and [pool.shard_of(s) for s in range(4)] == [0, 0, 1, 1]
    pool.grow(0, 12)  # part 0 full
    pool.grow(2, 5)
    assert pool.free(0) == 0 and pool.free(1) == 1 and pool.used() == 5
    assert sorted(pool.table[0]) == [0, 1, 2] and set(pool.table[2, :2]) <= {0, 1, 2}  # local ids in both parts
    with pytest.raises(RuntimeError, match="slot 1 needs 1 pages, 0 free"):
        pool.grow(1, 1)  # part 1 has a free page, but slot 1 lives in part 0
    pool.keep([0, 2])  # one slot a part: slot 2 becomes slot 1, still in part 1
    assert pool.shard_of(1) == 1 and pool.owned == [3, 2]
    pool.release(1)
    assert pool.free(1) == 3 and pool.free(0) == 0
    with pytest.raises(ValueError, match="leave their shards"):
        pool.keep([1, 0])
    with pytest.raises(ValueError, match="do not split"):
        PagePool(pages=4, page_size=4, slots=3, table_width=3, shards=2)


def test_admission_and_shrinking_respect_the_parts():
    """continuous.place: waiting rows in order into the part with the most free pages that has a free slot, until
    one fits nowhere; continuous.shrunk: every part halved alike, a slot staying in its part."""
    from trd_jax.continuous import place, shrunk
    from trd_jax.page_pool import PagePool

    pool = PagePool(pages=5, page_size=4, slots=4, table_width=4, shards=2)
    pool.grow(0, 8)  # part 0: 2 of 4 pages left, part 1: 4
    need = {10: 3, 11: 2, 12: 1, 13: 1}.get
    assert place([10, 11, 12, 13], [1, 2, 3], pool, need) == [(10, 2), (11, 1), (12, 3)]  # 13: no slot
    assert place([10, 13], [1], pool, need) == []  # row 10 fits in no part with a free slot: admission stops
    assert place([5, 6], [3, 1], None, need) == [(5, 3), (6, 1)]  # no pool: the free slots in their order
    assert shrunk([7, -1, -1, -1, -1, 8, -1, -1], 2) == [0, 5]  # each part of 4 down to its one busy slot
    assert shrunk([7, -1, -1, -1, 8, -1, 9, -1], 2) == [0, 1, 4, 6]  # down to 2 a part, part 0's filled up
    assert shrunk([7, -1, -1, -1, 8, 9, 6, -1], 2) is None  # part 1 is more than half busy: it cannot halve
    assert shrunk([-1, 7, -1, 5, -1, -1, -1, -1], 1) == [1, 3]  # one part of 8: down to 2
