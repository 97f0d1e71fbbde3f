"""trd_jax.losses against independent float64 numpy references, finite differences, Monte-Carlo
expectations and the unfused path. Small shapes; each jitted function compiles once."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trd_jax import losses as L

NEG_INF = -np.inf


# --------------------------------------------------------------------------- float64 references

def np_log_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_kl(logw, logo):
    """Σ w (log w - log o), 0 log 0 = 0."""
    w = np.exp(logw)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(w > 0, w * (logw - logo), 0.0), axis=-1)


def ref(name, s, t, temperature=1.0, **p):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    logp, logq = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
    if name == "forward_kl":
        return np_kl(logq, logp)
    if name == "reverse_kl":
        return np_kl(logp, logq)
    if name == "forward_kl_clipped":
        return np.minimum(np_kl(logq, logp), p.get("clip", 0.1))
    if name == "jsd":
        beta = p["beta"]
        if beta == 0:
            return np_kl(logq, logp)
        if beta == 1:
            return np_kl(logp, logq)
        with np.errstate(divide="ignore"):  # mixture in probability space, unlike the implementation
            logm = np.log(beta * np.exp(logq) + (1 - beta) * np.exp(logp))
        return beta * np_kl(logq, logm) + (1 - beta) * np_kl(logp, logm)
    if name == "reverse_kl_topk":
        support = np_topk_support(t, p.get("k", 32))
        s_top = np.take_along_axis(s, support, -1)
        t_top = np.take_along_axis(t, support, -1)
        s_top = np.where(np.isfinite(t_top), s_top, -np.inf)
        return np_kl(np_log_softmax(s_top / temperature), np_log_softmax(t_top / temperature))
    raise KeyError(name)


def np_topk_support(t, k):
    return np.argsort(-np.asarray(t, np.float64), axis=-1, kind="stable")[..., :k]


def np_fd_grad(f, s, eps=1e-5):
    """Central differences of a per-token numpy function f(s [..., V]) -> [...], summed over tokens. Each
    token depends only on its own row, so coordinate v is perturbed in every row at once."""
    s = np.asarray(s, np.float64)
    g = np.zeros_like(s)
    for v in range(s.shape[-1]):
        e = np.zeros(s.shape[-1])
        e[v] = eps
        g[..., v] = (f(s + e) - f(s - e)) / (2 * eps)
    return g


def softmax(x):
    return np.exp(np_log_softmax(np.asarray(x, np.float64)))


# --------------------------------------------------------------------------------------- fixtures

B, T, V = 2, 5, 11
PARAMS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "forward_kl_clipped": {"clip": 1.0},
          "reverse_kl_topk": {"k": 4}}


def _pair(seed, scale=3.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((B, T, V))).astype(np.float32), \
        (scale * rng.standard_normal((B, T, V))).astype(np.float32)


@pytest.fixture(scope="module")
def cases():
    """name -> (student, teacher, divergences for which the case is well defined)."""
    s, t = _pair(0)
    t[1] = s[1] + 0.7 * np.random.default_rng(11).standard_normal(s[1].shape).astype(np.float32)  # small KLs too
    xs, xt = _pair(1, scale=1e4)
    shared_s, shared_t = s.copy(), t.copy()
    shared_s[..., [2, 7]] = NEG_INF  # e.g. vocabulary padding: impossible under both models
    shared_t[..., [2, 7]] = NEG_INF
    tin_s, tin_t = s.copy(), t.copy()
    tin_t[..., [0, 5, 9]] = NEG_INF  # q = 0 where p > 0: forward, jsd, clipped, topk stay finite
    sin_s, sin_t = s.copy(), t.copy()
    sin_s[..., [1, 3]] = NEG_INF  # p = 0 where q > 0: reverse and jsd stay finite
    every = tuple(PARAMS)
    return {
        "random": (s, t, every),
        "extreme": (xs, xt, every),
        "shared_neg_inf": (shared_s, shared_t, every),
        "teacher_neg_inf": (tin_s, tin_t, ("forward_kl", "jsd", "forward_kl_clipped", "reverse_kl_topk")),
        "student_neg_inf": (sin_s, sin_t, ("reverse_kl", "jsd")),
    }


@pytest.fixture(scope="module")
def value_and_grad_fns():
    """name -> jitted (student, teacher, weights, temperature) -> (values, d Σ weights*values / d student)."""
    def make(name):
        def f(s, t, w, temperature):
            values = L.divergence(name, s, t, temperature=temperature, **PARAMS[name])
            return jnp.sum(w * values), values
        return jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=3)
    return {name: make(name) for name in PARAMS}


# ----------------------------------------------------------------------------- values vs numpy

@pytest.mark.parametrize("case", ["random", "extreme", "shared_neg_inf", "teacher_neg_inf", "student_neg_inf"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_values_match_numpy(cases, value_and_grad_fns, case, temperature):
    s, t, names = cases[case]
    scale = np.max(np.abs(s[np.isfinite(s)]))
    w = np.ones((B, T), np.float32)
    for name in names:
        (_, values), grad = value_and_grad_fns[name](s, t, w, temperature)
        chex.assert_shape(values, (B, T))
        chex.assert_type(values, jnp.float32)
        expected = ref(name, s, t, temperature, **PARAMS[name])
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=2e-6 * scale, err_msg=f"{name} {case}")
        assert np.all(np.isfinite(grad)), f"{name} {case}: non-finite gradient"
        assert np.all(grad[~np.isfinite(s)] == 0), f"{name} {case}: gradient on a -inf logit"


def test_bf16_inputs_give_f32_values():
    s, t = _pair(2)
    for name, p in PARAMS.items():
        out = L.divergence(name, jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), **p)
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(out, ref(name, jnp.asarray(s, jnp.bfloat16).astype(np.float32),
                                            jnp.asarray(t, jnp.bfloat16).astype(np.float32), **p), rtol=1e-5, atol=1e-5)


def test_masked_padding_is_clean(value_and_grad_fns):
    """Garbage at masked positions (all -inf rows, NaN, q = 0 where p > 0) leaks into neither the values
    nor the gradient when the mask is passed to the divergence."""
    s, t = _pair(3)
    mask = np.ones((B, T), bool)
    mask[0, 3:] = False
    mask[1, 4] = False
    s_bad, t_bad = s.copy(), t.copy()
    s_bad[0, 3] = NEG_INF
    t_bad[0, 3] = NEG_INF
    s_bad[0, 4] = np.nan
    t_bad[1, 4, :5] = NEG_INF
    s_bad[1, 4, 6:] = 1e30
    for name, p in PARAMS.items():
        def loss(s_):
            return L.aggregate(L.divergence(name, s_, t_bad, mask=mask, temperature=1.3, **p), mask)
        value, grad = jax.value_and_grad(loss)(s_bad)
        expected = np.sum(np.where(mask, ref(name, s, t, 1.3, **p), 0)) / mask.sum()
        np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=name)
        assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0), name


# ------------------------------------------------------------------------------------ gradients

def test_forward_kl_gradient_is_p_minus_q(cases, value_and_grad_fns):
    s, t, _ = cases["random"]
    w = np.random.default_rng(4).uniform(0.5, 2.0, (B, T)).astype(np.float32)
    for temperature in (1.0, 1.7):
        _, grad = value_and_grad_fns["forward_kl"](s, t, w, temperature)
        expected = w[..., None] * (softmax(s / temperature) - softmax(t / temperature)) / temperature
        np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "forward_kl_clipped", "reverse_kl_topk"])
def test_gradients_match_finite_differences(cases, value_and_grad_fns, name):
    s, t, _ = cases["random"]
    w = np.ones((B, T), np.float32)
    _, grad = value_and_grad_fns[name](s, t, w, 1.7)
    fd = np_fd_grad(lambda x: ref(name, x, t, 1.7, **PARAMS[name]), s)
    np.testing.assert_allclose(grad, fd, atol=2e-5)


def test_clipped_tokens_have_zero_gradient(cases, value_and_grad_fns):
    s, t, _ = cases["random"]
    w = np.ones((B, T), np.float32)
    (_, values), grad = value_and_grad_fns["forward_kl_clipped"](s, t, w, 1.0)
    _, grad_full = value_and_grad_fns["forward_kl"](s, t, w, 1.0)
    clipped = ref("forward_kl", s, t) >= PARAMS["forward_kl_clipped"]["clip"]
    assert 0 < clipped.sum() < clipped.size  # both kinds present
    np.testing.assert_array_equal(np.asarray(values)[clipped], PARAMS["forward_kl_clipped"]["clip"])
    assert np.all(grad[clipped] == 0)
    np.testing.assert_array_equal(grad[~clipped], grad_full[~clipped])


def test_topk_gradient_only_on_teacher_support(cases, value_and_grad_fns):
    s, t, _ = cases["random"]
    _, grad = value_and_grad_fns["reverse_kl_topk"](s, t, np.ones((B, T), np.float32), 1.0)
    on_support = np.zeros(s.shape, bool)
    np.put_along_axis(on_support, np_topk_support(t, PARAMS["reverse_kl_topk"]["k"]), True, -1)
    assert np.all(grad[~on_support] == 0)
    assert np.all(np.abs(grad[on_support]).sum(-1) > 0)


def test_teacher_gets_no_gradient(cases):
    s, t, _ = cases["random"]
    for name, p in PARAMS.items():
        grad = jax.grad(lambda t_: jnp.sum(L.divergence(name, s, t_, **p)))(t)
        assert np.all(grad == 0), name


def test_jsd_ends_are_exactly_forward_and_reverse_kl(cases):
    s, t, _ = cases["random"]
    np.testing.assert_array_equal(L.jsd(s, t, beta=0.0, temperature=1.3), L.forward_kl(s, t, temperature=1.3))
    np.testing.assert_array_equal(L.jsd(s, t, beta=1.0, temperature=1.3), L.reverse_kl(s, t, temperature=1.3))
    np.testing.assert_allclose(L.jsd(s, t, beta=0.5), L.jsd(t, s, beta=0.5), rtol=1e-6)
    # Interior values are bounded by the end KLs' mixture weights: JSD_beta <= beta(1-beta)-ish, and > 0.
    mid = np.asarray(L.jsd(s, t, beta=0.5))
    assert np.all(mid > 0) and np.all(mid <= np.log(2) + 1e-6)


def test_direction_forward_kl_is_mass_covering():
    """Bimodal teacher, student on one mode: forward KL (mass-covering) is larger than reverse KL
    (mode-seeking), and its gradient raises the student's logit on the missed mode."""
    teacher = np.log(np.array([[[0.49, 0.49, 0.01, 0.01]]], np.float32))
    student = np.log(np.array([[[0.97, 0.01, 0.01, 0.01]]], np.float32))
    fwd, rev = float(L.forward_kl(student, teacher)[0, 0]), float(L.reverse_kl(student, teacher)[0, 0])
    assert fwd > rev > 0
    descent = -np.asarray(jax.grad(lambda s: L.forward_kl(s, teacher).sum())(student))[0, 0]
    assert descent[1] > 0 and descent[0] < 0  # move mass from the covered mode to the missed one


# -------------------------------------------------------------------- sampled-token estimators

def test_token_logprobs_match_numpy(cases):
    s, _, _ = cases["random"]
    tokens = np.random.default_rng(5).integers(0, V, (B, T))
    out = L.token_logprobs(s, tokens, temperature=1.3)
    chex.assert_shape(out, (B, T))
    expected = np.take_along_axis(np_log_softmax(s / 1.3), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


MC_STUDENT = np.array([1.0, 0.2, -0.5, 0.8, -1.2, 0.0], np.float32)
MC_TEACHER = np.array([0.3, 1.1, -0.2, -0.4, 0.5, -0.9], np.float32)
MC_SAMPLES = 200_000


def _per_sample_grads(loss_fn):
    """[N, V] gradients of loss_fn(student_logp, teacher_logp) -> f32[1, N] wrt the student logits, one row
    per token sampled from the student (fixed seed)."""
    tokens = jax.random.categorical(jax.random.key(0), jnp.asarray(MC_STUDENT), shape=(1, MC_SAMPLES))
    rows = jnp.broadcast_to(MC_STUDENT, (1, MC_SAMPLES, MC_STUDENT.size))
    teacher_logp = L.token_logprobs(jnp.broadcast_to(MC_TEACHER, rows.shape), tokens)

    @jax.jit
    def grads(rows):
        return jax.grad(lambda r: jnp.sum(loss_fn(L.token_logprobs(r, tokens), teacher_logp)))(rows)[0]
    return np.asarray(grads(rows), np.float64)


def _assert_mc_mean(g, expected):
    mean, se = g.mean(0), g.std(0) / np.sqrt(len(g))
    assert np.all(np.abs(mean - expected) < 5 * se + 1e-6), (mean, expected, se)


def test_k1_policy_gradient_expectation_is_reverse_kl_gradient():
    p, q = softmax(MC_STUDENT), softmax(MC_TEACHER)
    kl = np.sum(p * np.log(p / q))
    analytic = p * (np.log(p / q) - kl)  # d KL(p || q) / d logits
    _assert_mc_mean(_per_sample_grads(lambda lp, tq: L.k1_policy_gradient(lp, tq)), analytic)
    # The PPO form on fresh samples (old == current) has the same gradient.
    _assert_mc_mean(_per_sample_grads(lambda lp, tq: L.k1_policy_gradient(lp, tq, old_logp=jax.lax.stop_gradient(lp))),
                    analytic)


def test_k1_direct_loss_has_zero_expected_gradient():
    g = _per_sample_grads(lambda lp, tq: lp - tq)
    _assert_mc_mean(g, np.zeros(MC_STUDENT.size))
    assert np.abs(g).mean() > 0.1  # not trivially zero per sample


def test_k3_direct_loss_expectation_is_forward_kl_gradient():
    _assert_mc_mean(_per_sample_grads(lambda lp, tq: L.k3(lp, tq)), softmax(MC_STUDENT) - softmax(MC_TEACHER))


def _ppo(advantage, ratio, **kw):
    old = np.full(len(advantage), np.log(0.3), np.float32)
    teacher = old + np.asarray(advantage, np.float32)  # A = -(old - teacher)
    student = old + np.log(np.asarray(ratio, np.float32))

    def f(s):
        return L.k1_policy_gradient(s[None], teacher[None], old_logp=old[None], **kw)[0]
    values = f(student)
    grads = jax.grad(lambda s: jnp.sum(f(s)))(student)
    return np.asarray(values), np.asarray(grads)


def test_ppo_ratio_clip_and_dual_clip():
    # (A, ratio) -> value, d value / d log p (= -A ratio where unclipped)
    cases = [(1.0, 1.5, -1.2, 0.0),   # A > 0, ratio above 1 + eps: clipped flat
             (1.0, 0.5, -0.5, -0.5),  # A > 0, ratio below 1 - eps: pessimistic branch keeps the gradient
             (1.0, 1.1, -1.1, -1.1),  # inside the trust region
             (-1.0, 2.0, 2.0, 2.0),   # A < 0, ratio in (1 + eps, c): unclipped
             (-1.0, 5.0, 3.0, 0.0),   # A < 0, ratio above c = 3: dual clip, flat
             (-1.0, 0.5, 0.8, 0.0)]   # A < 0, ratio below 1 - eps: clipped flat
    adv, ratio, value, grad = map(np.array, zip(*cases))
    v, g = _ppo(adv, ratio)
    np.testing.assert_allclose(v, value, rtol=1e-6)
    np.testing.assert_allclose(g, grad, rtol=1e-6, atol=1e-7)
    v, g = _ppo([-1.0], [5.0], dual_clip=None)
    np.testing.assert_allclose((v[0], g[0]), (5.0, 5.0), rtol=1e-6)
    v, _ = _ppo([25.0], [1.0])  # k1 clamped to [-10, 10]
    np.testing.assert_allclose(v, [-10.0], rtol=1e-6)


def test_tinker_form_and_k3_values():
    s = np.array([[-1.0, -2.0, -0.5]], np.float32)
    t = np.array([[-1.5, -0.5, -40.0]], np.float32)
    v, g = jax.value_and_grad(lambda x: jnp.sum(L.k1_policy_gradient(x, t)))(s)
    np.testing.assert_allclose(g, np.clip(s - t, -10, 10), rtol=1e-6)  # -A = k1 = log p - log q, clamped
    r = np.minimum(t - s, 20.0)
    np.testing.assert_allclose(L.k3(s, t), np.exp(r) - 1 - r, rtol=1e-6)
    big = np.array([[-30.0]], np.float32)  # r = 29.5 > clamp = 20: constant, zero gradient
    val, grad = jax.value_and_grad(lambda x: jnp.sum(L.k3(x, jnp.full_like(x, -0.5))))(big)
    np.testing.assert_allclose(val, np.exp(20.0) - 21.0, rtol=1e-6)
    assert grad[0, 0] == 0


# -------------------------------------------------------------------------------------- aggregate

@pytest.fixture(scope="module")
def agg_data():
    rng = np.random.default_rng(6)
    values = rng.standard_normal((4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.6
    mask[2] = False  # an empty row
    mask[0, 0] = True
    return values, mask


def np_aggregate(values, mask, mode):
    v = np.where(mask, values.astype(np.float64), 0)
    if mode == "token_mean":
        return v.sum() / max(mask.sum(), 1)
    if mode == "sum":
        return v.sum()
    rows = mask.sum(-1) > 0
    return np.sum(v.sum(-1)[rows] / mask.sum(-1)[rows]) / max(rows.sum(), 1)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "sum"])
def test_aggregate_modes(agg_data, mode):
    values, mask = agg_data
    np.testing.assert_allclose(L.aggregate(values, mask, mode), np_aggregate(values, mask, mode), rtol=1e-6)
    bad = values.copy()
    bad[~mask] = np.where(np.arange((~mask).sum()) % 2, np.nan, np.inf)
    out, grad = jax.value_and_grad(lambda v: L.aggregate(v, mask, mode))(bad)
    np.testing.assert_allclose(out, np_aggregate(values, mask, mode), rtol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(grad[~mask] == 0)
    empty = np.zeros_like(mask)
    out, grad = jax.value_and_grad(lambda v: L.aggregate(v, empty, mode))(bad)
    assert out == 0 and np.all(grad == 0)


def test_aggregate_micro_batches_sum_to_global_mean(agg_data):
    values, mask = agg_data
    num_tokens, num_rows = mask.sum(), np.any(mask, -1).sum()
    for mode in ("token_mean", "seq_mean"):
        parts = sum(L.aggregate(values[i:i + 2], mask[i:i + 2], mode, num_tokens=num_tokens, num_rows=num_rows)
                    for i in (0, 2))
        np.testing.assert_allclose(parts, L.aggregate(values, mask, mode), rtol=1e-6)


def test_registry_errors():
    s, t = _pair(7)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        L.divergence("kl", s, t)
    with pytest.raises(ValueError, match=r"'jsd' got unknown parameter\(s\) \['alpha'\]"):
        L.divergence("jsd", s, t, beta=0.5, alpha=1.0)
    with pytest.raises(ValueError, match=r"'jsd' needs parameter\(s\) \['beta'\]"):
        L.divergence("jsd", s, t)
    with pytest.raises(ValueError, match="beta must be in"):
        L.divergence("jsd", s, t, beta=1.5)
    with pytest.raises(ValueError, match="k=40"):
        L.divergence("reverse_kl_topk", s, t, k=40)
    with pytest.raises(ValueError, match="same token->id map"):
        L.forward_kl(s, t[..., :-1])
    with pytest.raises(ValueError, match="unknown mode"):
        L.aggregate(s[..., 0], np.ones((B, T), bool), "mean")
    assert set(L.DIVERGENCES) == set(PARAMS)


# ------------------------------------------------------------------------------ fused vs unfused

FB, FT, FD, FDT, FV, CHUNK = 2, 13, 16, 24, 50, 8  # T and B * T not multiples of CHUNK, V not of 16


@pytest.fixture(scope="module")
def fused_inputs():
    rng = np.random.default_rng(8)
    f = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    mask = np.arange(FT)[None] < np.array([[FT], [7]])
    return f(FB, FT, FD), f(FD, FV, scale=0.5), f(FB, FT, FDT), f(FDT, FV, scale=0.5), mask


def _rel_close(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("vocab_chunk", [None, 16])
@pytest.mark.parametrize("name", list(PARAMS))
def test_fused_matches_unfused(fused_inputs, name, vocab_chunk):
    hs, ws, ht, wt, mask = fused_inputs
    params = dict(PARAMS[name], temperature=1.3)

    def unfused(hs, ws, ht, wt):
        values = L.divergence(name, hs @ ws, ht @ wt, **params)
        return L.aggregate(values, mask), values

    def fused(hs, ws, ht, wt):
        values = L.fused_divergence(name, hs, ws, ht, wt, chunk_size=CHUNK, vocab_chunk=vocab_chunk, mask=mask,
                                    **params)
        return L.aggregate(values, mask), values

    (loss_u, vals_u), grads_u = jax.value_and_grad(unfused, (0, 1, 2, 3), has_aux=True)(hs, ws, ht, wt)
    (loss_f, vals_f), grads_f = jax.jit(jax.value_and_grad(fused, (0, 1, 2, 3), has_aux=True))(hs, ws, ht, wt)
    chex.assert_shape(vals_f, (FB, FT))
    chex.assert_type(vals_f, jnp.float32)
    _rel_close(loss_f, loss_u, "loss")
    _rel_close(np.where(mask, vals_f, 0), np.where(mask, vals_u, 0), "values")
    _rel_close(grads_f[0], grads_u[0], "d student_hidden")
    _rel_close(grads_f[1], grads_u[1], "d student_head")
    assert np.all(grads_f[2] == 0) and np.all(grads_f[3] == 0)  # teacher: constant


@pytest.mark.parametrize("vocab_chunk", [None, 16])
def test_fused_token_logprobs(fused_inputs, vocab_chunk):
    hs, ws, _, _, _ = fused_inputs
    tokens = np.random.default_rng(9).integers(0, FV, (FB, FT))
    w = np.random.default_rng(10).standard_normal((FB, FT)).astype(np.float32)

    def weighted(fn):
        return jax.value_and_grad(lambda h, k: jnp.sum(w * fn(h, k)), (0, 1))
    u, gu = weighted(lambda h, k: L.token_logprobs(h @ k, tokens, temperature=1.3))(hs, ws)
    f, gf = weighted(lambda h, k: L.fused_token_logprobs(h, k, tokens, chunk_size=CHUNK, temperature=1.3,
                                                         vocab_chunk=vocab_chunk))(hs, ws)
    _rel_close(f, u, "value")
    _rel_close(gf[0], gu[0], "d hidden")
    _rel_close(gf[1], gu[1], "d head")


def test_fused_bf16_and_masked_garbage(fused_inputs):
    """bf16 hidden states and heads: f32 values, bf16 gradients within bf16 rounding of the float32 result
    on the same (rounded) inputs, and NaN hidden states at masked positions do not leak."""
    hs, ws, ht, wt, mask = fused_inputs
    hs, ws, ht, wt = (jnp.asarray(x, jnp.bfloat16) for x in (hs, ws, ht, wt))
    hs_bad = jnp.where(mask[..., None], hs, jnp.nan)

    def loss(h, k):
        values = L.fused_divergence("reverse_kl", h, k, ht, wt, chunk_size=CHUNK, vocab_chunk=16, mask=mask)
        return L.aggregate(values, mask), values
    (value, values), (gh, gk) = jax.value_and_grad(loss, (0, 1), has_aux=True)(hs_bad, ws)
    chex.assert_type(values, jnp.float32)
    chex.assert_type([gh, gk], jnp.bfloat16)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731

    def reference(h, k):
        return L.aggregate(L.reverse_kl(h @ k, f32(ht) @ f32(wt)), mask)
    expected, (eh, ek) = jax.value_and_grad(reference, (0, 1))(f32(hs), f32(ws))
    np.testing.assert_allclose(value, expected, rtol=1e-5)  # values: float32 math on bf16 operands
    assert np.all(f32(gh)[~mask] == 0)
    for got, want in ((gh, eh), (gk, ek)):
        assert np.max(np.abs(f32(got) - want)) < 1e-2 * np.max(np.abs(want))


def test_fused_temporary_memory_is_bounded_by_the_chunk():
    """Compile-only (float32, so the CPU keeps the heads as they are): the naive loss + gradient holds
    [T, V] arrays; the fused one at most a few [chunk, V] arrays, or [chunk, vocab_chunk] ones when tiled."""
    t, d, v, chunk, vocab_chunk = 2048, 32, 16384, 256, 2048
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    args = (spec(1, t, d), spec(d, v), spec(1, t, d), spec(d, v), jax.ShapeDtypeStruct((1, t), jnp.bool_))

    def temp(values_fn):
        def loss(hs, ws, ht, wt, m):
            return L.aggregate(values_fn(hs, ws, ht, wt), m)
        return jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    naive = temp(lambda hs, ws, ht, wt: L.forward_kl(hs @ ws, ht @ wt))
    fused = temp(lambda *a: L.fused_divergence("forward_kl", *a, chunk_size=chunk))
    tiled = temp(lambda *a: L.fused_divergence("forward_kl", *a, chunk_size=chunk, vocab_chunk=vocab_chunk))
    assert naive >= 2 * t * v * 4  # student and teacher logits at least
    assert fused <= 3 * chunk * v * 4, fused
    assert tiled <= 3 * chunk * vocab_chunk * 4, tiled


def test_loss_table_matches_the_functions_and_the_config():
    """LOSSES is the one table: every keyword parameter of each loss function (but the shared mask,
    temperature and behaviour log-probs) has a config field under `loss.`, and every field it names exists."""
    import inspect

    from trd_jax.config_defaults import base_config

    known = base_config().loss
    for name, loss in L.LOSSES.items():
        sig = inspect.signature(loss.fn).parameters
        own = {p for p, v in sig.items() if v.kind is v.KEYWORD_ONLY} - {"mask", "temperature", "old_logp"}
        assert set(loss.fields) == own, name
        assert all(field in known for field in loss.fields.values()), name
        assert loss.kind in ("full_vocab", "sampled_token")
    assert set(L.FULL_VOCAB_LOSSES) | set(L.SAMPLED_TOKEN_LOSSES) == set(L.LOSSES)
    with pytest.raises(ValueError, match="expected one of"):
        L.LossConfig(name="kl")
