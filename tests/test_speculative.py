"""Speculative decoding against a per-row draft (trd_jax/speculative.py): greedy outputs identical to plain
decoding's whatever the draft; sampled outputs distributed exactly as plain sampling's (chi-square against
the model's own filtered distributions, computed here with numpy sorts); draft alignment; statistics."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.sampling import Sampler, SamplingConfig
from trd_jax.speculative import _lookup, _resync

from test_sampling import chi2, chi2_critical

PROMPTS = [[5, 9, 13], list(range(20, 37)), [42], [7, 8]]
EOS = 3


def tiny(vocab: int, seed: int = 0, sharpen: float = 1.0):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * sharpen  # peaked distributions: filters and drafts matter
    return nnx.split(model)


@pytest.fixture(scope="module")
def greedy_setup():
    graph, params = tiny(64)
    sampler = Sampler(graph, eos_ids=(EOS,))
    plain = sampler(params, PROMPTS, 40, sampling=SamplingConfig(0.0))
    return sampler, params, plain


def rows(out):
    return [out.tokens[i, :n].tolist() for i, n in enumerate(out.lengths)]


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_greedy_output_is_plain_decodings_whatever_the_draft(greedy_setup, draft_tokens):
    sampler, params, plain = greedy_setup
    reference = rows(plain)
    rng = np.random.default_rng(0)
    drafts = {
        "its own output": reference,
        "20% of tokens changed": [[t if rng.random() > 0.2 else int(rng.integers(64)) for t in r] for r in reference],
        "a token inserted and one deleted": [r[:5] + [11] + r[5:20] + r[21:] for r in reference],
        "random": [rng.integers(0, 64, 30).tolist() for _ in reference],
        "one token": [[1]] * len(reference),
    }
    accepted = {}
    for name, draft in drafts.items():
        out = sampler(params, PROMPTS, 40, sampling=SamplingConfig(0.0), drafts=draft, draft_tokens=draft_tokens)
        assert rows(out) == reference, name
        np.testing.assert_allclose(out.logprobs, plain.logprobs, atol=1e-5, err_msg=name)
        stats = sampler.last_draft_stats
        assert stats["proposed"] == stats["passes"] * draft_tokens
        assert stats["passes"] + stats["accepted"] >= int(plain.lengths.sum()) - len(PROMPTS)  # every token
        # Accepted over the most a pass can accept (K of its K + 1 tokens).
        accepted[name] = stats["accepted"] / (int(plain.lengths.sum()) * draft_tokens / (draft_tokens + 1))
    # The draft sets the speed: its own output is accepted all along, a random one almost never.
    assert accepted["its own output"] > 0.7 and accepted["random"] < 0.1, accepted
    assert accepted["a token inserted and one deleted"] > 0.5, accepted  # re-synchronised after each edit


def test_greedy_speculation_with_eos_row_groups_and_samples(greedy_setup):
    sampler, params, _ = greedy_setup
    # EOS early: the last emitted token of the greedy path of prompt 0 is made the stop token.
    plain = sampler(params, PROMPTS, 24, sampling=SamplingConfig(0.0), n=3, eos_ids=(EOS, 17))
    for max_rows in (0, 6):
        out = sampler(params, PROMPTS, 24, sampling=SamplingConfig(0.0), n=3, eos_ids=(EOS, 17),
                      drafts=[r for r in rows(plain)[::3]], draft_tokens=4, max_rows=max_rows)
        assert rows(out) == rows(plain) and out.lengths.tolist() == plain.lengths.tolist()


def test_prompt_lookup_greedy_output_is_plain_decodings(greedy_setup):
    """Prompt lookup (draft_mode="lookup", the prompt as the draft): plain greedy decoding's tokens, with n
    samples and row groups; a prompt that holds the output's own text gets drafts accepted."""
    sampler, params, plain = greedy_setup
    for kwargs in ({}, {"n": 2, "max_rows": 4}):
        ref = sampler(params, PROMPTS, 40, sampling=SamplingConfig(0.0), **kwargs)
        out = sampler(params, PROMPTS, 40, sampling=SamplingConfig(0.0), drafts=PROMPTS, draft_tokens=4,
                      draft_mode="lookup", **kwargs)
        assert rows(out) == rows(ref)
    # The greedy path of a prompt that quotes its own continuation: the quote is the draft that gets accepted.
    quoting = [p + r[:8] + [1] + p for p, r in zip(PROMPTS, rows(plain))]
    ref = sampler(params, quoting, 40, sampling=SamplingConfig(0.0))
    out = sampler(params, quoting, 40, sampling=SamplingConfig(0.0), drafts=quoting, draft_tokens=4,
                  draft_mode="lookup")
    assert rows(out) == rows(ref)
    with pytest.raises(ValueError, match="draft_mode"):
        sampler(params, PROMPTS, 8, sampling=SamplingConfig(0.0), drafts=PROMPTS, draft_tokens=4, draft_mode="x")


def test_lookup_finds_the_latest_occurrence_or_nothing():
    draft = jnp.asarray([[7, 8, 9, 7, 8, 5, 0, 0]] * 3, jnp.int32)
    lengths = jnp.asarray([6, 6, 3], jnp.int32)
    context = jnp.asarray([[7, 8], [-1, 9], [7, 8]], jnp.int32)
    # (7, 8) occurs at 0-1 and 3-4: one past the latest (5); 9 at 2 -> 3; row 2's draft is [7, 8, 9]: -> 2.
    assert _lookup(draft, lengths, context, window=8).tolist() == [5, 3, 2]
    missing = jnp.asarray([[4, 4]] * 3, jnp.int32)
    assert _lookup(draft, lengths, missing, window=8).tolist() == [7, 7, 4]  # past the draft: proposes nothing


def test_sampled_draws_do_not_depend_on_row_groups(greedy_setup):
    sampler, params, plain = greedy_setup
    cfg = SamplingConfig(0.8, top_k=10)
    whole = sampler(params, PROMPTS, 16, sampling=cfg, n=2, key=3, drafts=rows(plain), draft_tokens=4)
    grouped = sampler(params, PROMPTS, 16, sampling=cfg, n=2, key=3, drafts=rows(plain), draft_tokens=4, max_rows=4)
    assert rows(whole) == rows(grouped)


# ------------------------------------------------------------------------------------------------
# Exactness of sampling


def reference_weights(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Plain sampling's distribution, by sorting (numpy): tempered softmax, top-k, then top-p over the rest."""
    x = logits.astype(np.float64) / cfg.temperature
    p = np.exp(x - x.max())
    if 0 < cfg.top_k < len(p):
        p = np.where(p >= np.sort(p)[-cfg.top_k], p, 0.0)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(mass, cfg.top_p * p.sum() - 1e-12)) + 1]
        p = np.where(np.isin(np.arange(len(p)), keep), p, 0.0)
    return p / p.sum()


def exact_joint(graph, params, prompt: list[int], vocab: int, cfg: SamplingConfig) -> np.ndarray:
    """P(t1, t2, t3) of plain sampling, from the model's logits on every two-token continuation."""
    model = nnx.merge(graph, params)
    pairs = np.array([(a, b) for a in range(vocab) for b in range(vocab)])
    tokens = jnp.asarray(np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], axis=1))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(tokens, positions, jnp.ones(tokens.shape, bool))
    logits = np.asarray(model.logits(hidden[:, -3:]), np.float64)  # next-token logits after t0, t1, t2
    joint = np.zeros((vocab,) * 3)
    p1 = reference_weights(logits[0, 0], cfg)
    for i, (a, b) in enumerate(pairs):
        if b == 0:  # P(t2 | a) is the same for every b: read it from the row (a, 0)
            p2 = reference_weights(logits[i, 1], cfg)
        joint[a, b] = p1[a] * p2[b] * reference_weights(logits[i, 2], cfg)
    return joint.reshape(-1)


@pytest.mark.parametrize("cfg,draft_mode", [
    pytest.param(SamplingConfig(1.0), "aligned", marks=pytest.mark.slow),
    pytest.param(SamplingConfig(0.7, top_k=3), "aligned", marks=pytest.mark.slow),
    pytest.param(SamplingConfig(1.0, top_p=0.8), "aligned", marks=pytest.mark.slow),
    (SamplingConfig(0.6, top_k=4, top_p=0.9), "aligned"),  # the fast tier's: every filter at once
    pytest.param(SamplingConfig(0.6, top_k=4, top_p=0.9), "lookup", marks=pytest.mark.slow),
], ids=str)
def test_sampled_tokens_are_distributed_as_plain_sampling(cfg, draft_mode):
    vocab, samples = 8, 6000
    graph, params = tiny(vocab, seed=1, sharpen=40.0)
    prompt = [1, 5, 2]
    joint = exact_joint(graph, params, prompt, vocab, cfg)
    greedy = Sampler(graph)(params, [prompt], 3, sampling=SamplingConfig(0.0), eos_ids=()).tokens[0].tolist()
    # A draft that is often right (the greedy path) and sometimes not: both the acceptance and the
    # residual draw are exercised.
    draft = greedy + [greedy[-1]]
    if draft_mode == "lookup":  # a text to look up in: the greedy path after the prompt's last token, twice
        draft = [prompt[-1]] + greedy + [prompt[-1], greedy[0], greedy[1]]
    out = Sampler(graph)(params, [prompt], 3, sampling=cfg, n=samples, key=7, eos_ids=(), drafts=[draft],
                         draft_tokens=2, draft_mode=draft_mode)
    codes = out.tokens[:, 0] * vocab * vocab + out.tokens[:, 1] * vocab + out.tokens[:, 2]
    counts = np.bincount(codes, minlength=vocab ** 3)
    stat, df = chi2(counts, joint)
    assert stat < chi2_critical(df), (stat, df)
    # Power: a sampler that always took the draft when it is in the support fails the same test.
    always = joint.copy()
    always[greedy[0] * vocab * vocab + greedy[1] * vocab + greedy[2]] += 1.0
    stat_wrong, df_wrong = chi2(counts, always / always.sum())
    assert stat_wrong > chi2_critical(df_wrong), ("no power", stat_wrong)
    assert 0 < np.mean([c == d for c, d in zip(out.tokens[:, 1], [greedy[1]] * samples)]) < 1


# ------------------------------------------------------------------------------------------------
# Draft alignment


def test_resync_follows_substitutions_insertions_and_deletions():
    draft = jnp.asarray([[10, 11, 12, 13, 14, 15, 16, 17]] * 5, jnp.int32)
    lengths = jnp.full((5,), 8, jnp.int32)
    q = jnp.asarray([2, 2, 2, 7, 2], jnp.int32)  # the draft expected 12 (17 in row 3)
    context = jnp.asarray([[10, 11, 12], [-1, 13, 14], [10, 11, 99], [-1, 10, 11], [10, 11, 14]], jnp.int32)
    # (10, 11, 12): aligned -> 3; (13, 14) at the output's start: back on the draft after 12 was deleted ->
    # one past 14 (5); 99: a substitution -> 3; (10, 11) with the pointer at 17: the rewrite went back ->
    # 2; (.., 11, 14): 14 alone is in the draft, but not after 11: a substitution, not a jump -> 3.
    assert _resync(draft, lengths, q, context, window=16).tolist() == [3, 5, 3, 2, 3]
    assert _resync(draft, lengths, q, context, window=1).tolist() == [3, 3, 3, 8, 3]  # out of reach
