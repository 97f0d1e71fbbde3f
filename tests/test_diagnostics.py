"""Prefix-failure diagnostics against numpy on full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trd_jax.diagnostics import (masked_mean, position_profile, sign_flip_rate, summarize, teacher_token_stats)

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
