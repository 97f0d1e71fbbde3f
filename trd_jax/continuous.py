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

Not yet: pages (the cache is slots x (P + N), sized by rows in flight, not tokens in flight), decode
attention that reads only a row's filled slots, speculative refine, keep_hidden, several processes; the Sampler
uses it only when asked (Sampler(continuous_slots=S), rollout.continuous_slots).
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

from trd_jax.models.transformer import KVCache, LayerCache, Transformer, init_cache
from trd_jax.sampling import (SampleOutput, SamplingConfig, cache_sharding, constrain_cache, is_eos,
                              select_tokens)
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


@functools.partial(jax.jit, static_argnames=("steps", "total_rows"))
def uniform_table(key: Array, *, steps: int, total_rows: int) -> Array:
    """f32[steps, total_rows]: row r's draw at step t is element [t, r], that of uniform(fold_in(key, t),
    (total_rows, 1)), the static sampler's (sampling._row_uniforms). Made once per call: a slot reads its
    row's number at its own step, whatever step the other slots are at."""
    return jax.vmap(lambda t: jax.random.uniform(jax.random.fold_in(key, t), (total_rows, 1))[:, 0])(
        jnp.arange(steps))


def _select(logits, table, steps, rows, sampling: SamplingConfig):
    if sampling.temperature == 0.0:
        return select_tokens(logits, None, sampling)
    at = (jnp.minimum(steps, table.shape[0] - 1), jnp.minimum(rows, table.shape[1] - 1))  # padding: clamped
    return select_tokens(logits, None, sampling, uniforms=table[at][:, None])


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_ids", "cache_sharding"),
                   donate_argnames=("state",))
def admit(graphdef, params, state: SlotState, prompts: Array, prompt_pad: Array, src: Array, rows: Array,
          budgets: Array, slots: Array, table: Array, *, sampling: SamplingConfig, eos_ids: tuple[int, ...],
          cache_sharding=None) -> SlotState:
    """Starts rows `rows` i32[A] (row a: prompt src[a] of prompts i32[U, P], left-padded by prompt_pad i32[U];
    budgets i32[A]) in slots i32[A]: one prefill per prompt (the n samples of a prompt share it, as in the
    static sampler), keys and values into the slots' cache rows, first token drawn and written. Padding
    entries carry slot S and row R_pad (scratch): their writes are dropped or land in the scratch row."""
    model: Transformer = nnx.merge(graphdef, params)
    u, p = prompts.shape
    positions_in = jnp.arange(p)
    key_mask = positions_in[None, :] >= prompt_pad[:, None]
    positions = jnp.maximum(positions_in[None, :] - prompt_pad[:, None], 0)
    hidden, prompt_cache = model(prompts, positions, key_mask, cache=init_cache(model.cfg, u, p), cache_index=0)
    logits = model.logits(hidden[:, -1])[src]
    pad = prompt_pad[src]

    def put(full, part):  # part [U, K, P, D] -> the slots' rows, slots [0, P); slot S (padding) dropped
        return full.at[slots, :, :p].set(part[src].astype(full.dtype), mode="drop")

    cache = constrain_cache(tuple(LayerCache(put(c.k, pc.k), put(c.v, pc.v))
                                  for c, pc in zip(state.cache, prompt_cache)), cache_sharding)
    zeros = jnp.zeros_like(rows)
    tok, logp = _select(logits, table, zeros, rows, sampling)
    done = is_eos(tok, eos_ids) | (budgets <= 1)
    set_slot = lambda field, value: field.at[slots].set(value, mode="drop")  # noqa: E731
    return SlotState(cache=cache, tok=set_slot(state.tok, tok), step=set_slot(state.step, jnp.ones_like(rows)),
                     row=set_slot(state.row, rows), pad=set_slot(state.pad, pad),
                     budget=set_slot(state.budget, budgets),
                     done=set_slot(state.done, done), tokens=state.tokens.at[rows, 0].set(tok),
                     logprobs=state.logprobs.at[rows, 0].set(logp), lengths=state.lengths.at[rows].set(1))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "prompt_len", "sampling", "eos_ids",
                                             "cache_sharding"), donate_argnames=("state",))
def decode_segment(graphdef, params, state: SlotState, table: Array, *, steps: int, prompt_len: int,
                   sampling: SamplingConfig, eos_ids: tuple[int, ...], cache_sharding=None) -> SlotState:
    """`steps` decode steps of every slot; a finished or free slot computes and writes nothing that is read
    (its outputs go to the scratch row)."""
    model: Transformer = nnx.merge(graphdef, params)
    cache_len = state.cache[0].k.shape[2]
    scratch = state.tokens.shape[0] - 1
    width = state.tokens.shape[1]

    def body(_, carry):
        st, head = carry
        active = ~st.done
        slot = jnp.minimum(prompt_len + st.step - 1, cache_len - 1)  # where the last token goes
        key_mask = jnp.arange(cache_len)[None, :] >= st.pad[:, None]
        model_in = jnp.where(active, st.tok, 0)[:, None]
        hidden, cache = model(model_in, (slot - st.pad)[:, None], key_mask, cache=st.cache, cache_index=slot)
        cache = constrain_cache(cache, cache_sharding)
        tok, logp = _select(model.logits(hidden[:, 0], head), table, st.step, st.row, sampling)
        out_row = jnp.where(active, st.row, scratch)
        at = jnp.minimum(st.step, width - 1)
        done = st.done | (active & (is_eos(tok, eos_ids) | (st.step + 1 >= st.budget)))
        st = st._replace(cache=cache, tok=jnp.where(active, tok, st.tok), step=st.step + active.astype(jnp.int32),
                         done=done, tokens=st.tokens.at[out_row, at].set(tok),
                         logprobs=st.logprobs.at[out_row, at].set(logp),
                         lengths=st.lengths.at[out_row].add(active.astype(jnp.int32)))
        return st, head

    # The lm_head rides in the carry, as in sampling.decode (a tied embedding transposed once).
    state, _ = jax.lax.fori_loop(0, steps, body, (state, model.lm_head_weight()))
    return state


@functools.partial(jax.jit, static_argnames=("cache_sharding",))
def compact(state: SlotState, keep: Array, *, cache_sharding=None) -> SlotState:  # no donation: shapes change
    """The state of slots `keep` i32[S'] only (S' < S: a smaller batch per step once few rows are left); the
    outputs by row are carried whole."""
    take = lambda x: x[keep]  # noqa: E731
    cache = constrain_cache(tuple(LayerCache(take(c.k), take(c.v)) for c in state.cache), cache_sharding)
    return state._replace(cache=cache, tok=take(state.tok), step=take(state.step), row=take(state.row),
                          pad=take(state.pad), budget=take(state.budget), done=take(state.done))


def _init_state(cfg, slots: int, cache_len: int, rows: int, width: int, pad_id: int, sharding=None) -> SlotState:
    scratch_rows = rows + 1
    return SlotState(cache=constrain_cache(init_cache(cfg, slots, cache_len), sharding),
                     tok=jnp.zeros((slots,), jnp.int32), step=jnp.zeros((slots,), jnp.int32),
                     row=jnp.full((slots,), rows, jnp.int32),
                     pad=jnp.zeros((slots,), jnp.int32), budget=jnp.ones((slots,), jnp.int32),
                     done=jnp.ones((slots,), bool), tokens=jnp.full((scratch_rows, width), pad_id, jnp.int32),
                     logprobs=jnp.zeros((scratch_rows, width), jnp.float32),
                     lengths=jnp.zeros((scratch_rows,), jnp.int32))


_new_state = jax.jit(_init_state, static_argnums=(0, 1, 2, 3, 4, 5, 6))  # the cache made on device, sharded


def generate(graphdef, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, slots: int,
             sampling: SamplingConfig = SamplingConfig(), n: int = 1,  # noqa: B008 (a frozen dataclass)
             key: Array | int = 0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, budgets: Sequence[int] | None = None,
             segment: int = 8, min_prompt_bucket: int = 16, max_prompt_len: int | None = None,
             shrink: bool = True, shard_cache: bool = True, stats: dict | None = None) -> SampleOutput:
    """The static sampler's call (Sampler.__call__: rows i*n .. i*n + n - 1 for prompt i, numpy outputs cut to
    the longest row), decoded through `slots` slots. budgets: each prompt's most new tokens (<= max_new_tokens;
    None: max_new_tokens for all). shrink: once every row is admitted and at most half the slots are busy,
    continue on fewer slots. shard_cache: the slots' cache sharded as the static sampler's
    (sampling.cache_sharding: slots over the batch axes where they divide them, kv heads over tensor); the
    smaller batches of the tail likewise where they divide. stats (a dict): filled with segments, admissions,
    prompts prefilled, slot-steps and compactions."""
    if not prompts:
        raise ValueError("prompts: empty batch")
    if slots < 1 or segment < 1:
        raise ValueError(f"slots={slots}, segment={segment}: both must be >= 1")
    if budgets is not None and (len(budgets) != len(prompts) or min(budgets) < 1 or max(budgets) > max_new_tokens):
        raise ValueError(f"budgets: one per prompt, each in [1, max_new_tokens={max_new_tokens}]")
    cfg = nnx.merge(graphdef, params).cfg
    longest = max(len(p) for p in prompts)
    plen = bucket(longest, min_prompt_bucket)
    if max_prompt_len is not None:
        if longest > max_prompt_len:
            raise ValueError(f"a prompt of {longest} tokens exceeds max_prompt_len={max_prompt_len}")
        plen = min(plen, max_prompt_len)
    width = bucket(max_new_tokens, 8)
    rows = len(prompts) * n
    total_rows = bucket(len(prompts)) * n  # the static sampler's row table: the same draws
    key = jax.random.key(key) if isinstance(key, int) else key
    eos_ids = tuple(int(e) for e in eos_ids)
    shard = (lambda size: cache_sharding(params, cfg.num_kv_heads, size)) if shard_cache else (lambda size: None)
    sharding = shard(slots)
    state = _new_state(cfg, slots, plen + width, rows, width, int(pad_id), sharding)
    table = (jnp.zeros((1, 1), jnp.float32) if sampling.temperature == 0.0
             else uniform_table(key, steps=width, total_rows=total_rows))
    waiting = deque(range(rows))
    free = list(range(slots))
    counts = {"segments": 0, "admissions": 0, "prefilled": 0, "slot_steps": 0, "compactions": 0}
    while True:
        take = min(len(free), len(waiting))
        if take:
            a = min(bucket(take), slots)
            admitted = [waiting.popleft() for _ in range(take)]
            unique = sorted({r // n for r in admitted})  # each prompt prefilled once for all its admitted samples
            u = min(bucket(len(unique)), a)
            tokens = np.zeros((u, plen), np.int32)
            prompt_pad = np.full((u,), plen - 1, np.int32)  # padding prompts: one token
            for j, i in enumerate(unique):
                tokens[j, plen - len(prompts[i]):] = prompts[i]
                prompt_pad[j] = plen - len(prompts[i])
            src, row_ids = np.zeros((a,), np.int32), np.full((a,), rows, np.int32)
            slot_ids, row_budgets = np.full((a,), slots, np.int32), np.ones((a,), np.int32)
            for j, r in enumerate(admitted):
                src[j], row_ids[j], slot_ids[j] = unique.index(r // n), r, free.pop(0)
                row_budgets[j] = max_new_tokens if budgets is None else budgets[r // n]
            state = admit(graphdef, params, state, tokens, prompt_pad, src, row_ids, row_budgets, slot_ids, table,
                          sampling=sampling, eos_ids=eos_ids, cache_sharding=sharding)
            counts["admissions"] += 1
            counts["prefilled"] += len(unique)
        done = np.asarray(state.done)
        if done.all() and not waiting:
            break
        state = decode_segment(graphdef, params, state, table, steps=segment, prompt_len=plen, sampling=sampling,
                               eos_ids=eos_ids, cache_sharding=sharding)
        counts["segments"] += 1
        counts["slot_steps"] += segment * len(state.done)
        done = np.asarray(state.done)  # the only host read of a segment: S booleans
        free = [s for s in range(len(done)) if done[s]]
        live = len(done) - len(free)
        if shrink and not waiting and 0 < live <= len(done) // 2:
            # Nothing left to admit and at most half the slots busy: the rest of the tail runs on half the slots
            # (or a quarter, ...: a step costs about its batch; halving keeps the compiled shapes few).
            size = len(done)
            while live <= size // 2:
                size //= 2
            keep = [s for s in range(len(done)) if not done[s]] + free[:size - live]
            sharding = shard(size)
            state = compact(state, jnp.asarray(keep, jnp.int32), cache_sharding=sharding)
            counts["compactions"] += 1
            free = []
    if stats is not None:
        stats.update(counts, cache_sharding=shard(slots))
    tokens, logprobs, lengths = (np.asarray(x)[:rows] for x in (state.tokens, state.logprobs, state.lengths))
    out_width = max(int(lengths.max()), 1)
    return SampleOutput(tokens[:, :out_width], logprobs[:, :out_width], lengths)
