"""onepass_loss: the aggregated loss whose gradient is computed in the forward pass, against the
two-pass path it replaces (losses.per_token_loss + losses.aggregate, itself tested against numpy and the
unfused divergences), a float64 numpy reference of the weights, and finite differences."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trd_jax import losses as L
from trd_jax import onepass_loss as O

B, T, D, DT, V, CHUNK = 3, 11, 16, 24, 40, 8  # B * T not a multiple of CHUNK

CASES = {
    "forward_kl": (),
    "reverse_kl": (),
    "jsd": (("beta", 0.3),),
    "forward_kl_clipped": (("clip", 4.5),),  # some tokens of the inputs clip, others not
    # sampled-token losses: the target tokens' log-probs against the teacher's given ones
    "k1_policy_gradient": (("clamp", 3.0),),  # some advantages clamped (the inputs' log-ratios reach past 3)
    "k3": (("clamp", 2.0),),
}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    f = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    mask = np.arange(T)[None] < np.array([[T], [5], [0]])  # a full row, a short one, an empty one
    mask[0, 0] = False  # a hole at the start
    hs, ht = f(B, T, D), f(B, T, DT)
    ht = np.where(mask[..., None], ht, np.inf)  # garbage at masked teacher positions must not leak
    return hs, f(D, V, scale=0.6), ht.astype(np.float32), f(DT, V, scale=0.6), mask


def test_aggregation_weights_reproduce_aggregate():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.5
    mask[2] = False
    for mode in ("token_mean", "seq_mean", "sum"):
        for counts in ({}, {"num_tokens": 40, "num_rows": 7}):
            w = np.asarray(O.aggregation_weights(mask, mode, **counts), np.float64)
            assert np.all(w[~mask] == 0)
            np.testing.assert_allclose(np.sum(w * values), L.aggregate(values, mask, mode, **counts), rtol=1e-6)
    # by hand: seq_mean over rows with 2 and 1 tokens -> each row's tokens weigh 1 / (its count x 2 rows)
    hand = np.array([[True, True, False], [False, True, False]])
    np.testing.assert_allclose(O.aggregation_weights(hand, "seq_mean"), [[0.25, 0.25, 0], [0, 0.5, 0]])
    with pytest.raises(ValueError, match="unknown mode"):
        O.aggregation_weights(hand, "mean")


TARGETS = np.random.default_rng(4).integers(0, V, (B, T)).astype(np.int32)
TEACHER_LOGP = -np.random.default_rng(5).exponential(2.0, (B, T)).astype(np.float32)


def _two_pass(cfg, hs, ws, ht, wt, mask, counts):
    values = L.per_token_loss(cfg, hs, ws, targets=TARGETS, mask=mask, teacher_hidden=ht, teacher_head=wt,
                              teacher_logp=TEACHER_LOGP)
    return L.aggregate(values, mask, cfg.aggregation, **counts), jnp.where(mask, values, 0.0)


def _one_pass(cfg, hs, ws, ht, wt, mask, counts):
    return O.aggregated_loss(cfg, hs, ws, targets=TARGETS, mask=mask, teacher_hidden=ht, teacher_head=wt,
                             teacher_logp=TEACHER_LOGP, **counts)


def _close(actual, expected, what, tol=2e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "sum"])
@pytest.mark.parametrize("name", list(CASES))
def test_one_pass_matches_the_two_pass_path(inputs, name, aggregation):
    hs, ws, ht, wt, mask = inputs
    cfg = L.LossConfig(name=name, params=CASES[name], temperature=0.8, aggregation=aggregation, chunk_size=CHUNK)
    assert O.one_pass_applies(cfg)
    counts = {"num_tokens": jnp.int32(2 * int(mask.sum())), "num_rows": jnp.int32(5)}  # a larger step's counts
    grad = lambda fn: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda h, w: fn(cfg, h, w, ht, wt, mask, counts), (0, 1), has_aux=True))
    (loss2, vals2), (dh2, dw2) = grad(_two_pass)(hs, ws)
    (loss1, vals1), (dh1, dw1) = grad(_one_pass)(hs, ws)
    chex.assert_shape(vals1, (B, T))
    assert np.isfinite(loss1) and float(loss1) > 0
    _close(loss1, loss2, "loss")
    _close(vals1, vals2, "values")
    _close(dh1, dh2, "d hidden")
    _close(dw1, dw2, "d head")
    assert np.all(np.asarray(dh1)[~mask] == 0)
    if name == "forward_kl_clipped":  # the case exercises both sides of the clip
        kept = np.asarray(vals1)[mask]
        assert np.any(kept >= 4.5) and np.any(kept < 4.5)
    if name in L.SAMPLED_TOKEN_LOSSES:  # and both sides of the clamp
        logp = np.asarray(L.token_logprobs(np.asarray(hs) @ ws, TARGETS, temperature=0.8))[mask]
        ratio = (TEACHER_LOGP[mask] - logp) * (1 if name == "k3" else -1)
        clamp = dict(CASES[name])["clamp"]
        assert np.any(np.abs(ratio) > clamp) and np.any(np.abs(ratio) < clamp)


def test_one_pass_gradient_by_finite_differences(inputs):
    """Direction and scale of the gradient, independently of either implementation: central differences
    of the loss along a random direction in hidden and head, in float64 arithmetic of float32 evaluations."""
    hs, ws, ht, wt, mask = inputs
    cfg = L.LossConfig(name="jsd", params=(("beta", 0.3),), chunk_size=CHUNK)
    fn = jax.jit(lambda h, w: _one_pass(cfg, h, w, ht, wt, mask, {})[0])
    dh, dw = jax.grad(fn, (0, 1))(hs, ws)
    rng = np.random.default_rng(1)
    uh, uw = rng.standard_normal(hs.shape).astype(np.float32), rng.standard_normal(ws.shape).astype(np.float32)
    eps = 1e-2
    numeric = (float(fn(hs + eps * uh, ws + eps * uw)) - float(fn(hs - eps * uh, ws - eps * uw))) / (2 * eps)
    analytic = float(np.sum(np.asarray(dh) * uh) + np.sum(np.asarray(dw) * uw))
    assert abs(numeric - analytic) < 2e-3 * max(abs(analytic), 1e-3), (numeric, analytic)


def test_one_pass_bf16(inputs):
    """bf16 operands: gradients in the operands' dtype, within bf16 rounding of the two-pass path."""
    hs, ws, ht, wt, mask = inputs
    hs, ws, ht, wt = (jnp.asarray(x, jnp.bfloat16) for x in (hs, ws, ht, wt))
    cfg = L.LossConfig(name="reverse_kl", chunk_size=CHUNK)
    grad = lambda fn: jax.value_and_grad(lambda h, w: fn(cfg, h, w, ht, wt, mask, {}), (0, 1), has_aux=True)  # noqa: E731
    (loss2, _), g2 = grad(_two_pass)(hs, ws)
    (loss1, _), g1 = grad(_one_pass)(hs, ws)
    chex.assert_type(list(g1), jnp.bfloat16)
    np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
    for a, b in zip(g1, g2):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 1e-2 * np.max(np.abs(b))


def test_other_losses_take_the_two_pass_path(inputs):
    hs, ws, ht, wt, mask = inputs
    for cfg in (L.LossConfig(name="forward_kl", vocab_chunk=16, chunk_size=CHUNK),
                L.LossConfig(name="k3", vocab_chunk=16, chunk_size=CHUNK),
                L.LossConfig(name="reverse_kl_topk", params=(("k", 4),), chunk_size=CHUNK)):
        assert not O.one_pass_applies(cfg)
        loss1, vals1 = _one_pass(cfg, hs, ws, ht, wt, mask, {})
        loss2, vals2 = _two_pass(cfg, hs, ws, ht, wt, mask, {})
        np.testing.assert_array_equal(loss1, loss2)
        np.testing.assert_array_equal(vals1, vals2)
    with pytest.raises(ValueError, match="must share"):
        _one_pass(L.LossConfig(chunk_size=CHUNK), hs, ws, ht[:, :4], wt, mask, {})


@pytest.mark.parametrize("name,two_at_least,ratio_at_most", [("forward_kl", 6, 0.75), ("k3", 4, 0.8)])
def test_one_pass_recomputes_no_logits_in_the_backward_pass(name, two_at_least, ratio_at_most):
    """Compiled matmuls of loss + gradient: the two-pass path computes the logits twice (forward, then the
    backward's recompute), the one-pass path once; per chunk 6 -> 4 [C, d] x [d, V] products for a full-vocabulary
    divergence (student and teacher logits, d hidden, d head), 4 -> 3 for a sampled-token loss. Counted as FLOPs
    in XLA's cost analysis, which counts a loop body once: several chunks (one would let XLA unroll the loops and
    merge the recompute with the forward), figures per chunk."""
    b, t, d, v, chunk = 1, 256, 32, 4096, 64
    spec = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    cfg = L.LossConfig(name=name, chunk_size=chunk)

    def flops(path):
        def loss(hs, ws, ht, wt, m, tokens, teacher_logp):
            if path == "one":
                return O.aggregated_loss(cfg, hs, ws, targets=tokens, mask=m, teacher_hidden=ht, teacher_head=wt,
                                         teacher_logp=teacher_logp)[0]
            values = L.per_token_loss(cfg, hs, ws, targets=tokens, mask=m, teacher_hidden=ht, teacher_head=wt,
                                      teacher_logp=teacher_logp)
            return L.aggregate(values, m)
        args = (spec(b, t, d), spec(d, v), spec(b, t, d), spec(d, v), spec(b, t, dtype=jnp.bool_),
                spec(b, t, dtype=jnp.int32), spec(b, t))
        analysis = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    per_matmul = 2 * chunk * d * v  # one chunk's [C, d] x [d, V] product
    two, one = flops("two"), flops("one")
    assert two >= two_at_least * per_matmul
    assert one <= ratio_at_most * two


def test_one_pass_temporary_memory_is_the_two_pass_paths():
    """Compile-only: computing the gradient in the forward pass holds no more than the two-pass path (a few
    f32 [chunk, V] tiles and the [d, V] head gradient), never [T, V]."""
    t, d, v, chunk = 2048, 32, 16384, 256
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    cfg = L.LossConfig(name="forward_kl", chunk_size=chunk)

    def temp(fn):
        def loss(hs, ws, ht, wt, m):
            return fn(cfg, hs, ws, ht, wt, m, {})[0]
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(spec(1, t, d), spec(d, v), spec(1, t, d), spec(d, v),
                                                           jax.ShapeDtypeStruct((1, t), jnp.bool_)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one, two = temp(_one_pass), temp(_two_pass)
    assert one <= 1.1 * two, (one, two)
    assert one <= 3 * chunk * v * 4, one
