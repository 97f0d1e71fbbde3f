"""Speculative decoding against a per-row draft (TRD's refine: the draft is the row's own y_o).

Each teacher pass feeds, per row, the last emitted token and the next `draft_tokens` draft tokens, and
verifies the draft with the teacher's own decoding rule:
- greedy: a draft token is accepted iff it is the argmax, so the output is plain greedy decoding's,
  token for token (up to the float rounding of a K+1-token forward against a 1-token one);
- sampling (temperature, top-k, top-p): draft token d is accepted with probability p(d) under the
  filtered teacher distribution p; at the first rejection the token is drawn from p with d removed and
  renormalised. Every emitted token is then distributed exactly as plain sampling's (for a
  deterministic draft: P(d) = p(d), P(x != d) = (1 - p(d)) p(x) / (1 - p(d)) = p(x)).
The pass emits the accepted prefix plus one token of the teacher's own (the resample at the rejection,
or a fresh draw after a fully accepted draft): 1 to K+1 tokens per row and pass.

Rows advance by different counts, so each row keeps its own cache slot (the model's per-row
cache_index); rejected tokens' keys and values lie beyond the row's committed end and are overwritten by
its next pass before any query can see them. Draft alignment: a row's draft pointer q advances over
accepted tokens and, after the teacher's own token, by one more (a substitution, the common edit: a wrong
number replaced). Only a pass that rejects the draft's very first token, the sign of a misaligned draft
(the rewrite inserted or deleted text), looks up the last `resync_context` (2) emitted tokens in the draft
and moves q just past their occurrence nearest to it (within `resync_window` tokens either way), keeping
q + 1 where they do not occur. Looking up after every rejection would jump to any recurring phrase in
repetitive text (digits, "Step 2: ", loops), misaligning a draft that was right. A draft that has run out
proposes id 0 and is rejected like any wrong guess: correctness never depends on the draft, only speed.

Prompt lookup (draft_mode="lookup", for rollouts and evaluation: the draft is the row's prompt, which is
not aligned with the output): the draft pointer is looked up after every pass that did not accept its whole
draft, as one past the latest occurrence of the last `resync_context` emitted tokens anywhere in the draft;
where they do not occur, the pass proposes nothing the teacher will take (as a draft that ran out). A pass
whose whole draft was accepted goes on along the prompt.

Random numbers: per pass and per row (its index in the whole call, `row_offset + b`), so a row's draws
do not depend on how rows are grouped or padded. They are not plain decoding's draws: sampled outputs are
equal in distribution, not draw for draw (tests/test_speculative.py tests both).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from trd_jax.models.transformer import KVCache, Transformer
from trd_jax.sampling import SampleOutput, constrain_cache
from trd_jax.token_selection import SamplingConfig, first_argmax, inverse_cdf, top_k_candidates, top_p_mask

Array = jax.Array


class DraftStats(NamedTuple):
    """Per row: teacher passes run, draft tokens proposed (K per pass) and accepted."""

    passes: Array  # i32[B]
    proposed: Array  # i32[B]
    accepted: Array  # i32[B]


def filtered_weights(scaled: Array, cfg: SamplingConfig) -> Array:
    """Unnormalised f32[N, V] of the distribution plain sampling draws from (select_tokens): softmax of
    the tempered logits `scaled`, restricted to the top-k candidates and the top-p nucleus."""
    n, v = scaled.shape
    top = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.exp(scaled - top)
    if 0 < cfg.top_k < v:
        values, ids = top_k_candidates(scaled, cfg.top_k)
        rows = jnp.broadcast_to(jnp.arange(n)[:, None], ids.shape)
        weights = jnp.zeros_like(weights).at[rows, ids].set(jnp.exp(values - top))
    if cfg.top_p < 1.0:
        weights = jnp.where(top_p_mask(weights, cfg.top_p), weights, 0.0)
    return weights


def _row_keys(key: Array, step: Array, row_ids: Array) -> Array:
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_ids)


def _resync(drafts: Array, draft_lengths: Array, q: Array, context: Array, window: int) -> Array:
    """The draft pointer after the teacher's own token where the draft expected draft[q]: one past the
    occurrence of `context` i32[B, m] (the last m emitted tokens, the teacher's token last; -1, before the
    output's start, matches anything) nearest to q (offsets -window..window, the nearest first, later before
    earlier), else q + 1."""
    offsets = jnp.asarray(sorted(range(-window, window + 1), key=lambda o: (abs(o), -o)), jnp.int32)
    at = q[:, None] + offsets[None, :]  # candidate positions of the teacher's token in the draft
    m, width = context.shape[1], drafts.shape[1]
    hit = (at >= 0) & (at < draft_lengths[:, None])
    for i in range(m):  # context[:, i] must sit at at - (m - 1 - i)
        where = at - (m - 1 - i)
        here = jnp.take_along_axis(drafts, jnp.clip(where, 0, width - 1), axis=1)
        wildcard = context[:, i:i + 1] == -1
        hit &= wildcard | ((where >= 0) & (here == context[:, i:i + 1]))
    first = jnp.argmax(hit, axis=1)  # the nearest hit (offsets are sorted by distance)
    return jnp.where(jnp.any(hit, axis=1), jnp.take_along_axis(at, first[:, None], axis=1)[:, 0], q) + 1


def _lookup(drafts: Array, draft_lengths: Array, context: Array, window: int) -> Array:
    """Prompt lookup: one past the latest occurrence of `context` [B, m] in each row's draft (searched from the
    draft's end); where it does not occur, length + 1: past the draft, which proposes nothing that is taken.
    A leading -1 in context matches anything."""
    return _resync(drafts, draft_lengths, draft_lengths, context, window)


def scale_logits(x: Array, sampling: SamplingConfig) -> Array:
    return x if sampling.temperature == 0.0 else x / sampling.temperature


def log_probs(scaled: Array, tokens: Array) -> Array:
    """log softmax(scaled)[tokens] over the last axis."""
    top = jnp.max(scaled, axis=-1)
    norm = top + jnp.log(jnp.sum(jnp.exp(scaled - top[..., None]), axis=-1))
    return jnp.take_along_axis(scaled, tokens[..., None], axis=-1)[..., 0] - norm


def draw(scaled: Array, uniforms: Array, exclude: Array, sampling: SamplingConfig) -> Array:
    """One token per row from [B, V] (greedy: the argmax); `exclude` i32[B] (-1: none) removed first."""
    if sampling.temperature == 0.0:
        return first_argmax(scaled)
    weights = filtered_weights(scaled, sampling)
    weights = jnp.where(jnp.arange(scaled.shape[-1])[None, :] == exclude[:, None], 0.0, weights)
    return inverse_cdf(weights, uniforms)


def first_token(logits: Array, key: Array, row_ids: Array, sampling: SamplingConfig) -> tuple[Array, Array]:
    """The first token of each row (from the prefill's logits [B, V]) and its log-prob: pass 0's draw."""
    u0 = jax.vmap(lambda kk: jax.random.uniform(kk, (1,)))(_row_keys(key, 0, row_ids))
    scaled0 = scale_logits(logits.astype(jnp.float32), sampling)
    first = draw(scaled0, u0, jnp.full((logits.shape[0],), -1, jnp.int32), sampling)
    return first, log_probs(scaled0, first)


def draft_window(drafts: Array, draft_lengths: Array, q: Array, k: int) -> Array:
    """The k draft tokens from each row's pointer q (id 0 past the draft's end)."""
    at = q[:, None] + jnp.arange(k)
    draft = jnp.take_along_axis(drafts, jnp.clip(at, 0, drafts.shape[1] - 1), axis=1)
    return jnp.where(at < draft_lengths[:, None], draft, 0)


def verify(scaled: Array, draft: Array, uniforms: Array, sampling: SamplingConfig) -> tuple[Array, Array, Array]:
    """One pass's verdict: scaled [B, K+1, V] (tempered logits after the last token and each draft token),
    draft i32[B, K], uniforms [B, K+1] -> (accepted i32[B] in [0, K], emitted i32[B, K+1]: the accepted prefix
    then the teacher's own token, its log-probs f32[B, K+1])."""
    b, k = draft.shape
    if sampling.temperature == 0.0:
        ok = first_argmax(scaled[:, :k]) == draft
    else:
        vocab = scaled.shape[-1]
        weights = filtered_weights(scaled[:, :k].reshape(b * k, vocab), sampling).reshape(b, k, vocab)
        p_draft = jnp.take_along_axis(weights, draft[..., None], axis=-1)[..., 0] / jnp.sum(weights, axis=-1)
        ok = uniforms[:, :k] < p_draft
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B] in [0, K]
    at_reject = jnp.take_along_axis(scaled, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
    padded = jnp.pad(draft, ((0, 0), (0, 1)))
    rejected = jnp.where(accepted < k, jnp.take_along_axis(padded, accepted[:, None], axis=1)[:, 0], -1)
    own = draw(at_reject, uniforms[:, k:], rejected, sampling)
    emitted = jnp.where(jnp.arange(k + 1)[None, :] < accepted[:, None], padded, own[:, None])
    return accepted, emitted, log_probs(scaled, emitted)


def emitted_count(emitted: Array, accepted: Array, eos: Array) -> tuple[Array, Array]:
    """(tokens a pass emits: the accepted prefix and the teacher's token, cut after an EOS; whether it ended
    with an EOS), before the budget."""
    j = jnp.arange(emitted.shape[1])[None, :]
    is_eos = jnp.any(emitted[..., None] == eos[None, None, :], axis=-1) & (j <= accepted[:, None])
    hit = jnp.any(is_eos, axis=1)
    return jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, accepted + 1), hit


def next_pointer(drafts: Array, draft_lengths: Array, q: Array, accepted: Array, context: Array, *, k: int,
                 lookup: bool, resync_window: int) -> Array:
    """The draft pointer after a pass (module docstring: draft alignment); context [B, m]: the last m emitted
    tokens, the teacher's own last (-1 before the output's start)."""
    if lookup:
        return jnp.where(accepted == k, q + k + 1, _lookup(drafts, draft_lengths, context, drafts.shape[1]))
    # A pass that rejected the draft's very first token is the sign of a misaligned draft (an insertion or
    # deletion): look the context up. Otherwise the edit is taken for a substitution, the common case (a lookup
    # then would jump to any recurring phrase in repetitive text).
    looked_up = _resync(drafts, draft_lengths, q + accepted, context, resync_window)
    return jnp.where(accepted == 0, looked_up, q + accepted + 1)


def first_pointer(drafts: Array, draft_lengths: Array, first: Array, *, lookup: bool, resync_context: int) -> Array:
    """The draft pointer after the first token: 1 for an aligned draft (the first token matched draft[0] or
    replaced it), the lookup of the first token for prompt lookup."""
    if not lookup:
        return jnp.ones_like(first)
    context0 = jnp.concatenate([jnp.full((first.shape[0], resync_context - 1), -1, jnp.int32), first[:, None]],
                               axis=1)
    return _lookup(drafts, draft_lengths, context0, drafts.shape[1])


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "buffer_len", "sampling", "eos_ids",
                                             "draft_tokens", "resync_window", "resync_context",
                                             "draft_mode", "cache_sharding"),
                   donate_argnames=("cache",))
def speculative_decode(graphdef, params, cache: KVCache, logits: Array, pad: Array, key: Array,
                       max_new_tokens: Array, pad_id: Array, drafts: Array, draft_lengths: Array,
                       live: Array | None = None, row_offset: Array | None = None,
                       first_hidden: Array | None = None, *, prompt_len: int,
                       buffer_len: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], draft_tokens: int,
                       resync_window: int = 16, resync_context: int = 2, draft_mode: str = "aligned",
                       cache_sharding=None) -> tuple[SampleOutput, DraftStats, KVCache]:
    """decode() with a draft per row: drafts i32[B, L] (any ids, L >= 1), draft_lengths i32[B]. The cache
    needs buffer_len + draft_tokens slots after the prompt. Returns the outputs (as decode's, with each
    emitted token's final-layer state when first_hidden is given), the draft statistics per row, and the
    cache. draft_mode: "aligned" (the draft follows the output from its start: refine's y_o) or "lookup"
    (prompt lookup: the draft pointer found by the last emitted tokens)."""
    if draft_mode not in ("aligned", "lookup"):
        raise ValueError(f"draft_mode={draft_mode!r}: must be aligned or lookup")
    lookup = draft_mode == "lookup"
    model: Transformer = nnx.merge(graphdef, params)
    b, k = logits.shape[0], draft_tokens
    cache_len = cache[0].k.shape[2]
    key_mask = jnp.arange(cache_len)[None, :] >= pad[:, None]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    row_ids = (jnp.int32(0) if row_offset is None else row_offset) + jnp.arange(b, dtype=jnp.int32)
    # The first token, from the prefill's logits.
    done = jnp.zeros((b,), bool) if live is None else ~live
    first, first_logp = first_token(logits, key, row_ids, sampling)
    width = buffer_len + k + 1
    tokens_buf = jnp.zeros((b, width), jnp.int32).at[:, 0].set(first)
    logp_buf = jnp.zeros((b, width), jnp.float32).at[:, 0].set(first_logp)
    keep_hidden = first_hidden is not None
    hidden_buf = (jnp.zeros((b, width, first_hidden.shape[-1]), first_hidden.dtype).at[:, 0].set(first_hidden)
                  if keep_hidden else None)
    n = jnp.where(done, 0, 1)
    done = done | jnp.any(first[:, None] == eos[None, :], axis=-1) | (n >= max_new_tokens)
    q = first_pointer(drafts, draft_lengths, first, lookup=lookup, resync_context=resync_context)
    zeros = jnp.zeros((b,), jnp.int32)
    put = jax.vmap(lambda full, part, i: jax.lax.dynamic_update_slice(full, part, (i,) + (0,) * (full.ndim - 1)))

    def cond(state):
        it, _, _, _, _, _, _, done, *_ = state
        return (it <= max_new_tokens) & ~jnp.all(done)

    def body(state):
        it, head, cache, last, slot, n, q, done, tokens_buf, logp_buf, hidden_buf, stats = state
        draft = draft_window(drafts, draft_lengths, q, k)
        inputs = jnp.concatenate([jnp.where(done, 0, last)[:, None], draft], axis=1)  # [B, K+1]
        positions = (slot - pad)[:, None] + jnp.arange(k + 1)
        hidden, cache = model(inputs, positions, key_mask, cache=cache, cache_index=slot)
        cache = constrain_cache(cache, cache_sharding)
        scaled = scale_logits(model.logits(hidden, head), sampling)  # [B, K+1, V]
        uniforms = jax.vmap(lambda kk: jax.random.uniform(kk, (k + 1,)))(_row_keys(key, it, row_ids))
        accepted, emitted, logp = verify(scaled, draft, uniforms, sampling)
        own = jnp.take_along_axis(emitted, accepted[:, None], axis=1)[:, 0]
        # Emitted this pass: the accepted prefix and the teacher's token, cut after an EOS and at the budget.
        count, hit_eos = emitted_count(emitted, accepted, eos)
        count = jnp.where(done, 0, jnp.minimum(count, max_new_tokens - n))
        tokens_buf = put(tokens_buf, emitted, n)
        logp_buf = put(logp_buf, logp, n)
        if keep_hidden:  # hidden[:, j] produced emitted[:, j]'s distribution; slots past the count are rewritten
            hidden_buf = put(hidden_buf, hidden.astype(hidden_buf.dtype), n)
        active = ~done
        stats = DraftStats(stats.passes + active, stats.proposed + active * k,
                           stats.accepted + jnp.where(active, jnp.minimum(accepted, count), 0))
        new_n = n + count
        new_done = done | hit_eos | (new_n >= max_new_tokens)
        # The last resync_context emitted tokens, the teacher's own token last (-1 before the output's start).
        ends = (n + accepted)[:, None] - jnp.arange(resync_context - 1, -1, -1)[None, :]
        context = jnp.where(ends >= 0, jnp.take_along_axis(tokens_buf, jnp.maximum(ends, 0), axis=1), -1)
        new_q = next_pointer(drafts, draft_lengths, q, accepted, context, k=k, lookup=lookup,
                             resync_window=resync_window)
        keep = lambda old, new: jnp.where(done, old, new)  # noqa: E731 - finished rows stay as they were
        return (it + 1, head, cache, keep(last, own), keep(slot, slot + accepted + 1), new_n, keep(q, new_q),
                new_done, tokens_buf, logp_buf, hidden_buf, stats)

    state = (jnp.int32(1), model.lm_head_weight(), cache, first, jnp.full((b,), prompt_len, jnp.int32), n, q, done,
             tokens_buf, logp_buf, hidden_buf, DraftStats(zeros, zeros, zeros))
    _, _, cache, _, _, n, _, _, tokens_buf, logp_buf, hidden_buf, stats = jax.lax.while_loop(cond, body, state)
    emitted = jnp.arange(buffer_len)[None, :] < n[:, None]
    if keep_hidden:
        hidden_buf = jnp.where(emitted[..., None], hidden_buf[:, :buffer_len], 0)
    out = SampleOutput(jnp.where(emitted, tokens_buf[:, :buffer_len], pad_id),
                       jnp.where(emitted, logp_buf[:, :buffer_len], 0.0), n, hidden_buf)
    return out, stats, cache
