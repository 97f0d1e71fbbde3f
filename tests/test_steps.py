"""Score and update steps: loss against the unfused reference, gradient accumulation, non-finite skip,
EMA, sampled-token losses, and 1 device vs 8 fake devices."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers.step_inputs import step_inputs
from trd_jax import losses
from trd_jax.layouts import Layout, distill_batch
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.roles import teacher_weights
from trd_jax.sharding import MeshConfig, make_mesh
from trd_jax.losses import LossConfig
from trd_jax.steps import (OptimConfig, TeacherSignal, UpdateBatch, init_state, jit_update, make_optimizer, score,
                           shardings_of, to_micro_batches, update)

V = 97
STUDENT = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8)
TEACHER = STUDENT.replace(hidden_size=48, num_heads=6, num_kv_heads=3, tie_word_embeddings=True)
RNG = np.random.default_rng(0)
PROMPTS = [list(RNG.integers(1, V, n)) for n in (3, 7, 5, 2)]
RESPONSES = [list(RNG.integers(1, V, n)) for n in (6, 1, 9, 4)]
CONTEXTS = [list(RNG.integers(1, V, n)) for n in (12, 4, 9, 15)]  # e.g. refine prompts


def split(cfg, seed):
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


@pytest.fixture(scope="module")
def setup():
    s_graph, s_params = split(STUDENT, 0)
    t_graph, t_params = split(TEACHER, 1)
    batch = distill_batch(PROMPTS, RESPONSES, CONTEXTS)
    inputs = step_inputs(batch, t_graph, t_params)
    inputs["t_head"] = inputs.pop("head")
    return dict(s_graph=s_graph, s_params=s_params, t_graph=t_graph, t_params=t_params, batch=batch, **inputs)


def micro(x, m=1):
    """[B, ...] -> [m, B / m, ...]."""
    return jax.tree.map(lambda a: None if a is None else a.reshape((m, a.shape[0] // m) + a.shape[1:]), x)


def naive_loss(s_graph, params, setup, name, **kw):
    """Unfused reference: full logits of both models on their own layouts, response slices, divergence."""
    b = setup["batch"]
    st = nnx.merge(s_graph, params)
    te = nnx.merge(setup["t_graph"], setup["t_params"])
    h_s, _ = st(*setup["student"].inputs())
    h_t, _ = te(*setup["teacher"].inputs())
    cs, ct, r = b.student.context_width, b.teacher.context_width, b.targets.shape[1]
    ls = st.logits(h_s)[:, cs - 1:cs - 1 + r]
    lt = te.logits(h_t)[:, ct - 1:ct - 1 + r]
    values = losses.divergence(name, ls, lt, **kw)
    return losses.aggregate(values, setup["mask"], "token_mean")


def run_update(setup, cfg, m=1, opt=None, state=None, teacher_hidden=None, **kw):
    opt = opt or optax.sgd(1.0)
    state = state or init_state(setup["s_params"], opt)
    th = setup["scored"].hidden if teacher_hidden is None else teacher_hidden
    fn = jax.jit(update, static_argnames=("graphdef", "optimizer", "cfg", "ema_decay",
                                          "teacher_head_source"))
    batch = UpdateBatch(micro(setup["student"], m), micro(setup["targets"], m), micro(setup["mask"], m))
    teacher = TeacherSignal(micro(th, m), setup["t_head"], micro(setup["scored"].logp, m))
    return fn(state, batch, teacher, graphdef=setup["s_graph"], optimizer=opt, cfg=cfg, **kw)


def test_score_logprobs_match_full_logits(setup):
    b = setup["batch"]
    te = nnx.merge(setup["t_graph"], setup["t_params"])
    h, _ = te(*setup["teacher"].inputs())
    c, r = b.teacher.context_width, b.targets.shape[1]
    full = jax.nn.log_softmax(te.logits(h)[:, c - 1:c - 1 + r], axis=-1)
    expected = np.take_along_axis(np.asarray(full), b.targets[..., None], axis=-1)[..., 0] * b.response_mask
    np.testing.assert_allclose(setup["scored"].logp, expected, atol=1e-5)
    chex.assert_shape(setup["scored"].hidden, (4, r, TEACHER.hidden_size))
    chex.assert_shape(setup["scored"].logp, (4, r))
    chex.assert_type([setup["scored"].hidden, setup["scored"].logp], [jnp.float32, jnp.float32])


@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}),
                                         ("forward_kl_clipped", {"clip": 0.1}), ("reverse_kl_topk", {"k": 8})])
def test_update_loss_and_gradient_match_unfused(setup, name, params):
    """With SGD(lr=1), new params = params - grad: the step's loss and gradient equal the naive ones."""
    cfg = LossConfig(name, tuple(params.items()), chunk_size=4)
    state, metrics = run_update(setup, cfg)
    ref_loss, ref_grad = jax.value_and_grad(lambda p: naive_loss(setup["s_graph"], p, setup, name, **params))(
        setup["s_params"])
    np.testing.assert_allclose(metrics.loss, ref_loss, rtol=1e-5)
    got = jax.tree.map(lambda old, new: old - new, setup["s_params"], state.params)
    chex.assert_trees_all_close(got, ref_grad, atol=1e-6, rtol=1e-4)
    chex.assert_shape([metrics.loss, metrics.grad_norm], [(), ()])
    chex.assert_shape(metrics.per_token, (1,) + np.shape(setup["mask"]))  # [M, b, T]
    chex.assert_type([metrics.num_tokens, metrics.skipped], [jnp.int32, jnp.bool_])
    assert int(metrics.num_tokens) == sum(len(y) for y in RESPONSES)
    assert int(state.step) == 1 and int(state.skipped) == 0


def test_gradient_accumulation_equals_one_big_batch(setup):
    """2 micro-batches of 2 rows = 1 batch of 4 rows: a global token mean, not a mean of means."""
    opt = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10))
    cfg = LossConfig("forward_kl", chunk_size=4)
    one, m1 = run_update(setup, cfg, m=1, opt=opt)
    two, m2 = run_update(setup, cfg, m=2, opt=opt)
    np.testing.assert_allclose(m1.loss, m2.loss, rtol=1e-6)
    np.testing.assert_allclose(m1.grad_norm, m2.grad_norm, rtol=1e-5)
    chex.assert_trees_all_close(one.params, two.params, atol=1e-7, rtol=1e-5)


def test_non_finite_loss_skips_the_update(setup):
    opt = make_optimizer(OptimConfig(learning_rate=1e-2))
    state = init_state(setup["s_params"], opt)
    bad = setup["scored"].hidden.at[0, 0].set(jnp.nan)  # a real (unmasked) response position
    new, metrics = run_update(setup, LossConfig(chunk_size=4), opt=opt, state=state, teacher_hidden=bad)
    assert bool(metrics.skipped) and not np.isfinite(float(metrics.loss))
    assert int(new.skipped) == 1 and int(new.step) == 0
    chex.assert_trees_all_equal(new.params, setup["s_params"])
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)


def test_nan_in_masked_positions_does_not_leak(setup):
    mask = np.asarray(setup["mask"])
    row, col = np.argwhere(~mask)[0]
    bad = setup["scored"].hidden.at[row, col].set(jnp.nan)
    _, clean = run_update(setup, LossConfig(chunk_size=4))
    _, metrics = run_update(setup, LossConfig(chunk_size=4), teacher_hidden=bad)
    assert not bool(metrics.skipped)
    np.testing.assert_allclose(metrics.loss, clean.loss, rtol=1e-6)


def test_ema_params(setup):
    opt = optax.sgd(1.0)
    state = init_state(setup["s_params"], opt, ema=True)
    new, _ = run_update(setup, LossConfig(chunk_size=4), opt=opt, state=state, ema_decay=0.75)
    expected = jax.tree.map(lambda p0, p1: 0.75 * p0 + 0.25 * p1, setup["s_params"], new.params)
    chex.assert_trees_all_close(new.ema_params, expected, rtol=1e-6, atol=1e-7)


def test_opsd_teacher_modes(setup):
    """initial stays frozen while the student moves; live follows it; ema needs an EMA state."""
    opt = optax.sgd(1.0)
    initial = setup["s_params"]
    state, _ = run_update(setup, LossConfig(chunk_size=4), opt=opt, state=init_state(initial, opt, ema=True),
                          ema_decay=0.5)
    leaf = lambda t: jax.tree.leaves(t)[0]  # noqa: E731
    assert leaf(teacher_weights("initial", state, initial)) is leaf(initial)
    assert leaf(teacher_weights("live", state, initial)) is leaf(state.params)
    assert leaf(teacher_weights("ema", state, initial)) is leaf(state.ema_params)
    assert not np.allclose(leaf(state.params), leaf(initial))
    with pytest.raises(ValueError, match="ema=True"):
        teacher_weights("ema", init_state(initial, opt), initial)
    with pytest.raises(ValueError, match="expected one of"):
        teacher_weights("frozen", state, initial)
    # score never differentiates into the teacher: live-teacher gradients stay those of the loss alone
    g = jax.grad(lambda p: score(setup["s_graph"], p, setup["student"], setup["targets"],
                                 setup["mask"]).logp.sum())(initial)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


@pytest.mark.parametrize("name", ["k1_policy_gradient", "k3"])
def test_sampled_token_losses(setup, name):
    """The step's estimators see the same token log-probs as a direct computation on full logits."""
    cfg = LossConfig(name, chunk_size=4)
    st = nnx.merge(setup["s_graph"], setup["s_params"])
    b = setup["batch"]
    h, _ = st(*setup["student"].inputs())
    c, r = b.student.context_width, b.targets.shape[1]
    logp = jax.nn.log_softmax(st.logits(h)[:, c - 1:c - 1 + r], axis=-1)
    s_logp = jnp.take_along_axis(logp, setup["targets"][..., None], axis=-1)[..., 0]
    if name == "k1_policy_gradient":
        values = losses.k1_policy_gradient(s_logp, setup["scored"].logp, mask=setup["mask"])  # on-policy form
    else:
        values = losses.k3(s_logp, setup["scored"].logp, mask=setup["mask"])
    expected = losses.aggregate(values, setup["mask"])
    state, metrics = run_update(setup, cfg)
    np.testing.assert_allclose(metrics.loss, expected, rtol=1e-5, atol=1e-7)
    assert np.isfinite(float(metrics.grad_norm)) and float(metrics.grad_norm) > 0


def test_one_device_and_eight_fake_devices_agree():
    """Same loss, gradient norm and updated parameters on a 1-device mesh and a 2x2x2 mesh."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = os.path.join(os.path.dirname(__file__), "helpers", "sharded_step_check.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MATCH" in out.stdout, out.stdout


def test_donated_step_with_live_teacher_keeps_callers_arrays(setup):
    """OPSD with the live student as teacher through the donated jit_update: the teacher head is read
    from the state inside the step (an argument aliasing the donated state would be invalid), the
    caller's initial params survive the donation, and with the same context the loss is 0."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    opt = optax.sgd(0.1)
    initial = setup["s_params"]
    state = init_state(initial, opt)
    scored = score(setup["s_graph"], teacher_weights("live", state, initial), setup["student"], setup["targets"],
                   setup["mask"])
    step = jit_update(setup["s_graph"], opt, LossConfig(chunk_size=4), shardings_of(state), mesh,
                      teacher_head_source="live")
    seq, targets, mask, hidden, logp = to_micro_batches(
        (setup["student"], setup["targets"], setup["mask"], scored.hidden, scored.logp), 1, mesh)
    new, metrics = step(state, UpdateBatch(seq, targets, mask), TeacherSignal(hidden, None, logp))
    assert abs(float(metrics.loss)) < 1e-6 and not bool(metrics.skipped)
    chex.assert_trees_all_equal_shapes_and_dtypes(new.params, initial)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(initial))  # not donated away
    with pytest.raises(ValueError, match="0 < ema_decay < 1"):
        run_update(setup, LossConfig(chunk_size=4), opt=opt, state=init_state(initial, opt, ema=True))


def test_the_update_compiles_once_per_shape(setup, monkeypatch):
    """Steps with the same shapes reuse jit_update's compiled step (update traced once); another context width is
    one more trace, not one per step."""
    from trd_jax import steps

    monkeypatch.setattr(steps, "update", chex.assert_max_traces(steps.update, n=2))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    opt = optax.sgd(0.1)
    state = init_state(jax.tree.map(jnp.copy, setup["s_params"]), opt)
    # Placed, as init_sharded_state places it: a first state of uncommitted arrays would trace the step again
    # on the second call, whose state is the (committed) output of the first.
    state = jax.device_put(state, shardings_of(state))
    step = jit_update(setup["s_graph"], opt, LossConfig(chunk_size=4), shardings_of(state), mesh)
    seq, targets, mask, hidden, logp = to_micro_batches(
        (setup["student"], setup["targets"], setup["mask"], setup["scored"].hidden, setup["scored"].logp), 1, mesh)
    teacher = TeacherSignal(hidden, setup["t_head"], logp)
    for _ in range(3):
        state, _ = step(state, UpdateBatch(seq, targets, mask), teacher)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (4, 0)))  # noqa: E731  4 more context columns, masked
    wider = Layout(pad(seq.tokens), pad(seq.positions), pad(seq.mask), seq.context_width + 4)
    state, metrics = step(state, UpdateBatch(wider, targets, mask), teacher)  # the second and last trace
    assert int(state.step) == 4 and np.isfinite(float(metrics.loss))
    with pytest.raises(AssertionError, match="traced > 2 times"):
        narrower = Layout(wider.tokens[..., 2:], wider.positions[..., 2:], wider.mask[..., 2:],
                          wider.context_width - 2)
        step(state, UpdateBatch(narrower, targets, mask), teacher)
