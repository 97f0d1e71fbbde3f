"""Stored top-k teacher targets (trd_jax/offline/topk.py): extraction against numpy; the (k + 1)-bucket
divergences equal the full-vocabulary losses, values and gradients, when k covers the vocabulary; against a
numpy reference of the bucket projection for k < V, where forward KL is a lower bound of the full one;
masking; refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trd_jax import losses
from trd_jax.offline.topk import TopKTargets, teacher_topk, topk_divergence

B, T, D, V = 2, 5, 8, 12
TAU = 0.8


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    mask = np.ones((B, T), bool)
    mask[1, 3:] = False
    return dict(s_hidden=f(B, T, D), s_head=f(D, V) * 2.0, t_hidden=f(B, T, D), t_head=f(D, V) * 2.0,
                tokens=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32), mask=jnp.asarray(mask))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_teacher_topk_against_numpy(data):
    k = 4
    got = teacher_topk(data["t_hidden"], data["t_head"], data["tokens"], data["mask"], k=k, temperature=TAU,
                       chunk_size=3)
    logq = _log_softmax(np.asarray(data["t_hidden"] @ data["t_head"], np.float64) / TAU)
    mask = np.asarray(data["mask"])
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                assert got.logp[b, t].tolist() == [0.0] * k and got.tail[b, t] == 0 and got.token_logp[b, t] == 0
                continue
            order = np.argsort(-logq[b, t], kind="stable")[:k]
            assert got.ids[b, t].tolist() == order.tolist()
            np.testing.assert_allclose(got.logp[b, t], logq[b, t, order], atol=1e-5)
            rest = np.delete(logq[b, t], order)
            np.testing.assert_allclose(got.tail[b, t], np.log(np.exp(rest).sum()), atol=1e-5)
            np.testing.assert_allclose(got.token_logp[b, t], logq[b, t, int(data["tokens"][b, t])], atol=1e-5)
    full = teacher_topk(data["t_hidden"], data["t_head"], data["tokens"], data["mask"], k=V, temperature=TAU)
    assert np.all(np.isneginf(np.asarray(full.tail)[mask]))
    with pytest.raises(ValueError, match="k=13"):
        teacher_topk(data["t_hidden"], data["t_head"], data["tokens"], data["mask"], k=V + 1)


FULL = {"forward_kl": ({}, losses.forward_kl), "reverse_kl": ({}, losses.reverse_kl),
        "jsd": ({"beta": 0.5}, lambda s, t, **kw: losses.jsd(s, t, beta=0.5, **kw)),
        "forward_kl_clipped": ({"clip": 0.5}, lambda s, t, **kw: losses.forward_kl_clipped(s, t, clip=0.5, **kw))}


@pytest.mark.parametrize("name", list(FULL))
def test_full_vocabulary_targets_give_the_full_loss_and_its_gradient(data, name):
    params, reference = FULL[name]
    targets = teacher_topk(data["t_hidden"], data["t_head"], data["tokens"], data["mask"], k=V, temperature=TAU)
    mask = data["mask"]

    def ours(h, w):
        values = topk_divergence(name, h, w, targets, mask=mask, temperature=TAU, chunk_size=4, **params)
        return values.sum(), values

    def theirs(h, w):
        values = reference(h @ w, data["t_hidden"] @ data["t_head"], temperature=TAU, mask=mask)
        return values.sum(), values

    (_, got), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(data["s_hidden"], data["s_head"])
    (_, want), want_grads = jax.value_and_grad(theirs, argnums=(0, 1), has_aux=True)(data["s_hidden"], data["s_head"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.asarray(got)[~np.asarray(mask)] == 0)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(grads[0])[~np.asarray(mask)] == 0)  # masked positions get no gradient


@pytest.mark.parametrize("k", [3, V - 1])
def test_top_k_buckets_against_numpy_and_a_lower_bound_of_forward_kl(data, k):
    targets = teacher_topk(data["t_hidden"], data["t_head"], data["tokens"], data["mask"], k=k, temperature=TAU)
    mask = np.asarray(data["mask"])
    logp = _log_softmax(np.asarray(data["s_hidden"] @ data["s_head"], np.float64) / TAU)
    logq = _log_softmax(np.asarray(data["t_hidden"] @ data["t_head"], np.float64) / TAU)
    got = {name: np.asarray(topk_divergence(name, data["s_hidden"], data["s_head"], targets, mask=data["mask"],
                                            temperature=TAU, chunk_size=3))
           for name in ("forward_kl", "reverse_kl")}
    for b, t in zip(*np.nonzero(mask)):
        ids = np.asarray(targets.ids[b, t])
        p = np.exp(np.append(logp[b, t, ids], np.log(np.exp(np.delete(logp[b, t], ids)).sum())))
        q = np.exp(np.append(logq[b, t, ids], np.log(np.exp(np.delete(logq[b, t], ids)).sum())))
        np.testing.assert_allclose(got["forward_kl"][b, t], np.sum(q * np.log(q / p)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["reverse_kl"][b, t], np.sum(p * np.log(p / q)), rtol=1e-4, atol=1e-6)
    full = np.sum(np.exp(logq) * (logq - logp), axis=-1)
    if k == V - 1:  # a one-token tail loses nothing
        np.testing.assert_allclose(got["forward_kl"][mask], full[mask], rtol=1e-4)
    else:
        assert np.all(got["forward_kl"][mask] <= full[mask] + 1e-6)
        assert np.any(got["forward_kl"][mask] < full[mask] - 1e-4)


def test_losses_the_targets_cannot_serve_are_refused(data):
    targets = TopKTargets(*(jnp.zeros((B, T, 2), jnp.int32), jnp.zeros((B, T, 2)), jnp.zeros((B, T)),
                            jnp.zeros((B, T))))
    with pytest.raises(ValueError, match="loss.name='reverse_kl_topk'"):
        topk_divergence("reverse_kl_topk", data["s_hidden"], data["s_head"], targets, mask=data["mask"])
