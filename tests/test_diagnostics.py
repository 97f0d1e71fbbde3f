"""Prefix-failure diagnostics against numpy on full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trd_jax.diagnostics import (TokenStats, masked_mean, position_profile, sign_flip_rate, summarize,
                                 teacher_token_stats, decision_sign_flip_rate, weighted_sign_flip_rate)

B, R, D, V = 3, 7, 8, 50


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(B, R, D)).astype(np.float32)
    head = (2 * rng.normal(size=(D, V))).astype(np.float32)
    targets = rng.integers(0, V, (B, R)).astype(np.int32)
    mask = np.arange(R)[None] < np.array([[7], [3], [0]])
    hidden[1, 5] = np.nan  # masked garbage must not leak
    return hidden, head, targets, mask


def reference(hidden, head, targets, temperature):
    z = np.einsum("brd,dv->brv", np.nan_to_num(hidden).astype(np.float64), head) / temperature
    logq = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    q = np.exp(logq)
    srt = np.sort(q, -1)
    return dict(entropy=-(q * logq).sum(-1), top2_gap=srt[..., -1] - srt[..., -2],
                argmax_mismatch=(q.argmax(-1) != targets).astype(float),
                nll=-np.take_along_axis(logq, targets[..., None], -1)[..., 0])


@pytest.mark.parametrize("chunk,temperature", [(4, 1.0), (512, 0.7)])
def test_token_stats_match_numpy(case, chunk, temperature):
    hidden, head, targets, mask = case
    got = jax.jit(teacher_token_stats, static_argnames=("chunk_size", "temperature"))(
        jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), jnp.asarray(mask), chunk_size=chunk,
        temperature=temperature)
    ref = reference(hidden, head, targets, temperature)
    for name, value in ref.items():
        out = np.asarray(getattr(got, name))
        assert np.isfinite(out).all(), name
        np.testing.assert_allclose(out[mask], value[mask], rtol=1e-4, atol=1e-5, err_msg=name)
        assert (out[~mask] == 0).all(), name


def test_host_summaries():
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    values = np.array([[1.0, 2.0, 3.0, 4.0, 99.0], [10.0, 20.0, 99.0, 99.0, 99.0]])
    assert masked_mean(values, mask) == pytest.approx(40 / 6)
    # row 0 (length 4): bins of 2 -> [1, 2 | 3, 4]; row 1 (length 2): [10 | 20]
    assert position_profile(values, mask, bins=2) == pytest.approx([13 / 3, 27 / 3])
    adv = np.array([[1.0, -1.0, -2.0, 3.0, -9.0], [1.0, 2.0, -5.0, 0.0, 0.0]])
    # valid pairs: row 0 (1,-1) flip, (-1,-2) no, (-2,3) flip; row 1 (1,2) no -> 2 / 4
    assert sign_flip_rate(adv, mask) == pytest.approx(0.5)
    assert sign_flip_rate(adv, np.zeros_like(mask)) == 0.0


def test_summarize_keys(case):
    hidden, head, targets, mask = case
    stats = teacher_token_stats(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), jnp.asarray(mask))
    out = summarize(stats, mask, student_logp=np.zeros((B, R)), teacher_logp=np.ones((B, R)), prefix="y_o/", bins=4)
    assert out["y_o/advantage_sign_flip_rate"] == 0.0
    assert {f"y_o/teacher_entropy_pos{k}" for k in range(4)} <= set(out)
    assert all(np.isfinite(v) for v in out.values())


def loop_flip_rates(adv, entropy, mask, threshold):
    """Plain-Python reference: (plain, weighted, uncertain) flip rates and the uncertain token fraction."""
    flips = pairs = w_flips = w_total = u_flips = u_pairs = 0.0
    valid = uncertain = 0
    for b in range(len(adv)):
        decisions = [float(adv[b][t]) for t in range(len(adv[b])) if mask[b][t] and entropy[b][t] > threshold]
        for x, y in zip(decisions, decisions[1:]):
            u_pairs += 1
            u_flips += (x > 0 and y < 0) or (x < 0 and y > 0)
        for t in range(len(adv[b])):
            if mask[b][t]:
                valid += 1
                uncertain += entropy[b][t] > threshold
            if t + 1 == len(adv[b]) or not (mask[b][t] and mask[b][t + 1]):
                continue
            x, y = float(adv[b][t]), float(adv[b][t + 1])
            flip = (x > 0 and y < 0) or (x < 0 and y > 0)
            pairs += 1
            flips += flip
            w = min(abs(x), abs(y))
            w_total += w
            w_flips += w * flip
    return (flips / pairs if pairs else 0.0, w_flips / w_total if w_total else 0.0,
            u_flips / u_pairs if u_pairs else float("nan"), uncertain / valid if valid else 0.0)


def _stats(entropy):
    zeros = np.zeros_like(entropy)
    return TokenStats(entropy, zeros, zeros, zeros)


@pytest.mark.parametrize("seed", range(4))
def test_flip_rate_variants_match_loops(seed):
    rng = np.random.default_rng(seed)
    b, t = 5, 11
    adv = rng.normal(size=(b, t)) * rng.choice([1e-4, 1.0, 5.0], size=(b, t))
    adv[rng.random((b, t)) < 0.1] = 0.0  # exact zeros: no sign, never a flip
    entropy = rng.exponential(0.3, size=(b, t))
    mask = rng.random((b, t)) < 0.8  # rows with gaps
    mask[0] = False  # an empty row
    mask[1] = np.arange(t) < 6  # a plain prefix
    adv[~mask] = np.nan  # garbage at masked positions must not leak
    threshold = [0.1, 0.3, 0.0, 10.0][seed]
    want = loop_flip_rates(adv, entropy, mask, threshold)
    out = summarize(_stats(entropy), mask, student_logp=np.zeros((b, t)), teacher_logp=adv, entropy_threshold=threshold)
    got = (out["advantage_sign_flip_rate"], out["advantage_sign_flip_rate_weighted"],
           out["advantage_sign_flip_rate_decisions"], out["uncertain_token_fraction"])
    assert got == pytest.approx(want, abs=1e-12, nan_ok=True)
    assert got[:3] == pytest.approx((sign_flip_rate(adv, mask), weighted_sign_flip_rate(adv, mask),
                                     decision_sign_flip_rate(adv, entropy, mask, threshold)), abs=1e-12, nan_ok=True)


def test_flip_rate_variants_hand_case():
    # Row 0: a = [2, -3, 0.01, -0.01, -1], all valid; row 1: [1, -1, x, 4] with position 2 masked (a gap).
    adv = np.array([[2.0, -3.0, 0.01, -0.01, -1.0], [1.0, -1.0, 99.0, 4.0, 0.0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], bool)
    entropy = np.array([[0.5, 0.5, 0.01, 0.02, 0.4], [0.2, 0.05, 9.0, 0.3, 9.0]])
    # pairs: (2,-3) flip w 2; (-3,.01) flip w .01; (.01,-.01) flip w .01; (-.01,-1) no w .01; (1,-1) flip w 1
    assert sign_flip_rate(adv, mask) == pytest.approx(4 / 5)
    assert weighted_sign_flip_rate(adv, mask) == pytest.approx(3.02 / 3.03)
    # entropy > 0.1 (valid): row 0 tokens 0, 1, 4 (a = 2, -3, -1); row 1 tokens 0, 3 (a = 1, 4; token 2 is
    # masked): successive pairs (2, -3) flip, (-3, -1) and (1, 4) do not; the tokens between are skipped
    assert decision_sign_flip_rate(adv, entropy, mask, 0.1) == pytest.approx(1 / 3)
    assert np.isnan(decision_sign_flip_rate(adv, entropy, mask, 1.0))  # nothing to compare: NaN, not 0
    out = summarize(_stats(entropy), mask, student_logp=np.zeros_like(adv), teacher_logp=adv)
    assert out["uncertain_token_fraction"] == pytest.approx(5 / 8)
    assert out["advantage_sign_flip_rate_decisions"] == pytest.approx(1 / 3)
    # near-certain tokens flipping at random hardly move the weighted rate
    noise = np.array([[1.0, 2.0, 1e-6, -1e-6, 1e-6, -1e-6, 3.0]])
    assert sign_flip_rate(noise, np.ones_like(noise, bool)) == pytest.approx(4 / 6)
    assert weighted_sign_flip_rate(noise, np.ones_like(noise, bool)) == pytest.approx(4e-6 / (1 + 5e-6), rel=1e-12)
    assert weighted_sign_flip_rate(np.zeros((1, 3)), np.ones((1, 3), bool)) == 0.0  # no weight
