"""KV-cache sampling: jitted prefill, then a `lax.while_loop` decode over a static, donated cache.

Prompts of different lengths share a batch left-padded to a common length P, so every row writes its
next key/value at the same cache slot (one dynamic_update_slice per layer, in place) while each row
keeps its own RoPE positions (slot - pad). The loop stops when every row has emitted an EOS id or
`max_new_tokens` is reached. Batch, prompt length and the new-token buffer are rounded up to buckets
so that steady-state calls reuse compiled code; the prompt bucket never exceeds the caller's
`max_prompt_len` (a refine prompt budget of 18432 stays 18432 instead of rounding to 24576).

Memory (Sampler.__call__): `max_rows` samples the rows in groups of at most that many rows, one static
cache of group size reused by every group; the cache is sharded over the batch axes (data, fsdp) where
they divide its rows (with several processes too: each process's devices sample their own rows), and over kv
heads on `tensor` where that divides them;
release() frees it. None of this changes a row's draws (only float rounding of another batch shape,
never the tokens in tests): a row's uniform for step i is element r of
uniform(fold_in(key, i), (R, 1)), R the whole call's padded row count and r its row index in the
whole call, whatever group the row is computed in (see token_selection._row_uniforms).

Token selection (logits -> token, top-k / top-p, the per-row uniforms) is token_selection.py's.

Outputs per row: `tokens` i32[N] (pad_id after the end), `logprobs` f32[N] and `length` (tokens
emitted, EOS included). `logprobs` are log-probabilities of the emitted token under the tempered,
unfiltered model distribution softmax(logits / temperature) (temperature 1 when greedy): the
distribution an importance ratio or a policy gradient refers to; top-k / top-p only restrict the
support sampled from.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from trd_jax import multihost
from trd_jax.models.transformer import KVCache, LayerCache, Transformer, init_cache
from trd_jax.sharding import BATCH_AXES
from trd_jax.shapes import bucket
from trd_jax.token_selection import SamplingConfig, select_tokens

log = logging.getLogger(__name__)
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ContinuousConfig:
    """Continuous batching (continuous.py) for a Sampler's plain calls: `slots` rows in flight (0: off), the stop
    check every `segment` steps; page_size > 0: a paged KV cache of pool_tokens tokens (0: enough for every slot's
    longest row), attention over blocks of block_pages pages."""

    slots: int = 0
    segment: int = 8
    page_size: int = 0
    pool_tokens: int = 0
    block_pages: int = 8

    def __post_init__(self):
        for name in ("slots", "page_size", "pool_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"ContinuousConfig.{name}={getattr(self, name)}: must be >= 0")
        if self.segment < 1 or self.block_pages < 1:
            raise ValueError(f"ContinuousConfig: segment={self.segment} and block_pages={self.block_pages} must "
                             "be >= 1")
        if (self.page_size or self.pool_tokens) and not self.slots:
            raise ValueError("ContinuousConfig: a paged cache (page_size, pool_tokens) needs slots > 0")
        if self.pool_tokens and not self.page_size:
            raise ValueError("ContinuousConfig.pool_tokens: set page_size too")


class SampleOutput(NamedTuple):
    tokens: Array  # i32[B, N]
    logprobs: Array  # f32[B, N]
    lengths: Array  # i32[B]
    # keep_hidden: the final-layer states that produced each token's distribution, [B, N, d] in the model's
    # dtype (what a full forward over prompt + tokens gives at those positions: the score phase reuses them).
    hidden: Array | None = None


# ------------------------------------------------------------------------------------------------
# Jitted steps


def is_eos(tok: Array, eos_ids: tuple[int, ...]) -> Array:
    """bool[B]: whether each token i32[B] is one of eos_ids (none when eos_ids is empty)."""
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    return jnp.any(tok[:, None] == eos[None, :], axis=-1)


def constrain_cache(cache: KVCache, sharding) -> KVCache:
    """The KV cache kept on `sharding` (None: left to the compiler), so that a loop carry keeps its layout."""
    return cache if sharding is None else jax.lax.with_sharding_constraint(cache, sharding)


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "cache_sharding"), donate_argnames=("cache",))
def prefill(graphdef, params, cache: KVCache, prompts: Array, pad: Array, *, n: int,
            cache_sharding=None) -> tuple[KVCache, Array, Array]:
    """Writes the prompts' keys and values into slots [0, P) of the donated cache (directly with n == 1 and
    blockwise attention; otherwise through a prompt-sized cache whose rows are repeated n times).

    prompts i32[B, P] left-padded, pad i32[B], cache [B*n, kv_heads, S, head_dim] -> (cache, logits
    f32[B*n, V] and final-layer state [B*n, d] of the last prompt position). Each prompt runs once; its
    keys and values are repeated for its n samples. Slots >= P keep stale values from earlier calls:
    decode overwrites each slot before any query can see it. cache_sharding: the cache's sharding, kept
    on the result (None: as the compiler propagates it).
    """
    model: Transformer = nnx.merge(graphdef, params)
    b, p = prompts.shape
    slots = jnp.arange(p)
    key_mask = slots[None, :] >= pad[:, None]
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)
    if n == 1 and model.cfg.blockwise_prefill:
        # Straight into the full cache: no prompt-sized copy. The prompt's queries never see slots >= P (causal),
        # and blockwise attention skips those key tiles, so attending "over S slots" costs nothing extra.
        full_mask = jnp.pad(key_mask, ((0, 0), (0, cache[0].k.shape[2] - p)), constant_values=True)
        hidden, cache = model(prompts, positions, full_mask, cache=cache, cache_index=0)
        return constrain_cache(cache, cache_sharding), model.logits(hidden[:, -1]), hidden[:, -1]
    hidden, prompt_cache = model(prompts, positions, key_mask, cache=init_cache(model.cfg, b, p), cache_index=0)
    logits = model.logits(hidden[:, -1])
    repeat = (lambda x: jnp.repeat(x, n, axis=0)) if n > 1 else (lambda x: x)

    def put(full, part):  # part [B, K, P, D] -> slots [0, P) of full [B*n, K, S, D]
        part = jnp.repeat(part, n, axis=0) if n > 1 else part
        return jax.lax.dynamic_update_slice(full, part.astype(full.dtype), (0, 0, 0, 0))

    cache = tuple(LayerCache(put(c.k, pc.k), put(c.v, pc.v)) for c, pc in zip(cache, prompt_cache))
    return constrain_cache(cache, cache_sharding), repeat(logits), repeat(hidden[:, -1])


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "buffer_len", "sampling", "eos_ids",
                                             "total_rows", "cache_sharding", "segment"),
                   donate_argnames=("cache",))
def decode(graphdef, params, cache: KVCache, logits: Array, pad: Array, key: Array, max_new_tokens: Array,
           pad_id: Array, live: Array | None = None, row_offset: Array | None = None,
           first_hidden: Array | None = None, budget: Array | None = None, *, prompt_len: int, buffer_len: int,
           sampling: SamplingConfig, eos_ids: tuple[int, ...], total_rows: int = 0,
           cache_sharding=None, segment: int = 1) -> tuple[SampleOutput, KVCache]:
    """Samples up to max_new_tokens (<= buffer_len) tokens per row after the prefilled cache; returns
    the outputs and the cache (donated in, handed back for the next call).

    live bool[B] (None: all): rows that are not live (batch padding) count as finished from the start,
    so that they never keep the loop running; they emit pad_id and length 0. row_offset i32[] with
    total_rows > 0: these B rows are rows [row_offset, row_offset + B) of a call of total_rows rows, and
    draw that call's numbers (select_tokens). first_hidden [B, d] (the prefill's last state): also return
    each token's final-layer state (SampleOutput.hidden). budget i32[B] (None: max_new_tokens for all): each
    row's most new tokens; a row that reaches its budget ends as at an EOS.

    segment: decode steps per loop iteration (the stop condition is checked between segments: on GPU a
    while-loop predicate is read by the host at every iteration). Steps past the stop run with every row
    finished: they write pad tokens into `segment` slack columns, cut off at the end, so the outputs are
    those of segment=1."""
    model: Transformer = nnx.merge(graphdef, params)
    b = logits.shape[0]
    cache_len = cache[0].k.shape[2]
    key_mask = jnp.arange(cache_len)[None, :] >= pad[:, None]  # left padding stays masked
    rows = dict(row_offset=row_offset, total_rows=total_rows) if total_rows else {}

    def emit(i, logits, done, tokens_buf, logp_buf, lengths):
        tok, logp = select_tokens(logits, jax.random.fold_in(key, i), sampling, **rows)
        tok = jnp.where(done, pad_id, tok)
        logp = jnp.where(done, 0.0, logp)
        tokens_buf = jax.lax.dynamic_update_slice(tokens_buf, tok[:, None], (0, i))
        logp_buf = jax.lax.dynamic_update_slice(logp_buf, logp[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_eos(tok, eos_ids)
        if budget is not None:
            done = done | (lengths >= budget)
        return tok, done, tokens_buf, logp_buf, lengths

    width = buffer_len + (segment - 1)  # slack columns for the steps of a segment past the stop
    tokens_buf = jnp.zeros((b, width), jnp.int32) + pad_id
    logp_buf = jnp.zeros((b, width), jnp.float32)
    done = jnp.zeros((b,), bool) if live is None else ~live
    tok, done, tokens_buf, logp_buf, lengths = emit(0, logits, done, tokens_buf, logp_buf, jnp.zeros((b,), jnp.int32))
    keep = first_hidden is not None
    hidden_buf = (jnp.zeros((b, width, first_hidden.shape[-1]), first_hidden.dtype).at[:, 0].set(first_hidden)
                  if keep else None)

    def cond(state):
        i, _, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, head, cache, tok, done, tokens_buf, logp_buf, lengths, hidden_buf = state
        done = done | (i >= max_new_tokens)  # a segment's steps past the budget: every row finished
        slot = prompt_len + i - 1  # where the token emitted at step i-1 goes
        positions = (slot - pad)[:, None]
        model_in = jnp.where(done, 0, tok)[:, None]  # finished rows emit pad_id; the model sees id 0
        hidden, cache = model(model_in, positions, key_mask, cache=cache, cache_index=slot)
        cache = constrain_cache(cache, cache_sharding)
        logits = model.logits(hidden[:, 0], head)
        if keep:  # rows that were done already keep writing: their slots are beyond their length, masked later
            hidden_buf = jax.lax.dynamic_update_slice(hidden_buf, hidden.astype(hidden_buf.dtype), (0, i, 0))
        tok, done, tokens_buf, logp_buf, lengths = emit(i, logits, done, tokens_buf, logp_buf, lengths)
        return i + 1, head, cache, tok, done, tokens_buf, logp_buf, lengths, hidden_buf

    body = step if segment == 1 else (lambda state: jax.lax.fori_loop(0, segment, lambda _, st: step(st), state))

    # The lm_head rides in the loop carry: a carried value has a fixed row-major layout, so a tied
    # embedding is transposed once here instead of being read transposed (twice as slow on CPU) each step.
    state = (jnp.int32(1), model.lm_head_weight(), cache, tok, done, tokens_buf, logp_buf, lengths, hidden_buf)
    _, _, cache, _, _, tokens_buf, logp_buf, lengths, hidden_buf = jax.lax.while_loop(cond, body, state)
    tokens_buf, logp_buf = tokens_buf[:, :buffer_len], logp_buf[:, :buffer_len]
    if keep:
        hidden_buf = jnp.where((jnp.arange(buffer_len)[None, :] < lengths[:, None])[..., None],
                               hidden_buf[:, :buffer_len], 0)
    return SampleOutput(tokens_buf, logp_buf, lengths, hidden_buf), cache


# ------------------------------------------------------------------------------------------------
# Host-side driver

_new_cache = jax.jit(init_cache, static_argnums=(0, 1, 2))  # zeros made on device, not copied from host


def row_groups(num_prompts: int, n: int, max_rows: int) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """How a call of num_prompts prompts x n samples runs in calls of at most max_rows rows (0: one call).

    Returns (batch, samples, groups): every call has `batch` prompt slots x `samples` samples per prompt,
    and each group is (first prompt, prompts, offset, rows): its prompts, the index of its first row among
    the whole call's rows (prompt i's sample s is row i * n + s) and how many of its leading rows are real
    (the rest is padding, discarded). One call: batch = bucket(num_prompts), as without groups. Groups:
    max_rows // n prompts per call (every call the same shape, so that one cache serves them all), or, with
    max_rows < n, one prompt and max_rows of its samples per call."""
    if max_rows <= 0 or num_prompts * n <= max_rows:
        return bucket(num_prompts), n, [(0, num_prompts, 0, num_prompts * n)]
    if max_rows >= n:
        per = max_rows // n
        return per, n, [(p, min(per, num_prompts - p), p * n, min(per, num_prompts - p) * n)
                        for p in range(0, num_prompts, per)]
    return 1, max_rows, [(i, 1, i * n + j, min(max_rows, n - j)) for i in range(num_prompts)
                         for j in range(0, n, max_rows)]


def cache_sharding(params, num_kv_heads: int, rows: int) -> NamedSharding | None:
    """The KV cache's sharding over the mesh that `params` lie on: rows over the batch axes (data, fsdp) when
    their product divides `rows`, kv heads over `tensor` when it divides them; None (the cache as the
    compiler places it, i.e. every device holding every row) when neither applies or the parameters carry
    no NamedSharding."""
    leaves = jax.tree.leaves(params)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sharding, NamedSharding):
        return None
    mesh = sharding.mesh
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    tensor = mesh.shape.get("tensor", 1)
    rows_axis = axes if shards > 1 and rows % shards == 0 else None
    heads_axis = "tensor" if tensor > 1 and num_kv_heads % tensor == 0 else None
    if rows_axis is None and heads_axis is None:
        return None
    return NamedSharding(mesh, P(rows_axis, heads_axis, None, None))


# A continuous call over key groups holds at most this many rows per slot (its outputs and draw table scale with
# its rows): an evaluation of thousands of rows runs as a few calls, each streaming its rows through the slots.
CONTINUOUS_CALL_ROWS_PER_SLOT = 16


def split_keys(key, key_groups, num_prompts: int) -> tuple[list, list[int]]:
    """(keys, group sizes) of a call's key_groups (None: one group of every prompt with `key`), checked: sizes >= 1
    summing to num_prompts, one key each; integer keys made PRNG keys."""
    sizes = [num_prompts] if key_groups is None else [int(g) for g in key_groups]
    keys = [key] if key_groups is None else ([] if isinstance(key, int) else list(key))
    if not sizes or min(sizes) < 1 or sum(sizes) != num_prompts or len(keys) != len(sizes):
        raise ValueError(f"key_groups: {len(sizes)} group sizes (each >= 1) summing to the {num_prompts} prompts, "
                         "with one key each")
    return [jax.random.key(k) if isinstance(k, int) else k for k in keys], sizes


def _concatenated(outs: list[SampleOutput], pad_id: int) -> SampleOutput:
    """The rows of several calls in order, tokens padded with pad_id (log-probs with 0) to the longest row."""
    width = max(o.tokens.shape[1] for o in outs)
    pad = lambda x, value: np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)  # noqa: E731
    return SampleOutput(np.concatenate([pad(np.asarray(o.tokens), pad_id) for o in outs]),
                        np.concatenate([pad(np.asarray(o.logprobs), 0.0) for o in outs]),
                        np.concatenate([np.asarray(o.lengths) for o in outs]))


class Sampler:
    """Compiles and runs generation for one model graph; parameters are passed per call so that a
    training loop can sample from its live weights without copies.

    shard_cache: shard the KV cache (cache_sharding) and place the prompts over the batch axes, on one or
    several processes; False leaves the placement to the compiler (every device holds the cache of every
    row)."""

    def __init__(self, graphdef, *, eos_ids: Sequence[int] = (), pad_id: int = 0, min_prompt_bucket: int = 16,
                 shard_cache: bool = True, continuous: ContinuousConfig = ContinuousConfig(),
                 decode_segment: int | None = None):
        self.graphdef = graphdef
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.min_prompt_bucket = min_prompt_bucket
        self.shard_cache = shard_cache
        self._shapes_seen: set = set()
        # The static KV cache, kept between calls (and row groups) of the same shape and donated through
        # prefill and decode, so that steady-state sampling allocates no cache. release() frees it.
        self._cache: KVCache | None = None
        self._cache_placement = None  # the sharding it was made with (None: _new_cache's default)
        self._cfg = None
        self._cache_fns: dict = {}  # sharding -> init_cache jitted with those out_shardings
        self.last_draft_stats: dict | None = None  # the last speculative call's passes, proposed, accepted
        # continuous.slots > 0: plain calls (no drafts, no kept states) go through continuous batching
        # (continuous.py): the same tokens, no slot idle while rows wait. last_continuous_stats: its counts.
        self.continuous = continuous
        self.last_continuous_stats: dict | None = None
        # Decode steps between stop checks (decode's `segment`): on GPU and TPU the check costs a host round trip
        # per loop iteration; on CPU it costs nothing and a segment only adds steps past the stop.
        self.decode_segment = (1 if jax.default_backend() == "cpu" else 8) if decode_segment is None else decode_segment

    def release(self) -> None:
        """Frees the cached KV buffers (e.g. before a memory-hungry update step on an accelerator)."""
        self._cache = None

    @property
    def holds_cache(self) -> bool:
        return self._cache is not None

    def _cache_for(self, cfg, rows: int, length: int, sharding=None) -> KVCache:
        cache, self._cache = self._cache, None
        if (cache is None or cache[0].k.shape != (rows, cfg.num_kv_heads, length, cfg.head_dim)
                or self._cache_placement != sharding):
            cache = None  # drop the old buffers before allocating new ones
            if sharding is None:
                cache = _new_cache(cfg, rows, length)
            else:
                if sharding not in self._cache_fns:
                    self._cache_fns[sharding] = jax.jit(init_cache, static_argnums=(0, 1, 2), out_shardings=sharding)
                cache = self._cache_fns[sharding](cfg, rows, length)
            self._cache_placement = sharding
        return cache

    def _in_calls(self, params, prompts, max_new_tokens: int, keys, sizes: list[int], runs: list[tuple[int, int]],
                  *, drafts, budgets, **kw) -> SampleOutput:
        """key_groups run as several calls, call c over groups runs[c] = [g0, g1) (one group: a plain call with
        its key), the outputs concatenated (tokens padded with pad_id to the longest row) and the draft
        statistics summed over the calls."""
        outs, stats, start = [], {}, 0
        for g0, g1 in runs:
            part = slice(start, start + sum(sizes[g0:g1]))
            grouping = dict(key=keys[g0]) if g1 - g0 == 1 else dict(key=keys[g0:g1], key_groups=sizes[g0:g1])
            self.last_draft_stats = None  # set again by a speculative call only
            outs.append(self(params, prompts[part], max_new_tokens, keep_hidden=False, **grouping,
                             drafts=None if drafts is None else drafts[part],
                             budgets=None if budgets is None else budgets[part], **kw))
            for name, value in (self.last_draft_stats or {}).items():
                stats[name] = stats.get(name, 0) + value
            start = part.stop
        if stats:
            self.last_draft_stats = stats
        return _concatenated(outs, self.pad_id)

    def _waves(self, sizes: list[int], n: int) -> list[tuple[int, int]]:
        """Consecutive runs of whole groups of at most CONTINUOUS_CALL_ROWS_PER_SLOT x slots rows each (a run of one
        group may hold more), so that a continuous call's outputs and draw table stay bounded."""
        limit, runs, g = CONTINUOUS_CALL_ROWS_PER_SLOT * self.continuous.slots, [], 0
        while g < len(sizes):
            end = g + 1
            while end < len(sizes) and sum(sizes[g:end + 1]) * n <= limit:
                end += 1
            runs.append((g, end))
            g = end
        return runs

    def __call__(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 sampling: SamplingConfig = SamplingConfig(), n: int = 1, key: Array | int = 0,
                 eos_ids: Sequence[int] | None = None, max_prompt_len: int | None = None,
                 max_rows: int = 0, drafts: Sequence[Sequence[int]] | None = None,
                 draft_tokens: int = 0, draft_mode: str = "aligned", keep_hidden: bool = False,
                 budgets: Sequence[int] | None = None, key_groups: Sequence[int] | None = None) -> SampleOutput:
        """prompts: token id lists of any lengths. Returns numpy arrays for len(prompts) * n rows, the
        n samples of prompt i in rows i*n .. i*n + n - 1, tokens cut to the longest row. eos_ids
        overrides the sampler's stop tokens for this call (an empty tuple: never stop early).

        max_prompt_len: the longest prompt the caller allows (a refine prompt budget, task.max_prompt_tokens):
        the prompt bucket, and so the cache, never exceeds it; a longer prompt is an error.
        max_rows: sample at most this many rows per compiled call (0: all at once), in groups (row_groups)
        that reuse one cache of max_rows rows. Every row draws the same random numbers as in one call over
        all rows (same key, see token_selection._row_uniforms): the same tokens as the one call, log-probs equal
        up to the backend's rounding on another batch shape (tests/test_sampler_memory.py). A cache
        sharded over the batch axes likewise (each device multiplies fewer rows; fsdp-sharded parameters are
        gathered instead of reduced in partial sums). max_rows=0 on one device is the code as before.

        drafts (one token list per prompt) with draft_tokens K > 0: speculative decoding (speculative.py),
        each pass verifying the next K tokens of the row's draft; greedy outputs equal plain decoding's,
        sampled ones are equal in distribution. The draft statistics of the call are in `last_draft_stats`.
        draft_mode "aligned": the draft follows the output from its start (refine's y_o); "lookup": prompt
        lookup, the draft (e.g. the prompt itself) searched for the last emitted tokens (speculative.py).

        keep_hidden: also return each token's final-layer state (SampleOutput.hidden, a device array
        [rows, width, d], zero past each row's length), the states a forward over prompt + tokens computes
        at those positions; one process only (the score phase reuses them, steps.score_from_hidden).

        budgets: each prompt's most new tokens (in [1, max_new_tokens]; None: max_new_tokens for all): a row
        that reaches its budget ends as at an EOS (not with drafts).

        key_groups: the prompts in consecutive groups of these sizes, `key` one key per group: the outputs are
        those of one call per group with its own key (an evaluation's chunks), concatenated. Continuous batching
        runs them in one call (all rows through its slots, each row drawing its group's numbers; calls of at most
        CONTINUOUS_CALL_ROWS_PER_SLOT x slots rows, whole groups); the static sampler runs the groups one after
        another."""
        eos_ids = self.eos_ids if eos_ids is None else tuple(int(e) for e in eos_ids)
        if not prompts:
            raise ValueError("prompts: empty batch")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if n < 1:
            raise ValueError(f"n={n}: must be >= 1")
        if max_rows < 0:
            raise ValueError(f"max_rows={max_rows}: must be >= 0 (0: all rows at once)")
        speculate = drafts is not None and draft_tokens > 0
        if budgets is not None:
            if len(budgets) != len(prompts) or min(budgets) < 1 or max(budgets) > max_new_tokens:
                raise ValueError(f"budgets: one per prompt, each in [1, max_new_tokens={max_new_tokens}]")
            if speculate:
                raise ValueError("budgets: not with speculative decoding (drafts)")
        if keep_hidden and multihost.multi_process():
            raise ValueError("keep_hidden: supported on one process only")
        if drafts is not None and len(drafts) != len(prompts):
            raise ValueError(f"drafts: {len(drafts)} drafts for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}]: empty prompt")
        # Speculation through the slots when the call has one key (the static sampler runs evaluation chunks' drafts).
        continuous = self.continuous.slots and not (speculate and key_groups is not None)
        if key_groups is not None:
            keys, key_groups = split_keys(key, key_groups, len(prompts))
            if keep_hidden:
                raise ValueError("key_groups: not with keep_hidden")
            runs = (self._waves(key_groups, n) if continuous
                    else [(g, g + 1) for g in range(len(key_groups))])  # the static sampler: a call per group
            if len(runs) > 1:
                return self._in_calls(params, prompts, max_new_tokens, keys, key_groups, runs, sampling=sampling,
                                      n=n, eos_ids=eos_ids, max_prompt_len=max_prompt_len, max_rows=max_rows,
                                      drafts=drafts, draft_tokens=draft_tokens, draft_mode=draft_mode,
                                      budgets=budgets)
            if not continuous:
                key = keys[0]
                key_groups = None
        if continuous:
            from trd_jax.continuous import generate  # noqa: PLC0415 - it imports this module

            self.last_continuous_stats = {}
            c = self.continuous
            out = generate(self.graphdef, params, prompts, max_new_tokens, slots=c.slots, page_size=c.page_size,
                           pool_tokens=c.pool_tokens, block_pages=c.block_pages,
                           sampling=sampling, n=n, key=key, key_groups=key_groups, eos_ids=eos_ids,
                           pad_id=self.pad_id, budgets=budgets,
                           segment=c.segment, min_prompt_bucket=self.min_prompt_bucket,
                           max_prompt_len=max_prompt_len, shard_cache=self.shard_cache, keep_hidden=keep_hidden,
                           drafts=drafts if speculate else None, draft_tokens=draft_tokens if speculate else 0,
                           draft_mode=draft_mode, stats=self.last_continuous_stats)
            if speculate:
                self.last_draft_stats = self.last_continuous_stats["draft"]
            return out
        longest = max(len(p) for p in prompts)
        plen = bucket(longest, self.min_prompt_bucket)
        if max_prompt_len is not None:
            if longest > max_prompt_len:
                i = next(i for i, p in enumerate(prompts) if len(p) > max_prompt_len)
                raise ValueError(f"prompts[{i}]: {len(prompts[i])} tokens exceed max_prompt_len={max_prompt_len}")
            plen = min(plen, max_prompt_len)
        buffer_len = bucket(max_new_tokens, 8)
        batch, samples, groups = row_groups(len(prompts), n, max_rows)
        if speculate:
            # One width per call shape (no recompiling as drafts' lengths vary): a draft token further than
            # the output buffer plus one pass could only serve a rewrite that deleted most of its draft.
            draft_width = buffer_len + draft_tokens
            if draft_mode == "lookup":  # the whole prompt (or draft) is searched
                draft_width = max(draft_width, bucket(max(len(d) for d in drafts), self.min_prompt_bucket))
        # Several groups: each draws its rows' numbers from the one call's table (bucket(prompts) * n rows).
        total_rows = bucket(len(prompts)) * n if len(groups) > 1 else 0
        rows_per_call = batch * samples
        if isinstance(key, int):
            key = jax.random.key(key)
        if self._cfg is None:  # the static model config, read once from the graph
            self._cfg = nnx.merge(self.graphdef, params).cfg
        cfg = self._cfg
        # The cache sharded over the batch axes (cache_sharding): each device samples its own rows. With several
        # processes every process holds the same prompts and key, and each becomes the part of a global array
        # its devices own; where the cache cannot be sharded, arrays replicated over the parameters' mesh
        # (every device samples the whole batch; the parameters stay sharded).
        multi = multihost.multi_process()
        sharding = cache_sharding(params, cfg.num_kv_heads, rows_per_call) if self.shard_cache else None
        replicated = multihost.replicated_like(params) if multi and sharding is None else None
        if replicated is not None:
            put_prompts = put_rows = put_one = lambda x: multihost.to_global(x, replicated)
        elif sharding is not None:
            mesh, rows_axis = sharding.mesh, sharding.spec[0]
            place = multihost.to_global if multi else jax.device_put
            shards = int(np.prod([mesh.shape[a] for a in rows_axis])) if rows_axis is not None else 1
            prompt_axis = rows_axis if shards > 1 and batch % shards == 0 else None
            put_prompts = lambda x: place(x, NamedSharding(mesh, P(prompt_axis, *([None] * (x.ndim - 1)))))
            put_rows = lambda x: place(x, NamedSharding(mesh, P(rows_axis)))
            put_one = lambda x: place(x, NamedSharding(mesh, P()))
        else:
            put_prompts = put_rows = put_one = jnp.asarray
        if replicated is not None or sharding is not None:
            key = put_one(key)
        shape = (batch, plen, buffer_len, samples, sampling, eos_ids)
        shape += (draft_width, draft_tokens, draft_mode) if speculate else ()
        if shape not in self._shapes_seen:
            # The first shape compiles by design; later ones mean the buckets did not absorb a change.
            (log.warning if self._shapes_seen else log.info)(
                "sampler: compiling for batch=%d prompt_len=%d buffer=%d n=%d %s eos=%s"
                + (" draft=%d draft_tokens=%d draft_mode=%s" if speculate else ""), *shape)
            self._shapes_seen.add(shape)
        max_new, pad_id = put_one(np.int32(max_new_tokens)), put_one(np.int32(self.pad_id))
        outs, stats = [], []
        for first, count, offset, keep in groups:
            # Padding fed to the model is id 0: pad_id may lie outside the vocabulary.
            tokens = np.zeros((batch, plen), np.int32)
            pad = np.full((batch,), plen - 1, np.int32)  # padding rows: a one-token prompt
            for i, p in enumerate(prompts[first:first + count]):
                tokens[i, plen - len(p):] = p
                pad[i] = plen - len(p)
            live = np.arange(rows_per_call) < keep
            cache = self._cache_for(cfg, rows_per_call, plen + buffer_len + (draft_tokens if speculate else 0),
                                    replicated or sharding)
            cache, logits, last_hidden = prefill(self.graphdef, params, cache, put_prompts(tokens), put_prompts(pad),
                                                 n=samples, cache_sharding=sharding)
            first_hidden = last_hidden if keep_hidden else None
            if speculate:
                from trd_jax.speculative import speculative_decode  # noqa: PLC0415 - it imports this module

                draft_ids = np.zeros((batch, draft_width), np.int32)
                draft_lengths = np.zeros((batch,), np.int32)
                for i, d in enumerate(drafts[first:first + count]):
                    d = list(d)[:draft_width]
                    draft_ids[i, :len(d)] = d
                    draft_lengths[i] = len(d)
                out, group_stats, self._cache = speculative_decode(
                    self.graphdef, params, cache, logits, put_rows(np.repeat(pad, samples)), key, max_new, pad_id,
                    put_rows(np.repeat(draft_ids, samples, axis=0)), put_rows(np.repeat(draft_lengths, samples)),
                    put_rows(live), put_one(np.int32(offset)), first_hidden, prompt_len=plen, buffer_len=buffer_len,
                    sampling=sampling, eos_ids=eos_ids, draft_tokens=draft_tokens, draft_mode=draft_mode,
                    cache_sharding=sharding)
                outs.append((out, keep))
                stats.append([multihost.to_host(x)[:keep] for x in group_stats])
                continue
            row_budget = None
            if budgets is not None:  # padding rows: 1 (they are finished from the start anyway)
                per_prompt = np.ones((batch,), np.int32)
                per_prompt[:count] = budgets[first:first + count]
                row_budget = put_rows(np.repeat(per_prompt, samples))
            out, self._cache = decode(self.graphdef, params, cache, logits, put_rows(np.repeat(pad, samples)), key,
                                      max_new, pad_id, put_rows(live),
                                      put_one(np.int32(offset)) if total_rows else None, first_hidden, row_budget,
                                      prompt_len=plen, buffer_len=buffer_len, sampling=sampling, eos_ids=eos_ids,
                                      total_rows=total_rows, cache_sharding=sharding, segment=self.decode_segment)
            outs.append((out, keep))
        if speculate:
            passes, proposed, accepted = (int(np.sum(np.concatenate(xs))) for xs in zip(*stats))
            self.last_draft_stats = dict(passes=passes, proposed=proposed, accepted=accepted)
        parts = [[multihost.to_host(x)[:keep] for x in out[:3]] for out, keep in outs]
        tokens, logprobs, lengths = (np.concatenate(xs) if len(xs) > 1 else xs[0] for xs in zip(*parts))
        width = max(int(lengths.max()), 1)
        hidden = None
        if keep_hidden:  # stays on the device: [rows, width, d] is the size of the score phase's output
            kept = [out.hidden[:keep, :width] for out, keep in outs]
            hidden = jnp.concatenate(kept) if len(kept) > 1 else kept[0]
        return SampleOutput(tokens[:, :width], logprobs[:, :width], lengths, hidden)
