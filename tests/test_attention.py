"""Blockwise (flash) attention against a numpy reference and the dense kernel: forward, custom VJP (against
autodiff of the dense kernel and finite differences), masking (causal by slot, padding, cache offsets), tiles
that do not divide the lengths, and the whole model with either kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trd_jax.models.attention import blockwise_attention, dense_attention, dense_mask
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer, causal_lm_positions, init_cache, with_runtime


def numpy_attention(q, k, v, key_mask, query_start):
    """float64 reference: softmax over the visible slots; rows that see nothing are None."""
    b, kh, g, t, d = q.shape
    out = np.zeros(q.shape)
    seen = np.zeros((b, t), bool)
    for bi in range(b):
        for ti in range(t):
            visible = key_mask[bi] & (np.arange(k.shape[2]) <= query_start + ti)
            seen[bi, ti] = visible.any()
            if not visible.any():
                continue
            for ki in range(kh):
                for gi in range(g):
                    s = k[bi, ki][visible] @ q[bi, ki, gi, ti] / np.sqrt(d)
                    p = np.exp(s - s.max())
                    out[bi, ki, gi, ti] = (p / p.sum()) @ v[bi, ki][visible]
    return out, seen


def _inputs(seed, b, kh, g, t, s, d, dead_prefix=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape) for shape in ((b, kh, g, t, d), (b, kh, s, d), (b, kh, s, d)))
    key_mask = rng.random((b, s)) > 0.25
    key_mask[:, :dead_prefix] = False  # left padding: the first queries of a prefill see nothing
    return q, k, v, key_mask


CASES = [  # (t, s, query_start, block_q, block_k, dead_prefix)
    (13, 13, 0, 4, 5, 0),  # training: keys are the queries; tiles divide neither length
    (9, 24, 0, 4, 8, 3),  # prefill into a longer cache, left padding
    (7, 30, 11, 3, 4, 0),  # queries in the middle of a cache (refine continuation)
    (16, 16, 0, 16, 16, 0),  # one tile
    (5, 40, 35, 512, 512, 0),  # tiles larger than the lengths
]


@pytest.mark.parametrize("t,s,start,bq,bk,dead", CASES)
def test_forward_matches_numpy(t, s, start, bq, bk, dead):
    q, k, v, key_mask = _inputs(t * s, 2, 2, 3, t, s, 8, dead)
    want, seen = numpy_attention(q, k, v, key_mask, start)
    got = np.asarray(blockwise_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(key_mask),
                                         start, block_q=bq, block_k=bk))
    np.testing.assert_allclose(got[:, :, :, seen.all(0)], want[:, :, :, seen.all(0)], atol=2e-6)
    assert np.all(got.transpose(0, 3, 1, 2, 4)[~seen] == 0)  # padding queries: zeros, not NaN
    dense = dense_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), dense_mask(jnp.asarray(key_mask),
                                                                                           start, t))
    np.testing.assert_allclose(np.asarray(dense)[:, :, :, seen.all(0)], want[:, :, :, seen.all(0)], atol=2e-6)


@pytest.mark.parametrize("t,s,start,bq,bk,dead", CASES[:3])
def test_gradients_match_dense(t, s, start, bq, bk, dead):
    q, k, v, key_mask = (jnp.asarray(a, jnp.float32) if a.dtype != bool else jnp.asarray(a)
                         for a in _inputs(7 + t, 2, 2, 2, t, s, 8, dead))
    mask = dense_mask(key_mask, start, t)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * mask.any(-1)[:, None, None, :,
                                                                                                   None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)

    want = jax.grad(loss(lambda q, k, v: dense_attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    flash = loss(lambda q, k, v: blockwise_attention(q, k, v, key_mask, start, block_q=bq, block_k=bk))
    got = jax.jit(jax.grad(flash, argnums=(0, 1, 2)))(q, k, v)
    for name, w, g in zip("qkv", want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")
        assert float(jnp.abs(w).max()) > 0.1, f"d{name} is trivially zero"


def test_vjp_matches_finite_differences():
    """The custom VJP against central differences in float64 along random directions."""
    with jax.enable_x64():
        q, k, v, key_mask = _inputs(3, 1, 1, 2, 6, 10, 4, 2)
        q, k, v = (jnp.asarray(a, jnp.float64) for a in (q, k, v))
        key_mask = jnp.asarray(key_mask)
        weight = jnp.asarray(np.random.default_rng(4).normal(size=q.shape))

        def f(q, k, v):
            return jnp.sum(blockwise_attention(q, k, v, key_mask, 4, block_q=4, block_k=3) * weight)

        grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
        rng = np.random.default_rng(5)
        for i, x in enumerate((q, k, v)):
            direction = jnp.asarray(rng.normal(size=x.shape))
            args = [q, k, v]
            eps = 1e-6
            args[i] = x + eps * direction
            up = f(*args)
            args[i] = x - eps * direction
            numeric = (up - f(*args)) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(grads[i], direction)), float(numeric), rtol=1e-6, atol=1e-9)


def test_bf16_close_to_f32():
    q, k, v, key_mask = _inputs(11, 1, 2, 2, 64, 64, 16)
    f32 = blockwise_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(key_mask), 0,
                              block_q=16, block_k=16)
    bf16 = blockwise_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), jnp.asarray(key_mask), 0,
                               block_q=16, block_k=16)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), atol=3e-2)


def test_blockwise_compiles_to_a_fraction_of_dense_memory():
    """The point of the kernel: XLA's own accounting of temporaries for a 2048-token forward and backward."""
    t, kh, g, d = 2048, 2, 2, 16
    q = jax.ShapeDtypeStruct((1, kh, g, t, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, kh, t, d), jnp.float32)
    key_mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)

    def temp(fn):
        grad = jax.grad(lambda q, k, v, m: jnp.sum(fn(q, k, v, m)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, kv, kv, key_mask).compile().memory_analysis().temp_size_in_bytes

    dense = temp(lambda q, k, v, m: dense_attention(q, k, v, dense_mask(m, 0, t)))
    flash = temp(lambda q, k, v, m: blockwise_attention(q, k, v, m, 0, block_q=256, block_k=256))
    scores = kh * g * t * t * 4
    assert dense >= scores  # the f32 scores exist
    assert flash < scores / 8, (flash, dense)


@pytest.fixture(scope="module")
def models():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, qk_norm=True)
    dense = Transformer(cfg, rngs=nnx.Rngs(0))
    graph, params = nnx.split(dense)
    flash = with_runtime(nnx.merge(graph, params), attention="blockwise", attention_block=4)
    return dense, flash


@pytest.mark.slow
def test_model_logits_and_gradients_equal(models):
    dense, flash = models
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 11)))
    mask = jnp.asarray(np.arange(11)[None] < np.array([[11], [7]]))  # right padding on row 1
    positions = causal_lm_positions(mask)

    def loss(model):
        hidden, _ = model(tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], model.logits(hidden), 0.0) ** 2) * 1e-3

    values = [nnx.value_and_grad(loss)(m) for m in (dense, flash)]
    np.testing.assert_allclose(float(values[1][0]), float(values[0][0]), rtol=1e-5)
    for (path, want), (_, got) in zip(nnx.to_flat_state(values[0][1]), nnx.to_flat_state(values[1][1])):
        np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), atol=1e-5, err_msg=str(path))


def test_model_prefill_then_decode_equal(models):
    """Left-padded prefill into a cache (blockwise) and then a one-token decode step (dense in both)."""
    dense, flash = models
    rng = np.random.default_rng(1)
    prompts = jnp.asarray(rng.integers(0, 50, (2, 9)))
    key_mask = jnp.asarray(np.arange(16)[None] >= np.array([[0], [3]]))  # row 1: 3 pad slots
    positions = jnp.maximum(jnp.arange(9)[None] - jnp.array([[0], [3]]), 0)
    outs = []
    for model in (dense, flash):
        hidden, cache = model(prompts, positions, key_mask, cache=init_cache(model.cfg, 2, 16), cache_index=0)
        step, _ = model(jnp.asarray([[3], [4]]), positions[:, -1:] + 1, key_mask, cache=cache, cache_index=9)
        outs.append((hidden, cache, step))
    np.testing.assert_allclose(np.asarray(outs[1][0][0]), np.asarray(outs[0][0][0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs[1][0][1, 3:]), np.asarray(outs[0][0][1, 3:]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs[1][2]), np.asarray(outs[0][2]), atol=1e-5)
    for layer_d, layer_f in zip(outs[0][1], outs[1][1]):  # valid slots of the written caches
        np.testing.assert_allclose(np.asarray(layer_f.k[1, :, 3:9]), np.asarray(layer_d.k[1, :, 3:9]), atol=1e-5)


def test_config_selects_the_kernel_per_model():
    from trd_jax.config import ConfigError, base_config, resolve

    cfg = base_config()
    cfg.teacher.attention, cfg.teacher.attention_block = "blockwise", 256
    s = resolve(cfg)
    assert (s.teacher.attention, s.teacher.attention_block) == ("blockwise", 256)
    assert s.student.attention == "dense"
    cfg.student.attention = "flash"
    with pytest.raises(ConfigError, match="student.attention"):
        resolve(cfg)
    cfg.student.attention, cfg.student.attention_block = "blockwise", 0
    with pytest.raises(ConfigError, match="student.attention_block"):
        resolve(cfg)


@pytest.mark.parametrize("n", [1, 2])  # n == 1: the blockwise prefill writes straight into the full cache
def test_sampler_draws_the_same_tokens_with_either_kernel(models, n):
    from trd_jax.sampling import Sampler, SamplingConfig

    dense, flash = models
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    outs = []
    for model in (dense, flash):
        graph, params = nnx.split(model)
        outs.append(Sampler(graph, pad_id=0)(params, prompts, 10, sampling=SamplingConfig(1.0), n=n,
                                             key=jax.random.key(3), eos_ids=()))
    np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
    np.testing.assert_allclose(outs[1].logprobs, outs[0].logprobs, atol=1e-5)


# ------------------------------------------------------------ fused: jax.nn.dot_product_attention (cuDNN on GPU)

def _layout_mask(t, pads, lengths):
    """Each row [pad | valid | right padding]: one contiguous run of keys, as a layout's rows are."""
    return np.stack([(np.arange(t) >= p) & (np.arange(t) < p + n) for p, n in zip(pads, lengths)])


def test_fused_matches_numpy_and_dense_gradients():
    """The rotation to right padding and back: rows left-padded, right-padded, both, full and empty; GQA groups.
    Valid queries: the numpy reference and the dense kernel's gradients; padding queries: zeros."""
    from trd_jax.models.attention import fused_attention

    t = 9
    key_mask = _layout_mask(t, pads=(0, 3, 2, 0, 0), lengths=(9, 6, 4, 5, 0))
    q, k, v, _ = _inputs(7, 5, 2, 3, t, t, 8)
    got = np.asarray(jax.jit(fused_attention)(q, k, v, key_mask))
    want, seen = numpy_attention(q, k, v, key_mask, 0)
    valid = seen & key_mask
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2, 4)[valid], want.transpose(0, 3, 1, 2, 4)[valid], atol=1e-5)
    assert np.all(got.transpose(0, 3, 1, 2, 4)[~key_mask] == 0)
    w = np.random.default_rng(8).normal(size=q.shape) * key_mask[:, None, None, :, None]  # read valid queries only

    def loss(fn):
        return jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), (0, 1, 2))(q, k, v)
    for got_g, want_g in zip(loss(lambda q, k, v: fused_attention(q, k, v, key_mask)),
                             loss(lambda q, k, v: dense_attention(q, k, v, dense_mask(key_mask, 0, t)))):
        np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), atol=1e-5)


def test_model_with_fused_attention_matches_dense_under_remat(models):
    """The update's forward (no cache, remat "full") with attention="fused": the dense model's loss and gradients on
    a layout's rows (left-padded contexts, right-padded responses); prefill into a cache stays blockwise."""
    dense, _ = models
    graph, params = nnx.split(dense)
    fused = with_runtime(nnx.merge(graph, params), attention="fused", remat="full")
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 50, (3, 12)))
    mask = jnp.asarray(_layout_mask(12, pads=(0, 4, 2), lengths=(12, 5, 7)))
    positions = causal_lm_positions(mask)

    def loss(model):
        hidden, _ = model(tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], model.logits(hidden), 0.0) ** 2) * 1e-3

    (want, g_want), (got, g_got) = (nnx.value_and_grad(loss)(m) for m in (dense, fused))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_want), nnx.to_flat_state(g_got)):
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=1e-5, err_msg=str(path))
    assert fused.cfg.blockwise_prefill and not dense.cfg.blockwise_prefill
