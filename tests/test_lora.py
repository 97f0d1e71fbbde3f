"""LoRA (trd_jax/models/lora.py) in the model and the update step: B = 0 leaves the logits unchanged, adapters
shard like their base matrices, merged equals unmerged, only adapters get gradients and optimizer state, the
frozen base is neither updated nor donated, dropout, and the config section's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from helpers.step_inputs import step_inputs
from trd_jax.config import ConfigError, base_config, resolve
from trd_jax.layouts import distill_batch
from trd_jax.models import lora
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer, with_runtime
from trd_jax.sharding import MESH_AXES, logical_to_spec
from trd_jax.losses import LossConfig
from trd_jax.steps import (OptimConfig, TeacherSignal, UpdateBatch, init_state, jit_update, make_optimizer,
                           shardings_of, update)

V = 97
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, qk_norm=True, tie_word_embeddings=True)
LORA = lora.LoRAConfig(rank=4, alpha=8.0)
RNG = np.random.default_rng(0)
PROMPTS = [list(RNG.integers(1, V, n)) for n in (3, 7, 5, 2)]
RESPONSES = [list(RNG.integers(1, V, n)) for n in (6, 1, 9, 4)]
CONTEXTS = [list(RNG.integers(1, V, n)) for n in (12, 4, 9, 15)]


def logits(graphdef, *states, seq):
    model = nnx.merge(graphdef, *states)
    return model.logits(model(seq.tokens, seq.positions, seq.mask)[0])


def randomized(adapters, seed, scale=0.1):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    plain_graph, plain_params = nnx.split(model)
    lora.add_lora(model, LORA, rngs=nnx.Rngs(1))
    graph, adapters, base = lora.split_lora(model)
    batch = distill_batch(PROMPTS, RESPONSES, CONTEXTS)
    # OPSD's initial teacher: the plain graph over the base (adapters off).
    return dict(plain_graph=plain_graph, plain_params=plain_params, graph=graph, adapters=adapters, base=base,
                batch=batch, **step_inputs(batch, plain_graph, base))


_UPDATE = jax.jit(update, static_argnames=("graphdef", "optimizer", "cfg", "ema_decay",
                                           "teacher_head_source"))


def lora_update(setup, state, opt, **kw):
    m = lambda x: None if x is None else x[None]  # noqa: E731  one micro-batch
    return _UPDATE(state, UpdateBatch(jax.tree.map(m, setup["student"]), m(setup["targets"]), m(setup["mask"])),
                   TeacherSignal(m(setup["scored"].hidden), setup["head"], m(setup["scored"].logp)), setup["base"],
                   graphdef=setup["graph"], optimizer=opt, cfg=LossConfig(chunk_size=4), **kw)


def test_zero_b_gives_the_base_logits_exactly(setup):
    for seq in (setup["student"], setup["teacher"]):
        plain = logits(setup["plain_graph"], setup["plain_params"], seq=seq)
        adapted = logits(setup["graph"], setup["adapters"], setup["base"], seq=seq)
        np.testing.assert_array_equal(plain, adapted)
    # The base state is the plain model's state: the same paths, the same arrays.
    assert jax.tree.structure(setup["base"]) == jax.tree.structure(setup["plain_params"])
    assert all(a is b for a, b in zip(jax.tree.leaves(setup["base"]), jax.tree.leaves(setup["plain_params"])))


def test_adapters_carry_the_base_axes_and_shard_like_it(setup):
    axes = {"/".join(map(str, k)): v.get_metadata()["out_sharding"] for k, v in nnx.to_flat_state(setup["adapters"])}
    assert axes["layers/0/attn/q_lora/a"] == ("embed", "lora_rank")
    assert axes["layers/0/attn/q_lora/b"] == ("lora_rank", "heads", "head_dim")
    assert axes["layers/1/attn/k_lora/b"] == ("lora_rank", "kv_heads", "head_dim")
    assert axes["layers/0/attn/o_lora/a"] == ("heads", "head_dim", "lora_rank")
    assert axes["layers/0/attn/o_lora/b"] == ("lora_rank", "embed")
    assert axes["layers/0/mlp/down_lora/a"] == ("mlp", "lora_rank")
    assert axes["layers/0/mlp/gate_lora/b"] == ("lora_rank", "mlp")
    assert len(axes) == 2 * 7 * CFG.num_layers
    mesh = AbstractMesh((1, 4, 2), MESH_AXES)
    spec = lambda name: tuple(logical_to_spec(axes[name], (32, 4, 4, 8)[:len(axes[name])], mesh))  # noqa: E731
    assert spec("layers/0/attn/q_lora/a") == ("fsdp", None)  # embed over fsdp, like q_proj's first axis
    assert spec("layers/0/attn/q_lora/b") == (None, "tensor", None)  # heads over tensor, like q_proj's
    # Hand count: rank x (fan_in + fan_out) per adapted projection.
    d, h, k, hd, m, r = 32, 4, 2, 8, 48, 4
    per_layer = r * ((d + h * hd) + 2 * (d + k * hd) + (h * hd + d) + 2 * (d + m) + (m + d))
    assert lora.num_params(setup["adapters"]) == CFG.num_layers * per_layer == 3_712


def test_merged_and_unmerged_forward_agree(setup):
    adapters = randomized(setup["adapters"], 3)
    model = nnx.merge(setup["graph"], adapters, setup["base"])
    merged = lora.merge_lora(model)
    assert not lora.adapters(merged) and len(lora.adapters(model)) == 14
    seq = setup["teacher"]
    unmerged = np.asarray(model.logits(model(*seq.inputs())[0]))
    np.testing.assert_allclose(np.asarray(merged.logits(merged(*seq.inputs())[0])), unmerged, atol=1e-5, rtol=1e-5)
    assert np.abs(unmerged - logits(setup["plain_graph"], setup["plain_params"], seq=seq)).max() > 1e-2
    # merging leaves the model and its base as they were
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora.split_lora(model)[2]),
                                                    jax.tree.leaves(setup["plain_params"])))


def test_gradients_reach_only_the_adapters_b_first(setup):
    """SGD(1): new = old - grad. With B = 0 the first gradient of A is exactly 0 and that of B is not; after one
    step A's is nonzero too. The base gets no gradient: the state holds adapters only, the base is unchanged."""
    opt = optax.sgd(1.0)
    state0 = init_state(setup["adapters"], opt)
    assert jax.tree.structure(state0.params) == jax.tree.structure(setup["adapters"])
    state1, m1 = lora_update(setup, state0, opt)
    grad1 = jax.tree.map(lambda a, b: a - b, nnx.to_pure_dict(setup["adapters"]), nnx.to_pure_dict(state1.params))
    for layer in grad1["layers"].values():
        for owner in layer.values():
            for adapter in owner.values():
                assert not np.any(adapter["a"]) and np.any(adapter["b"])
    state2, _ = lora_update(setup, state1, opt)
    grad2 = jax.tree.map(lambda a, b: a - b, nnx.to_pure_dict(state1.params), nnx.to_pure_dict(state2.params))
    assert all(np.any(adapter["a"]) for layer in grad2["layers"].values() for owner in layer.values()
               for adapter in owner.values())
    assert float(m1.loss) > 0 and int(state2.step) == 2
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(setup["base"]),
                                                    jax.tree.leaves(setup["plain_params"])))


def test_optimizer_state_holds_adapter_leaves_only(setup):
    opt = make_optimizer(OptimConfig())
    state = init_state(setup["adapters"], opt)
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(x.size for x in floats) == 2 * lora.num_params(setup["adapters"])  # AdamW mu and nu
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(setup["adapters"]))
    assert sorted(x.shape for x in floats) == sorted(adapter_shapes * 2)


def test_jitted_update_donates_the_adapters_not_the_base(setup):
    opt = make_optimizer(OptimConfig(learning_rate=1e-2))
    base = jax.tree.map(jnp.copy, setup["base"])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
    state = init_state(setup["adapters"], opt)
    step = jit_update(setup["graph"], opt, LossConfig(chunk_size=4), shardings_of(state), mesh,
                      frozen_shardings=shardings_of(base))
    m = lambda x: x[None]  # noqa: E731
    before = [np.asarray(x) for x in jax.tree.leaves(base)]
    for _ in range(2):
        old = state
        state, metrics = step(state, UpdateBatch(jax.tree.map(m, setup["student"]), m(setup["targets"]),
                                                 m(setup["mask"])),
                              TeacherSignal(m(setup["scored"].hidden), setup["head"], m(setup["scored"].logp)), base)
        assert all(x.is_deleted() for x in jax.tree.leaves(old.params))  # the adapters are donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(base))
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(base)))
    assert np.isfinite(float(metrics.loss)) and int(state.step) == 2


def test_adapter_dropout_in_the_update(setup):
    """Dropout on the adapters' input: the same key gives the same step, another key another; without a key
    (sampling, scoring) the adapters run without dropout."""
    drop = dict(LORA.__dict__, dropout=0.5)
    model = lora.add_lora(Transformer(CFG, rngs=nnx.Rngs(0)), lora.LoRAConfig(**drop), rngs=nnx.Rngs(1))
    graph, adapters, base = lora.split_lora(model)
    adapters = randomized(adapters, 5)  # B != 0: dropout changes the output
    local = dict(setup, graph=graph, adapters=adapters, base=base)
    opt = optax.sgd(1.0)
    key = jax.random.key(7)
    a, ma = lora_update(local, init_state(adapters, opt), opt, dropout_key=key)
    b, mb = lora_update(local, init_state(adapters, opt), opt, dropout_key=key)
    c, mc = lora_update(local, init_state(adapters, opt), opt, dropout_key=jax.random.key(8))
    assert float(ma.loss) == float(mb.loss) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    assert float(ma.loss) != float(mc.loss)
    assert all(x.shape == y.shape for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(adapters)))
    no_dropout = lora.add_lora(Transformer(CFG, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1))
    g0, _, b0 = lora.split_lora(no_dropout)
    seq = setup["teacher"]
    np.testing.assert_array_equal(logits(graph, adapters, base, seq=seq), logits(g0, adapters, b0, seq=seq))


def test_remat_gives_the_same_step(setup):
    """train.remat under LoRA: each layer under nnx.remat reads the frozen base from inside the gradient trace."""
    opt = optax.sgd(1.0)
    plain, _ = lora_update(setup, init_state(setup["adapters"], opt), opt)
    model = with_runtime(nnx.merge(setup["graph"], setup["adapters"], setup["base"]), remat="full")
    remat, _ = lora_update(dict(setup, graph=nnx.split(model)[0]), init_state(setup["adapters"], opt), opt)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(remat.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_ema_teacher_head_reads_the_frozen_base(setup):
    """OPSD's EMA teacher under LoRA: the EMA holds adapters only; the head comes from the frozen base."""
    opt = optax.sgd(1.0)
    state, metrics = lora_update(setup, init_state(setup["adapters"], opt, ema=True), opt, ema_decay=0.5,
                                 teacher_head_source="ema")
    assert jax.tree.structure(state.ema_params) == jax.tree.structure(setup["adapters"])
    assert np.isfinite(float(metrics.loss)) and int(state.step) == 1


def test_bf16_base_with_f32_adapters(setup):
    model = Transformer(CFG.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    lora.add_lora(model, LORA, rngs=nnx.Rngs(1))
    _, adapters, base = lora.split_lora(model)
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype("float32")}
    merged = lora.merge_lora(nnx.merge(*lora.split_lora(model)))
    assert merged.layers[0].attn.q_proj.get_value().dtype == jnp.bfloat16


def _cfg(**lora_fields):
    cfg = base_config()
    cfg.lora.update(lora_fields)
    return cfg


def test_config_section_resolves_and_names_bad_keys():
    assert resolve(base_config()).lora is None  # off by default: full fine-tuning
    s = resolve(_cfg(enabled=True, targets="v, q", rank=8, alpha=16, dropout=0.05))
    assert s.lora == lora.LoRAConfig(rank=8, alpha=16.0, targets=("q", "v"), dropout=0.05)
    assert s.lora.scale == 2.0 and resolve(_cfg(enabled=True, use_rslora=True, rank=16, alpha=8)).lora.scale == 2.0
    for fields, message in [
        (dict(targets="q,x"), "config.lora.targets: 'x' is not one of q, k, v, o, gate, up, down"),
        (dict(targets="q,q"), "config.lora.targets: 'q,q' names a projection twice"),
        (dict(targets=""), "config.lora.targets: '': expected a comma-separated subset"),
        (dict(rank=0), "config.lora.rank: 0 must be >= 1"),
        (dict(alpha=0.0), "config.lora.alpha: 0.0 must be > 0.0"),
        (dict(dropout=1.0), "config.lora.dropout: 1.0 must be < 1"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolve(_cfg(**fields))
