"""KV-cache sampling (trd_jax.sampling): greedy against transformers, sampling statistics, filters,
log-probabilities, lengths and compile reuse."""

import functools

import jax
import numpy as np
import pytest
import torch

from trd_jax import sampling
from trd_jax.api import generate
from trd_jax.token_selection import SamplingConfig, select_tokens
from trd_jax.shapes import bucket

from conftest import TINY_HF_CONFIGS

NAMES = list(TINY_HF_CONFIGS)
PROMPTS = [[5, 9, 13, 102], list(range(20, 37)), [42], list(range(150, 180))]


def log_softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(np.asarray(x, np.float64)))


def chi2_critical(df: int, z: float = 5.0) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at a z-sigma tail (z=5: p ~ 3e-7)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * np.sqrt(a)) ** 3


def chi2(counts, probs) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; bins with expected count < 5 merged into one."""
    counts, expected = np.asarray(counts, float), np.asarray(probs, float) * np.sum(counts)
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    assert counts[~keep].sum() == 0, "samples where the expected count is 0"
    counts, expected = counts[keep], expected[keep]
    return float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1


def assert_matches(counts, probs, wrong=None):
    """Frequencies fit `probs`; and (test power) they do not fit the `wrong` distribution."""
    stat, df = chi2(counts, probs)
    assert df == 0 or stat < chi2_critical(df), (stat, df)
    if wrong is not None:
        stat, df = chi2(counts, wrong)
        assert stat > chi2_critical(df), ("test has no power", stat, df)


@functools.partial(jax.jit, static_argnums=2)
def _select(logits, key, cfg):
    return select_tokens(logits, key, cfg)


def draw(row, cfg: SamplingConfig, n: int, seed: int = 0):
    """n independent draws from one logits row (tiled into rows, one uniform per row)."""
    row = np.asarray(row, np.float32)
    b = 4096 if row.size <= 1024 else 256  # one shape per vocabulary: compiled once per config
    tiled = np.broadcast_to(row, (b, row.size))
    toks, logps = [], []
    for i in range(-(-n // b)):
        t, lp = _select(tiled, jax.random.key(seed * 1000 + i), cfg)
        toks.append(np.asarray(t))
        logps.append(np.asarray(lp))
    return np.concatenate(toks)[:n], np.concatenate(logps)[:n]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).numpy()


# ---------------------------------------------------------------- greedy against transformers


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers(name, tiny_lms, tiny_torch_models):
    lm, ref = tiny_lms[name], tiny_torch_models[name]
    out = lm.sampler(lm.params, PROMPTS, 12, sampling=SamplingConfig(0.0))
    for i, p in enumerate(PROMPTS):
        toks, logits = hf_greedy(ref, p, 12)
        n = out.lengths[i]
        assert out.tokens[i, :n].tolist() == toks, (i, name)
        # greedy log-probs are under softmax(logits) (temperature 1)
        np.testing.assert_allclose(out.logprobs[i, :n], log_softmax(logits)[np.arange(n), toks], atol=1e-4)
    assert generate(lm, PROMPTS, 12) == [out.tokens[i, :n].tolist() for i, n in enumerate(out.lengths)]


def test_greedy_stops_after_eos(tiny_lms):
    lm = tiny_lms["qwen3"]  # no EOS of its own
    assert lm.eos_ids == ()
    free = generate(lm, PROMPTS[:2], 16, eos_id=())
    assert [len(x) for x in free] == [16, 16]
    # the first token of prompt 0's continuation (after position 2) that prompt 1 never emits
    j, eos = next((j, t) for j, t in enumerate(free[0]) if j >= 2 and t not in free[1])
    stopped = generate(lm, PROMPTS[:2], 16, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos) + 1] and stopped[0][-1] == eos
    assert stopped[1] == free[1]


# ---------------------------------------------------------------- sampling statistics


def test_first_token_frequencies_through_sampler(tiny_lms):
    """n=4096 samples of one prompt: the first token follows softmax(logits) (temperature 1)."""
    lm, prompt = tiny_lms["llama"], PROMPTS[1]
    out = lm.sampler(lm.params, [prompt], 1, sampling=SamplingConfig(1.0), n=4096, key=jax.random.key(1),
                     eos_ids=())
    assert out.tokens.shape == (4096, 1) and (out.lengths == 1).all()
    logits = lm.logits([prompt])[0, -1]
    counts = np.bincount(out.tokens[:, 0], minlength=logits.size)
    assert_matches(counts, softmax(logits), wrong=softmax(logits / 0.5))
    np.testing.assert_allclose(out.logprobs[:, 0], log_softmax(logits)[out.tokens[:, 0]], atol=1e-5)


@pytest.mark.parametrize("vocab", [50, 1000])
def test_temperature_frequencies(vocab):
    logits = np.random.default_rng(vocab).normal(0, 1.5, vocab)
    for temp in (1.0, 0.5):
        toks, logps = draw(logits, SamplingConfig(temp), 20000, seed=vocab)
        assert_matches(np.bincount(toks, minlength=vocab), softmax(logits / temp),
                       wrong=softmax(logits / (1.5 - temp)))
        np.testing.assert_allclose(logps, log_softmax(logits / temp)[toks], rtol=1e-5, atol=1e-5)


def nucleus(probs, top_p):
    """Ids of the smallest set of most probable entries whose mass reaches top_p (numpy, by sorting)."""
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order]) / probs.sum()
    k = int(np.searchsorted(cum, top_p)) + 1
    assert k == len(order) or cum[k - 1] - top_p > 1e-4 and top_p - (cum[k - 2] if k > 1 else 0) > 1e-4, \
        "top_p too close to a boundary"
    return order[:k]


def filtered_probs(logits, temp, top_k=0, top_p=1.0):
    """HF order: top-k on the tempered logits, then top-p on the renormalised top-k distribution."""
    p = softmax(np.asarray(logits) / temp)
    if top_k:
        p[np.argsort(-p)[top_k:]] = 0
    if top_p < 1:
        keep = np.zeros(p.size, bool)
        keep[nucleus(p, top_p)] = True
        p[~keep] = 0
    return p / p.sum()


def check_filter(logits, temp, top_k, top_p, n, seed=0):
    cfg = SamplingConfig(temp, top_k=top_k, top_p=top_p)
    toks, logps = draw(logits, cfg, n, seed=seed)
    want = filtered_probs(logits, temp, top_k, top_p)
    support = np.flatnonzero(want)
    assert np.isin(toks, support).all(), sorted(set(toks) - set(support))  # nothing outside the filter
    counts = np.bincount(toks, minlength=len(logits))
    assert (counts[support] > 0).all()  # everything inside is reachable
    assert_matches(counts, want)
    # log-probs: the tempered, unfiltered distribution
    np.testing.assert_allclose(logps, log_softmax(np.asarray(logits, np.float64) / temp)[toks], rtol=1e-5, atol=1e-5)
    return support


def test_top_k_top_p_small_vocab():
    # V=50: one chunk; V=1000: 8 chunks of 128, so top-3 gathers the 3 best chunks first.
    logits = np.random.default_rng(1).normal(0, 2.0, 50).astype(np.float32)
    assert len(check_filter(logits, 1.0, 10, 1.0, 20000)) == 10
    assert 1 < len(check_filter(logits, 1.0, 0, 0.7, 20000)) < 50
    assert 1 < len(check_filter(logits, 0.8, 12, 0.6, 20000)) < 12
    logits = np.random.default_rng(2).normal(0, 2.0, 1000).astype(np.float32)
    assert len(check_filter(logits, 0.7, 3, 1.0, 20000)) == 3
    assert 3 < len(check_filter(logits, 1.0, 40, 0.5, 20000)) < 40


@pytest.fixture(scope="module")
def big_logits():
    """V = 40037 (> 256 * 128 entries, not a multiple of 128): five large logits spread over chunks,
    one in the last, partial chunk and two in the same chunk; background N(0, 1) holds ~1/3 of the mass."""
    v = 40037
    logits = np.random.default_rng(7).normal(0, 1, v).astype(np.float32)
    top = [3, 20000, 20001, 40036, 12345]
    logits[top] = 11.0 - 0.5 * np.arange(5)
    return logits, top


def test_top_k_big_vocab(big_logits):
    logits, top = big_logits
    support = check_filter(logits, 1.0, 5, 1.0, 2048)
    assert sorted(support) == sorted(top)
    assert sorted(check_filter(logits, 1.0, 2, 1.0, 2048, seed=1)) == [3, 20000]  # both from other chunks


def test_top_p_big_vocab(big_logits):
    logits, top = big_logits
    assert sorted(check_filter(logits, 1.0, 0, 0.5, 2048)) == sorted(top[:3])
    # Without top-p or top-k the background (not in the top 5) takes about a third of the draws.
    toks, _ = draw(logits, SamplingConfig(1.0), 2048)
    assert 0.2 < np.mean(~np.isin(toks, top)) < 0.5


def test_top_k_then_top_p_big_vocab(big_logits):
    """top_p=0.8 of the renormalised top-4 keeps 3 tokens; top-p before top-k would keep all 4."""
    logits, top = big_logits
    assert sorted(check_filter(logits, 1.0, 4, 0.8, 2048)) == sorted(top[:3])
    assert np.sort(softmax(logits))[-4:].sum() < 0.8


def test_greedy_select_ties_and_logprob():
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, -1.0, 0.0]], np.float32)
    toks, logps = _select(logits, jax.random.key(0), SamplingConfig(0.0))
    assert toks.tolist() == [1, 0]  # first maximum, as torch.argmax
    np.testing.assert_allclose(logps, log_softmax(logits)[[0, 1], [1, 0]], atol=1e-6)


# ---------------------------------------------------------------- log-probs, determinism, n, lengths


def test_logprobs_teacher_forced(tiny_lms):
    """Sampled (T=0.7, top-k 20, top-p 0.9) tokens: logprobs = log softmax(logits / 0.7) at the token,
    from a full forward pass over prompt + continuation; and every token is in the top 20."""
    lm = tiny_lms["llama"]
    out = lm.sampler(lm.params, PROMPTS, 10, sampling=SamplingConfig(0.7, top_k=20, top_p=0.9),
                     key=jax.random.key(3), eos_ids=())
    for i, p in enumerate(PROMPTS):
        gen = out.tokens[i].tolist()
        assert out.lengths[i] == 10 and len(gen) == 10
        logits = lm.logits([p + gen])[0, len(p) - 1:-1]
        np.testing.assert_allclose(out.logprobs[i], log_softmax(logits / 0.7)[np.arange(10), gen], atol=1e-4)
        ranks = (logits > logits[np.arange(10), gen][:, None]).sum(-1)
        assert (ranks < 20).all(), ranks


def test_determinism(tiny_lms):
    lm = tiny_lms["qwen2"]
    run = lambda seed: generate(lm, PROMPTS, 8, temperature=1.0, seed=seed)  # noqa: E731
    a = run(0)
    assert a == run(0)
    assert a != run(1)


def test_n_samples_layout(tiny_lms):
    lm = tiny_lms["mistral"]
    one = lm.sampler(lm.params, PROMPTS[:3], 6, sampling=SamplingConfig(0.0), eos_ids=())
    three = lm.sampler(lm.params, PROMPTS[:3], 6, sampling=SamplingConfig(0.0), n=3, eos_ids=())
    assert three.tokens.shape == (9, 6)
    for i in range(3):
        for r in range(3 * i, 3 * i + 3):  # rows i*n .. i*n+n-1 belong to prompt i
            np.testing.assert_array_equal(three.tokens[r], one.tokens[i])
            np.testing.assert_allclose(three.logprobs[r], one.logprobs[i], atol=1e-5)
    assert len({tuple(one.tokens[i]) for i in range(3)}) == 3


def test_lengths_eos_and_padding(tiny_lms):
    lm = tiny_lms["qwen3"]
    eos = tuple(range(0, 256, 9))  # 29 tokens: ~10% of the mass per step
    out = lm.sampler(lm.params, PROMPTS[:2], 10, sampling=SamplingConfig(1.0), n=8, key=jax.random.key(0),
                     eos_ids=eos)
    pad = lm.sampler.pad_id
    assert out.tokens.shape[0] == 16 and out.tokens.shape[1] <= 10 and (out.lengths <= 10).all()
    hit = 0
    for toks, logps, n in zip(out.tokens, out.logprobs, out.lengths):
        assert n >= 1 and not np.isin(toks[:n - 1], eos).any()  # no EOS before the end
        if toks[n - 1] in eos:
            hit += 1
        else:
            assert n == 10  # ran to max_new_tokens
        assert (toks[n:] == pad).all() and (logps[n:] == 0).all() and (logps[:n] < 0).all()
    assert 0 < hit < 16


def test_pad_id_outside_vocab(tiny_lms):
    """Left padding with a pad id the embedding does not have (e.g. vocab_size) must not leak into the
    real tokens: either refuse the pad id or give the same samples as an in-vocabulary pad."""
    lm = tiny_lms["qwen3"]
    ref = sampling.Sampler(lm.graphdef, pad_id=0)(lm.params, PROMPTS, 4, sampling=SamplingConfig(0.0))
    try:
        out = sampling.Sampler(lm.graphdef, pad_id=256)(lm.params, PROMPTS, 4, sampling=SamplingConfig(0.0))
    except ValueError as e:
        assert "pad_id" in str(e)
        return
    bad = int((~np.isfinite(out.logprobs)).sum())
    assert bad == 0, f"{bad}/{out.logprobs.size} log-probs NaN: the out-of-range pad embedding leaks"
    np.testing.assert_array_equal(out.tokens, ref.tokens)


# ---------------------------------------------------------------- compile reuse, buckets, bad input


def test_no_recompilation_within_bucket(tiny_lms, monkeypatch):
    """Prompts of other lengths in the same buckets reuse the compiled prefill and decode; a new batch bucket
    compiles once more. The steps are re-jitted around chex.assert_max_traces, which raises on a second trace."""
    import chex

    jit_args = {"prefill": dict(static_argnames=("graphdef", "n", "cache_sharding"), donate_argnames=("cache",)),
                "decode": dict(static_argnames=("graphdef", "prompt_len", "buffer_len", "sampling", "eos_ids",
                                                "total_rows", "cache_sharding", "segment"), donate_argnames=("cache",))}
    for name, kw in jit_args.items():
        raw = getattr(sampling, name).__wrapped__
        monkeypatch.setattr(sampling, name, jax.jit(chex.assert_max_traces(raw, n=1), **kw))
    lm = tiny_lms["qwen3"]
    greedy = SamplingConfig(0.0)
    sampler = sampling.Sampler(lm.graphdef)  # a fresh sampler: no cache from other tests
    try:
        sampler(lm.params, [[1, 2, 3], list(range(9))], 9, sampling=greedy)
        out = sampler(lm.params, [list(range(30, 44)), [7, 7]], 12, sampling=greedy)  # same buckets: no trace
        assert out.tokens.shape[1] == 12
        with pytest.raises(AssertionError, match="traced > 1 times"):
            sampler(lm.params, [[1]] * 5, 9, sampling=greedy)  # another batch bucket: a second trace
    finally:
        chex.clear_trace_counter()


def test_kv_cache_reuse_across_calls(tiny_lms):
    """The sampler keeps its donated KV cache between calls of the same cache shape, stale slots included:
    (prompt bucket 24, buffer 16) and (16, 24) share one shape. Outputs equal a fresh sampler's."""
    lm = tiny_lms["llama"]
    long_prompts, short_prompts = [list(range(100, 124)), list(range(60, 80))], [[3, 1, 4, 1, 5], [9, 2, 6]]
    cfg = SamplingConfig(1.0, top_k=50)
    lm.sampler(lm.params, long_prompts, 16, sampling=cfg, key=jax.random.key(0), eos_ids=())
    shape = lm.sampler._cache[0].k.shape
    reused = lm.sampler(lm.params, short_prompts, 24, sampling=cfg, key=jax.random.key(1), eos_ids=())
    assert lm.sampler._cache[0].k.shape == shape and shape[2] == 40
    fresh = sampling.Sampler(lm.graphdef)(lm.params, short_prompts, 24, sampling=cfg, key=jax.random.key(1), eos_ids=())
    np.testing.assert_array_equal(reused.tokens, fresh.tokens)
    np.testing.assert_allclose(reused.logprobs, fresh.logprobs, atol=1e-6)
    for i, p in enumerate(short_prompts):  # and both are right (teacher-forced log-probs)
        logits = lm.logits([p + reused.tokens[i].tolist()])[0, len(p) - 1:-1]
        np.testing.assert_allclose(reused.logprobs[i], log_softmax(logits)[np.arange(24), reused.tokens[i]], atol=1e-4)


def test_bucket_properties():
    values = [bucket(n) for n in range(1, 5000)]
    assert values[:12] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12]
    for n, b in enumerate(values, start=1):
        assert n <= b <= 1.5 * n and bucket(b) == b
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert len(set(values)) <= 2 * np.log2(5000) + 2
    assert bucket(3, 16) == 16 and bucket(17, 16) == 24


def test_bad_input(tiny_lms):
    lm = tiny_lms["qwen3"]
    with pytest.raises(ValueError, match="prompts"):
        generate(lm, [], 4)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(lm, [[1, 2], []], 4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(lm, [[1, 2]], bad)
    with pytest.raises(ValueError, match="n="):
        lm.sampler(lm.params, [[1]], 4, n=0)
    with pytest.raises(ValueError, match="max_rows="):
        lm.sampler(lm.params, [[1]], 4, max_rows=-1)
    with pytest.raises(ValueError, match=r"prompts\[1\]: 3 tokens exceed max_prompt_len=2"):
        lm.sampler(lm.params, [[1], [1, 2, 3]], 4, max_prompt_len=2)
    for kw in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="SamplingConfig"):
            SamplingConfig(**kw)
