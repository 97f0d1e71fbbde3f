"""Continuous batching: every row of a call decoded through a fixed number of slots, a finished row's slot going
to the next waiting row, so that no slot idles while rows wait (the static sampler, sampling.py, runs a batch
until its longest row ends, and a long-tailed length mix leaves most of its row-steps padding).

The device runs segments of `segment` decode steps over all slots (jitted, the state donated), with no host
round trip inside a segment; between segments the host reads which slots are free (S booleans) and admits
waiting rows into them: one jitted prefill of the admitted prompts, their keys and values scattered into
their slots' cache rows, and their first token drawn.

Each slot keeps the static sampler's layout: its prompt left-padded to the call's prompt bucket P at slots
[0, P) of a cache row of length P + N, its t-th token written at slot P + t. A row's t-th token is drawn with
element r (its row in the call) of uniform(fold_in(key, t), (R, 1)), R = bucket(prompts) x n: exactly the
number the static sampler draws for it, so a row gets the same tokens whichever slot and segment decode it
(tests/test_continuous.py; log-probs equal up to the rounding of another batch shape).

With page_size > 0 the cache is paged (models/paged.py, page_pool.py): a pool of pages sized by the tokens in
flight, each row's prompt at logical positions [0, L) without the bucket's padding, pages allocated one segment
ahead and freed when the row ends, decode attention reading only up to the longest live row; a pool too small
for every live row's next segment preempts the latest admitted rows, which are decoded again to the same tokens.

Several processes (jax.distributed): every process runs the same host program over the same prompts and key, so
each makes the same admissions; host values enter the jitted steps as global arrays replicated over the
parameters' mesh (multihost.to_global) and the S booleans read per segment are all-gathered (multihost.to_host).

keep_hidden keeps each token's final-layer state as the static sampler does (refine's states for the score phase).

Speculative decoding (drafts with draft_tokens > 0: refine's y_o, or prompt lookup) runs through the slots too
(continuous_speculative.py), each row getting the static speculative sampler's tokens.

Where the batch axes' shards divide the slots, a paged pool is split over them (models/paged.PageShards,
page_pool.py): each shard's slots draw pages from its own part, and its devices decode only those slots.

Not yet: a Pallas (TPU) or fused GPU kernel for the paged attention; the Sampler
uses continuous batching only when asked (Sampler(continuous=ContinuousConfig(slots=S, ...)),
rollout.continuous_slots / kv_page_size / kv_pool_tokens; refine and the teacher's evaluation take the same).
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from typing import NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trd_jax import multihost
from trd_jax.models import paged
from trd_jax.models.transformer import KVCache, LayerCache, Transformer, init_cache
from trd_jax.models.paged import init_paged_cache
from trd_jax.page_pool import PagePool, pages_for as paged_pages
from trd_jax.sampling import SampleOutput, cache_sharding, constrain_cache, is_eos, split_keys
from trd_jax.continuous_speculative import speculative_segment
from trd_jax.speculative import first_pointer, first_token
from trd_jax.token_selection import SamplingConfig, select_tokens
from trd_jax.shapes import bucket

log = logging.getLogger(__name__)
Array = jax.Array


class SlotState(NamedTuple):
    cache: KVCache  # per layer [S, kv_heads, P + N, head_dim]
    tok: Array  # i32[S] the slot's last token: the input of its next step
    step: Array  # i32[S] tokens its row has emitted
    row: Array  # i32[S] its row in the call (R_pad: none)
    pad: Array  # i32[S] its prompt's left padding
    budget: Array  # i32[S] its row's most new tokens
    done: Array  # bool[S] finished or free
    tokens: Array  # i32[R_pad + 1, N] outputs by row; the last row is scratch for free slots
    logprobs: Array  # f32[R_pad + 1, N]
    lengths: Array  # i32[R_pad + 1]
    hidden: Array | None = None  # [R_pad + 1, N, d] (keep_hidden): the final-layer state that drew each token
    # Speculative decoding (continuous_speculative.py): each slot's draft pointer and its row's next pass, and
    # per row the draft statistics (passes, proposed, accepted).
    q: Array | None = None  # i32[S]
    passes: Array | None = None  # i32[S]
    drafted: Array | None = None  # i32[R_pad + 1, 3]


@functools.partial(jax.jit, static_argnames=("steps", "total_rows"))
def uniform_table(key: Array, *, steps: int, total_rows: int) -> Array:
    """f32[steps, total_rows]: row r's draw at step t is element [t, r], that of uniform(fold_in(key, t),
    (total_rows, 1)), the static sampler's (token_selection._row_uniforms). Made once per call: a slot reads its
    row's number at its own step, whatever step the other slots are at."""
    return jax.vmap(lambda t: jax.random.uniform(jax.random.fold_in(key, t), (total_rows, 1))[:, 0])(
        jnp.arange(steps))


def _select(logits, table, steps, rows, sampling: SamplingConfig):
    if sampling.temperature == 0.0:
        return select_tokens(logits, None, sampling)
    at = (jnp.minimum(steps, table.shape[0] - 1), jnp.minimum(rows, table.shape[1] - 1))  # padding: clamped
    return select_tokens(logits, None, sampling, uniforms=table[at][:, None])


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "cache_sharding", "draft_mode",
                                             "resync_context", "page_shards"), donate_argnames=("state",))
def admit(graphdef, params, state: SlotState, prompts: Array, prompt_pad: Array, src: Array, rows: Array,
          budgets: Array, slots: Array, table: Array, pages: Array | None = None, drafts: tuple | None = None, *,
          sampling: SamplingConfig, eos_ids: tuple[int, ...], cache_sharding=None, draft_mode: str = "aligned",
          resync_context: int = 2, page_shards: paged.PageShards | None = None) -> SlotState:
    """Starts rows `rows` i32[A] (row a: prompt src[a] of prompts i32[U, P], left-padded by prompt_pad i32[U];
    budgets i32[A]) in slots i32[A]: one prefill per prompt (the n samples of a prompt share it, as in the
    static sampler), keys and values into the slots' cache rows, first token drawn and written. Padding
    entries carry slot S and row R_pad (scratch): their writes are dropped or land in the scratch row.
    pages i32[S, W]: a paged cache's page table (the slots' pages already allocated): a row's prompt goes to its
    logical positions [0, L), without the bucket's padding (page_shards: the table's ids are local to the slot's
    shard's part of the pool; here, outside any shard_map, they become global). drafts (speculative decoding):
    (key, drafts by row, their lengths): the first token drawn as the static speculative sampler draws it, the
    draft pointers set."""
    model: Transformer = nnx.merge(graphdef, params)
    u, p = prompts.shape
    positions_in = jnp.arange(p)
    key_mask = positions_in[None, :] >= prompt_pad[:, None]
    positions = jnp.maximum(positions_in[None, :] - prompt_pad[:, None], 0)
    hidden, prompt_cache = model(prompts, positions, key_mask, cache=init_cache(model.cfg, u, p), cache_index=0)
    logits = model.logits(hidden[:, -1])[src]
    pad = prompt_pad[src]
    kept = None if state.hidden is None else state.hidden.at[rows, 0].set(hidden[:, -1][src].astype(state.hidden.dtype))

    if pages is None:
        def put(full, part):  # part [U, K, P, D] -> the slots' rows, slots [0, P); slot S (padding) dropped
            return full.at[slots, :, :p].set(part[src].astype(full.dtype), mode="drop")

        cache = tuple(LayerCache(put(c.k, pc.k), put(c.v, pc.v)) for c, pc in zip(state.cache, prompt_cache))
    else:
        logical = jnp.broadcast_to(positions_in, (len(slots), p))
        at = jnp.minimum(pad[:, None] + logical, p - 1)[:, None, :, None]  # where position j sits in the bucket
        valid = (logical < (p - pad)[:, None]) & (slots < pages.shape[0])[:, None]
        slot = jnp.minimum(slots, pages.shape[0] - 1)
        row_pages = pages[slot]
        if page_shards is not None:
            parts = page_shards.count
            row_pages = row_pages + (slot // (pages.shape[0] // parts) * (state.cache[0].k.shape[0] // parts))[:, None]
        unpad = lambda x: jnp.take_along_axis(x[src], at, axis=2)  # noqa: E731  [A, K, P, D], position-major
        cache = tuple(paged.write(c, unpad(pc.k), unpad(pc.v), row_pages, logical, valid)
                      for c, pc in zip(state.cache, prompt_cache))
    cache = constrain_cache(cache, cache_sharding)
    set_slot = lambda field, value: field.at[slots].set(value, mode="drop")  # noqa: E731
    speculative = {}
    if drafts is None:
        tok, logp = _select(logits, table, jnp.zeros_like(rows), rows, sampling)
    else:
        key, by_row, lengths = drafts
        tok, logp = first_token(logits, key, rows, sampling)
        q = first_pointer(by_row[rows], lengths[rows], tok, lookup=draft_mode == "lookup",
                          resync_context=resync_context)
        speculative = dict(q=set_slot(state.q, q), passes=set_slot(state.passes, jnp.ones_like(rows)),
                           drafted=state.drafted.at[rows].set(0))
    done = is_eos(tok, eos_ids) | (budgets <= 1)
    return SlotState(cache=cache, tok=set_slot(state.tok, tok), step=set_slot(state.step, jnp.ones_like(rows)),
                     row=set_slot(state.row, rows), pad=set_slot(state.pad, pad),
                     budget=set_slot(state.budget, budgets),
                     done=set_slot(state.done, done), tokens=state.tokens.at[rows, 0].set(tok),
                     logprobs=state.logprobs.at[rows, 0].set(logp), lengths=state.lengths.at[rows].set(1),
                     hidden=kept, **speculative)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "prompt_len", "sampling", "eos_ids",
                                             "cache_sharding", "block_pages", "page_shards"),
                   donate_argnames=("state",))
def decode_segment(graphdef, params, state: SlotState, table: Array, pages: Array | None = None, *, steps: int,
                   prompt_len: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], cache_sharding=None,
                   block_pages: int = 8, page_shards: paged.PageShards | None = None) -> SlotState:
    """`steps` decode steps of every slot; a finished or free slot computes and writes nothing that is read
    (its outputs go to the scratch row). pages i32[S, W]: a paged cache's page table, each slot's pages
    covering the positions it writes in this segment (attention reads blocks of block_pages pages; page_shards:
    each batch shard its own slots and part of the pool)."""
    model: Transformer = nnx.merge(graphdef, params)
    cache_len = None if pages is not None else state.cache[0].k.shape[2]
    scratch = state.tokens.shape[0] - 1
    width = state.tokens.shape[1]

    def body(_, carry):
        st, head = carry
        active = ~st.done
        model_in = jnp.where(active, st.tok, 0)[:, None]
        if pages is None:
            slot = jnp.minimum(prompt_len + st.step - 1, cache_len - 1)  # where the last token goes
            key_mask = jnp.arange(cache_len)[None, :] >= st.pad[:, None]
            hidden, cache = model(model_in, (slot - st.pad)[:, None], key_mask, cache=st.cache, cache_index=slot)
        else:  # the row's logical position: its prompt's length plus the tokens before this one. A finished or
            # free slot sits at 0 (its own first page, or the scratch page), so that attention reads only up to
            # the longest live row.
            position = jnp.where(active, prompt_len - st.pad + st.step - 1, 0)
            hidden, cache = model(model_in, position[:, None], None, cache=st.cache, cache_index=position,
                                  page_table=pages, block_pages=block_pages, page_shards=page_shards)
        cache = constrain_cache(cache, cache_sharding)
        tok, logp = _select(model.logits(hidden[:, 0], head), table, st.step, st.row, sampling)
        out_row = jnp.where(active, st.row, scratch)
        at = jnp.minimum(st.step, width - 1)
        done = st.done | (active & (is_eos(tok, eos_ids) | (st.step + 1 >= st.budget)))
        kept = None if st.hidden is None else st.hidden.at[out_row, at].set(hidden[:, 0].astype(st.hidden.dtype))
        st = st._replace(cache=cache, tok=jnp.where(active, tok, st.tok), step=st.step + active.astype(jnp.int32),
                         done=done, tokens=st.tokens.at[out_row, at].set(tok),
                         logprobs=st.logprobs.at[out_row, at].set(logp),
                         lengths=st.lengths.at[out_row].add(active.astype(jnp.int32)), hidden=kept)
        return st, head

    # The lm_head rides in the carry, as in sampling.decode (a tied embedding transposed once).
    state, _ = jax.lax.fori_loop(0, steps, body, (state, model.lm_head_weight()))
    return state


@functools.partial(jax.jit, static_argnames=("cache_sharding",))
def compact(state: SlotState, keep: Array, *, cache_sharding=None) -> SlotState:  # no donation: shapes change
    """The state of slots `keep` i32[S'] only (S' < S: a smaller batch per step once few rows are left); the
    outputs by row are carried whole."""
    take = lambda x: x[keep]  # noqa: E731
    # A paged state comes without its pool (generate keeps it aside: passing it through a jit without donation
    # would copy it); the host renumbers the page table.
    cache = (state.cache if not state.cache
             else constrain_cache(tuple(LayerCache(take(c.k), take(c.v)) for c in state.cache), cache_sharding))
    maybe = lambda x: None if x is None else take(x)  # noqa: E731
    return state._replace(cache=cache, tok=take(state.tok), step=take(state.step), row=take(state.row),
                          pad=take(state.pad), budget=take(state.budget), done=take(state.done), q=maybe(state.q),
                          passes=maybe(state.passes))


def _init_state(cfg, slots: int, cache_len: int, rows: int, width: int, pad_id: int, sharding=None,
                page_size: int = 0, keep_hidden: bool = False, speculative: bool = False) -> SlotState:
    """page_size > 0: a paged cache of cache_len pages (models/paged.py); else slots x cache_len. keep_hidden: a
    buffer for each row's final-layer states, in the model's compute dtype."""
    scratch_rows = rows + 1
    cache = init_paged_cache(cfg, cache_len, page_size) if page_size else init_cache(cfg, slots, cache_len)
    return SlotState(cache=constrain_cache(cache, sharding),
                     tok=jnp.zeros((slots,), jnp.int32), step=jnp.zeros((slots,), jnp.int32),
                     row=jnp.full((slots,), rows, jnp.int32),
                     pad=jnp.zeros((slots,), jnp.int32), budget=jnp.ones((slots,), jnp.int32),
                     done=jnp.ones((slots,), bool), tokens=jnp.full((scratch_rows, width), pad_id, jnp.int32),
                     logprobs=jnp.zeros((scratch_rows, width), jnp.float32),
                     lengths=jnp.zeros((scratch_rows,), jnp.int32),
                     hidden=(jnp.zeros((scratch_rows, width, cfg.hidden_size), jnp.dtype(cfg.dtype)) if keep_hidden
                             else None),
                     q=jnp.zeros((slots,), jnp.int32) if speculative else None,
                     passes=jnp.zeros((slots,), jnp.int32) if speculative else None,
                     drafted=jnp.zeros((scratch_rows, 3), jnp.int32) if speculative else None)


_new_state = jax.jit(_init_state, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9))  # the cache made on device, sharded


@functools.partial(jax.jit, static_argnames=("pad_id",), donate_argnames=("state",))
def evict(state: SlotState, slots: Array, *, pad_id: int) -> SlotState:
    """Slots i32[E] freed before their rows end (preempted: the page pool cannot hold every live row's next
    segment); their rows' outputs cleared, to be decoded again from the start."""
    rows = state.row[slots]
    return state._replace(done=state.done.at[slots].set(True), row=state.row.at[slots].set(state.tokens.shape[0] - 1),
                          tokens=state.tokens.at[rows].set(pad_id), logprobs=state.logprobs.at[rows].set(0.0),
                          lengths=state.lengths.at[rows].set(0),
                          hidden=None if state.hidden is None else state.hidden.at[rows].set(0),
                          drafted=None if state.drafted is None else state.drafted.at[rows].set(0))


@functools.partial(jax.jit, static_argnames=("rows", "width"))
def kept_states(hidden: Array, lengths: Array, *, rows: int, width: int) -> Array:
    """The kept states of the call's rows [rows, width, d], zero past each row's length: one output buffer beside
    the engine's (the memory planner counts two)."""
    inside = jnp.arange(width)[None, :] < lengths[:rows, None]
    return jnp.where(inside[..., None], hidden[:rows, :width], 0)


def pool_shards(params, num_kv_heads: int, slots: int) -> paged.PageShards | None:
    """How a paged pool splits over the mesh `params` lie on: its parts and the slots over the batch axes where
    their shards divide the slots (else None: the pool whole on every batch shard), kv heads over tensor."""
    placed = cache_sharding(params, num_kv_heads, slots)
    if placed is None or placed.spec[0] is None:
        return None
    batch = placed.spec[0]
    return paged.PageShards(placed.mesh, tuple(batch) if isinstance(batch, tuple) else (batch,), placed.spec[1])


def place(rows: list[int], free: list[int], pool: PagePool | None, need) -> list[tuple[int, int]]:
    """(row, slot) for the waiting `rows`, in order, into the `free` slots (their order): with a page pool, only
    as many as it holds for their prompt and first segment (need(row): pages), each into the shard whose part has
    the most free pages among those with a free slot; the first row that fits nowhere stops the admission."""
    if pool is None:
        return list(zip(rows, free))
    room = [pool.free(part) for part in range(pool.shards)]
    open_slots = [[s for s in free if pool.shard_of(s) == part] for part in range(pool.shards)]
    placed = []
    for r in rows:
        pages = need(r)
        fits = [part for part in range(pool.shards) if open_slots[part] and room[part] >= pages]
        if not fits:
            break
        part = max(fits, key=lambda p: room[p])
        room[part] -= pages
        placed.append((r, open_slots[part].pop(0)))
    return placed


def shrunk(slot_row: list[int], parts: int) -> list[int] | None:
    """The slots to keep when at most half of each part's slots (parts: the page pool's shards, else 1) hold a row
    (-1: free): the busy ones and free ones to fill, each part halved (or quartered, ...) alike and in place, so
    that a slot stays in its part; None if no part can halve."""
    per = len(slot_row) // parts
    busy = [[s for s in range(p * per, (p + 1) * per) if slot_row[s] >= 0] for p in range(parts)]
    most = max(map(len, busy))
    if most == 0 or most > per // 2:
        return None
    size = per
    while most <= size // 2:
        size //= 2
    return [s for p in range(parts)
            for s in busy[p] + [s for s in range(p * per, (p + 1) * per) if slot_row[s] < 0][:size - len(busy[p])]]


def call_slots(slots: int, rows: int) -> int:
    """The slots a call of `rows` rows uses: slots beyond its rows would only decode padding until the first
    shrink, so at most the rows, rounded up to a bucket size (8, 12, 16, 24, ...) so that calls of nearby sizes
    share compiled shapes. The memory planner sizes the slots with this too."""
    return min(slots, bucket(rows, 8))


def generate(graphdef, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, slots: int,
             sampling: SamplingConfig = SamplingConfig(), n: int = 1,  # noqa: B008 (a frozen dataclass)
             key: Array | int = 0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, budgets: Sequence[int] | None = None,
             segment: int = 8, min_prompt_bucket: int = 16, max_prompt_len: int | None = None,
             shrink: bool = True, shard_cache: bool = True, page_size: int = 0, pool_tokens: int = 0,
             block_pages: int = 8, key_groups: Sequence[int] | None = None, keep_hidden: bool = False,
             drafts: Sequence[Sequence[int]] | None = None, draft_tokens: int = 0, draft_mode: str = "aligned",
             stats: dict | None = None) -> SampleOutput:
    """The static sampler's call (Sampler.__call__: rows i*n .. i*n + n - 1 for prompt i, numpy outputs cut to
    the longest row), decoded through `slots` slots. budgets: each prompt's most new tokens (<= max_new_tokens;
    None: max_new_tokens for all). shrink: once every row is admitted and at most half the slots are busy,
    continue on fewer slots. shard_cache: the slots' cache sharded as the static sampler's
    (sampling.cache_sharding: slots over the batch axes where they divide them, kv heads over tensor); the
    smaller batches of the tail likewise where they divide.

    page_size > 0: a paged cache (models/paged.py) of pool_tokens tokens (0: slots x (prompt bucket + budget),
    enough that no row is ever preempted), in pages of page_size tokens; decode attention reads blocks of
    block_pages pages up to the longest live row. Pages are allocated one segment ahead and freed when a row
    ends; a pool too small for every live row's next segment preempts the latest admitted rows (decoded again
    later, to the same tokens). A paged cache shards kv heads over tensor, and where the batch axes' shards
    divide the slots, its pages and slots over them (models/paged.PageShards: each shard's slots draw pages from
    its own part of the pool, pool_tokens split evenly, and its devices decode only those slots). key_groups:
    the prompts in consecutive groups of these sizes, `key` a key per group; each group's rows draw what a static
    call over that group alone draws (Sampler's key_groups). stats (a dict): filled with segments, admissions,
    prompts prefilled, slot-steps, compactions, the slots used (at most the rows, bucketed), and with pages: the
    pool's pages (per batch shard where split), the most in use (all parts together), preemptions, page_shards.
    keep_hidden: also each token's final-layer state (SampleOutput.hidden, on the device, zero past each row's
    length), as the static sampler's.
    drafts (one per prompt) with draft_tokens K > 0: speculative decoding (continuous_speculative.py), the static
    speculative sampler's tokens row for row; stats then has "draft": passes, proposed and accepted draft tokens
    (not with budgets or key_groups)."""
    if not prompts:
        raise ValueError("prompts: empty batch")
    if slots < 1 or segment < 1:
        raise ValueError(f"slots={slots}, segment={segment}: both must be >= 1")
    if page_size < 0 or pool_tokens < 0 or block_pages < 1:
        raise ValueError(f"page_size={page_size}, pool_tokens={pool_tokens}, block_pages={block_pages}: "
                         "page_size and pool_tokens must be >= 0, block_pages >= 1")
    if budgets is not None and (len(budgets) != len(prompts) or min(budgets) < 1 or max(budgets) > max_new_tokens):
        raise ValueError(f"budgets: one per prompt, each in [1, max_new_tokens={max_new_tokens}]")
    speculate = drafts is not None and draft_tokens > 0
    if speculate and (budgets is not None or key_groups is not None or len(drafts) != len(prompts)):
        raise ValueError("drafts: one per prompt, and not with budgets or key_groups")
    cfg = nnx.merge(graphdef, params).cfg
    longest = max(len(p) for p in prompts)
    plen = bucket(longest, min_prompt_bucket)
    if max_prompt_len is not None:
        if longest > max_prompt_len:
            raise ValueError(f"a prompt of {longest} tokens exceeds max_prompt_len={max_prompt_len}")
        plen = min(plen, max_prompt_len)
    width = bucket(max_new_tokens, 8)
    rows = len(prompts) * n
    k = draft_tokens if speculate else 0
    # A speculative pass writes K + 1 tokens after a row's last: K + 1 more columns in the outputs, K more cache
    # positions (the static speculative sampler's too).
    buffer = width + (k + 1 if speculate else 0)
    slots = call_slots(slots, rows)
    keys, groups = split_keys(key, key_groups, len(prompts))
    # Several processes: host values (and arrays made on this process's default device) become global arrays
    # replicated over the parameters' mesh; one process: passed as they are, unchanged.
    replicated = multihost.replicated_like(params) if multihost.multi_process() else None
    put = (lambda x: x) if replicated is None else (lambda x: multihost.to_global(x, replicated))  # noqa: E731
    eos_ids = tuple(int(e) for e in eos_ids)
    budget_of = [max_new_tokens if budgets is None else budgets[r // n] for r in range(rows)]
    pool = page_shards = None
    if page_size:
        table_width = -(-paged_pages(plen + buffer, page_size) // block_pages) * block_pages
        page_shards = pool_shards(params, cfg.num_kv_heads, slots) if shard_cache else None
        parts = 1 if page_shards is None else page_shards.count
        total = (pool_tokens // page_size if pool_tokens
                 else min(slots, rows) * paged_pages(plen + width + k, page_size))
        pages = -(-total // parts) + 1  # per part, its scratch page included
        longest_row = max(paged_pages(len(prompts[r // n]) + budget_of[r] - 1, page_size) for r in range(rows))
        if pages - 1 < longest_row:
            raise ValueError(f"pool_tokens={pool_tokens}: {pages - 1} pages of {page_size}"
                             f"{f' per batch shard ({parts})' if parts > 1 else ''} cannot hold the longest row "
                             f"({longest_row} pages)")
        pool = PagePool(pages, page_size, slots, table_width, shards=parts)
        # kv heads over tensor; with page shards, the pool's parts over the batch axes too
        placed = cache_sharding(params, cfg.num_kv_heads, parts * pages if parts > 1 else 1) if shard_cache else None
        shard = lambda size: placed  # noqa: E731
        state = _new_state(cfg, slots, parts * pages, rows, buffer, int(pad_id), placed, page_size, keep_hidden,
                           speculate)
    else:
        shard = (lambda size: cache_sharding(params, cfg.num_kv_heads, size)) if shard_cache else (lambda size: None)
        state = _new_state(cfg, slots, plen + width + k, rows, buffer, int(pad_id), shard(slots), 0, keep_hidden,
                           speculate)
    state = jax.tree.map(lambda x: x if not x.is_fully_addressable else put(x), state)  # a global cache stays as placed
    sharding = shard(slots)
    if sampling.temperature == 0.0 or speculate:  # speculation draws from keys per pass and row
        table = jnp.zeros((1, 1), jnp.float32)
    else:  # each group's rows draw what a static call over the group alone draws (its own key and row table)
        table = jnp.concatenate([uniform_table(group_key, steps=width, total_rows=bucket(g) * n)[:, :g * n]
                                 for group_key, g in zip(keys, groups)], axis=1)
    table = put(table)
    page_table = (lambda: None) if page_size == 0 else (lambda: put(pool.table))  # noqa: E731
    spec = None
    if speculate:  # the drafts by row, cut as the static speculative sampler cuts them (its lookups span the width)
        draft_width = width + k
        if draft_mode == "lookup":
            draft_width = max(draft_width, bucket(max(len(d) for d in drafts), min_prompt_bucket))
        by_row = np.zeros((rows + 1, draft_width), np.int32)
        lengths_by_row = np.zeros((rows + 1,), np.int32)
        for r in range(rows):
            d = list(drafts[r // n])[:draft_width]
            by_row[r, :len(d)] = d
            lengths_by_row[r] = len(d)
        spec = tuple(map(put, (keys[0], by_row, lengths_by_row)))
    waiting = deque(range(rows))
    free = list(range(slots))
    slot_row = [-1] * slots  # host mirror: the row in each slot, its emitted tokens (an upper bound), admission order
    slot_step = [0] * slots
    admitted_at = [0] * slots
    counts = {"segments": 0, "admissions": 0, "prefilled": 0, "slot_steps": 0, "compactions": 0, "preemptions": 0}

    def covers(r: int, step: int) -> int:  # positions row r writes up to the end of a segment from `step`
        if speculate:  # up to K + 1 tokens a pass, and the last pass's rejected tail
            return len(prompts[r // n]) + min(step + segment * (k + 1), budget_of[r] + k) - 1
        return len(prompts[r // n]) + min(step + segment, budget_of[r]) - 1

    while True:
        if pool is not None:
            # Every live slot's pages for its next segment; preempt the latest admitted while its part of the pool
            # is short.
            for part in range(pool.shards):
                live = sorted((s for s in range(len(slot_row)) if slot_row[s] >= 0 and pool.shard_of(s) == part),
                              key=lambda s: admitted_at[s])
                while sum(pool.missing(s, covers(slot_row[s], slot_step[s])) for s in live) > pool.free(part):
                    victim = live.pop()
                    state = evict(state, put(np.asarray([victim], np.int32)), pad_id=int(pad_id))
                    pool.release(victim)
                    waiting.appendleft(slot_row[victim])
                    slot_row[victim] = -1
                    free.append(victim)
                    counts["preemptions"] += 1
                for s in live:
                    pool.grow(s, covers(slot_row[s], slot_step[s]))
        # a row is admitted only where the pool holds its prompt and first segment
        placements = place(list(waiting)[:len(free)], free, pool, lambda r: paged_pages(covers(r, 1), page_size))
        take = len(placements)
        if take:
            a = min(bucket(take), len(slot_row))
            admitted = [waiting.popleft() for _ in range(take)]
            unique = sorted({r // n for r in admitted})  # each prompt prefilled once for all its admitted samples
            u = min(bucket(len(unique)), a)
            tokens = np.zeros((u, plen), np.int32)
            prompt_pad = np.full((u,), plen - 1, np.int32)  # padding prompts: one token
            for j, i in enumerate(unique):
                tokens[j, plen - len(prompts[i]):] = prompts[i]
                prompt_pad[j] = plen - len(prompts[i])
            src, row_ids = np.zeros((a,), np.int32), np.full((a,), rows, np.int32)
            slot_ids, row_budgets = np.full((a,), len(slot_row), np.int32), np.ones((a,), np.int32)
            for j, (r, s) in enumerate(placements):
                free.remove(s)
                src[j], row_ids[j], slot_ids[j], row_budgets[j] = unique.index(r // n), r, s, budget_of[r]
                slot_row[s], slot_step[s], admitted_at[s] = r, 1, counts["admissions"]
                if pool is not None:
                    pool.grow(s, covers(r, 1))
            state = admit(graphdef, params, state, *map(put, (tokens, prompt_pad, src, row_ids, row_budgets, slot_ids)),
                          table, page_table(), spec, sampling=sampling, eos_ids=eos_ids, cache_sharding=sharding,
                          draft_mode=draft_mode, page_shards=page_shards)
            counts["admissions"] += 1
            counts["prefilled"] += len(unique)
        if all(r < 0 for r in slot_row) and not waiting:
            break
        if speculate:
            state = speculative_segment(graphdef, params, state, *spec, page_table(), steps=segment, prompt_len=plen,
                                        sampling=sampling, eos_ids=eos_ids, draft_tokens=k, draft_mode=draft_mode,
                                        cache_sharding=sharding, block_pages=block_pages, page_shards=page_shards)
        else:
            state = decode_segment(graphdef, params, state, table, page_table(), steps=segment,
                                   prompt_len=plen, sampling=sampling, eos_ids=eos_ids, cache_sharding=sharding,
                                   block_pages=block_pages, page_shards=page_shards)
        counts["segments"] += 1
        counts["slot_steps"] += segment * len(slot_row)
        done = multihost.to_host(state.done)  # the host reads of a segment: S booleans (speculative: S counts too)
        emitted = multihost.to_host(state.step) if speculate else None
        for s in range(len(slot_row)):
            if slot_row[s] >= 0:
                slot_step[s] = int(emitted[s]) if speculate else slot_step[s] + segment
                if done[s]:
                    slot_row[s] = -1
                    if pool is not None:
                        pool.release(s)
        free = [s for s in range(len(slot_row)) if slot_row[s] < 0]
        keep = shrunk(slot_row, 1 if pool is None else pool.shards) if shrink and not waiting else None
        if keep is not None:
            # Nothing left to admit and at most half the slots busy: the rest of the tail runs on half the slots
            # (or a quarter, ...: a step costs about its batch; halving keeps the compiled shapes few).
            size = len(keep)
            sharding = shard(size)
            kept_hidden = state.hidden  # by row, carried whole: set aside so that the jit does not copy it
            state = state._replace(hidden=None)
            if pool is not None:
                kept_pool = state.cache
                state = compact(state._replace(cache=()), put(np.asarray(keep, np.int32)), cache_sharding=sharding)
                state = state._replace(cache=kept_pool)
                pool.keep(keep)
            else:
                state = compact(state, put(np.asarray(keep, np.int32)), cache_sharding=sharding)
            state = state._replace(hidden=kept_hidden)
            slot_row, slot_step, admitted_at = ([x[s] for s in keep] for x in (slot_row, slot_step, admitted_at))
            counts["compactions"] += 1
            free = [s for s in range(len(slot_row)) if slot_row[s] < 0]
    if stats is not None:
        stats.update(counts, slots=slots, cache_sharding=shard(slots))
        if speculate:
            passes, proposed, accepted = (int(x) for x in multihost.to_host(state.drafted)[:rows].sum(0))
            stats["draft"] = dict(passes=passes, proposed=proposed, accepted=accepted)
        if pool is not None:
            stats.update(pages=pool.capacity, peak_pages=pool.peak, page_shards=pool.shards)
    tokens, logprobs, lengths = (multihost.to_host(x)[:rows] for x in (state.tokens, state.logprobs, state.lengths))
    out_width = max(int(lengths.max()), 1)
    inside = np.arange(tokens.shape[1])[None, :] < lengths[:, None]  # a speculative pass's rejected tail lies past it
    tokens, logprobs = np.where(inside, tokens, pad_id), np.where(inside, logprobs, 0.0)
    hidden = kept_states(state.hidden, state.lengths, rows=rows, width=out_width) if keep_hidden else None
    return SampleOutput(tokens[:, :out_width], logprobs[:, :out_width], lengths, hidden)
