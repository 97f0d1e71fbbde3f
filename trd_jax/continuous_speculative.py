"""Speculative decoding through continuous batching's slots (refine's draft: the row's own y_o; or prompt lookup).

Each segment runs `steps` passes of every slot: a pass feeds the slot's last token and the next K tokens of its
row's draft, verifies them with speculative.verify and commits 1 to K+1 tokens (speculative.py has the rule and
the draft alignment). Slots advance by different counts, as rows of the static speculative_decode do; a row's
pass p draws with fold_in(fold_in(key, p), row), the numbers the static speculative sampler draws for it, so a
row gets the same tokens whichever slot and segment verify it.

The slot state (continuous.SlotState) carries per slot the draft pointer `q` and the row's next pass index
`passes`, and per row the draft statistics `drafted` [R + 1, 3] (passes, proposed, accepted). Tokens written
past a pass's committed count (its rejected tail) land beyond the row's length: the next pass overwrites them
and the outputs are cut at each row's length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from trd_jax.models.transformer import Transformer
from trd_jax.sampling import constrain_cache
from trd_jax.speculative import draft_window, emitted_count, next_pointer, scale_logits, verify
from trd_jax.token_selection import SamplingConfig

Array = jax.Array


def pass_keys(key: Array, passes: Array, rows: Array) -> Array:
    """A key per slot: fold_in(fold_in(key, pass), row), speculative._row_keys' with each slot's own pass."""
    return jax.vmap(lambda p, r: jax.random.fold_in(jax.random.fold_in(key, p), r))(passes, rows)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "prompt_len", "sampling", "eos_ids",
                                             "draft_tokens", "draft_mode", "resync_window", "resync_context",
                                             "cache_sharding", "block_pages", "page_shards"),
                   donate_argnames=("state",))
def speculative_segment(graphdef, params, state, key: Array, drafts: Array, draft_lengths: Array,
                        pages: Array | None = None, *, steps: int, prompt_len: int, sampling: SamplingConfig,
                        eos_ids: tuple[int, ...], draft_tokens: int, draft_mode: str = "aligned",
                        resync_window: int = 16, resync_context: int = 2, cache_sharding=None,
                        block_pages: int = 8, page_shards=None):
    """`steps` speculative passes of every slot. drafts i32[R + 1, L] and draft_lengths i32[R + 1] by row (the
    scratch row R empty); the token buffers need K + 1 columns beyond the budget, a contiguous cache K slots beyond
    prompt + budget. pages: a paged cache's page table (each slot's pages covering its next segment's writes;
    page_shards: models/paged.PageShards, as decode_segment's)."""
    model: Transformer = nnx.merge(graphdef, params)
    k = draft_tokens
    cache_len = None if pages is not None else state.cache[0].k.shape[2]
    scratch = state.tokens.shape[0] - 1
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    j = jnp.arange(k + 1)

    def body(_, carry):
        st, head = carry
        active = ~st.done
        n = st.step  # tokens the slot's row has emitted; the last of them is the pass's first input
        row_drafts, row_lengths = drafts[st.row], draft_lengths[st.row]
        draft = draft_window(row_drafts, row_lengths, st.q, k)
        inputs = jnp.concatenate([jnp.where(active, st.tok, 0)[:, None], draft], axis=1)  # [S, K+1]
        if pages is None:
            slot = jnp.minimum(prompt_len + n - 1, cache_len - (k + 1))
            key_mask = jnp.arange(cache_len)[None, :] >= st.pad[:, None]
            hidden, cache = model(inputs, (slot - st.pad)[:, None] + j, key_mask, cache=st.cache, cache_index=slot)
        else:  # a finished or free slot at logical position 0 (its own first pages, or the scratch page)
            position = jnp.where(active, prompt_len - st.pad + n - 1, 0)
            hidden, cache = model(inputs, position[:, None] + j, None, cache=st.cache, cache_index=position,
                                  page_table=pages, block_pages=block_pages, page_shards=page_shards)
        cache = constrain_cache(cache, cache_sharding)
        scaled = scale_logits(model.logits(hidden, head), sampling)  # [S, K+1, V]
        uniforms = jax.vmap(lambda kk: jax.random.uniform(kk, (k + 1,)))(pass_keys(key, st.passes, st.row))
        accepted, emitted, logp = verify(scaled, draft, uniforms, sampling)
        own = jnp.take_along_axis(emitted, accepted[:, None], axis=1)[:, 0]
        count, hit_eos = emitted_count(emitted, accepted, eos)
        count = jnp.where(active, jnp.minimum(count, st.budget - n), 0)
        out_row = jnp.where(active, st.row, scratch)
        cols = n[:, None] + j  # within the buffers' width: n < budget, and K + 1 columns beyond it
        # A free slot's columns may lie past the buffers: dropped (its writes go to the scratch row anyway).
        tokens = st.tokens.at[out_row[:, None], cols].set(emitted, mode="drop")
        logprobs = st.logprobs.at[out_row[:, None], cols].set(logp, mode="drop")
        kept = (None if st.hidden is None
                else st.hidden.at[out_row[:, None], cols].set(hidden.astype(st.hidden.dtype), mode="drop"))
        new_n = n + count
        done = st.done | (active & (hit_eos | (new_n >= st.budget)))
        # The last resync_context emitted tokens, the teacher's own token last (-1 before the output's start).
        ends = (n + accepted)[:, None] - jnp.arange(resync_context - 1, -1, -1)[None, :]
        context = jnp.where(ends >= 0, jnp.take_along_axis(tokens[out_row], jnp.maximum(ends, 0), axis=1), -1)
        new_q = next_pointer(row_drafts, row_lengths, st.q, accepted, context, k=k, lookup=draft_mode == "lookup",
                             resync_window=resync_window)
        counted = jnp.stack([active, active * k, jnp.where(active, jnp.minimum(accepted, count), 0)], axis=-1)
        keep = lambda old, new: jnp.where(active, new, old)  # noqa: E731 - finished or free slots stay as they were
        st = st._replace(cache=cache, tok=keep(st.tok, own), step=new_n, q=keep(st.q, new_q),
                         passes=st.passes + active.astype(jnp.int32), done=done, tokens=tokens, logprobs=logprobs,
                         lengths=st.lengths.at[out_row].set(new_n), hidden=kept,
                         drafted=st.drafted.at[out_row].add(counted.astype(jnp.int32)))
        return st, head

    state, _ = jax.lax.fori_loop(0, steps, body, (state, model.lm_head_weight()))
    return state
