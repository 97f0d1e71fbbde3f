"""train.remat: activation rematerialisation of the student's decoder layers (ModelConfig.remat, transformer.py).
The same loss and gradients as without it, a smaller compiled update step, the config check, the setting reaching
the Trainer's student (and not the teacher), and Hugging Face files that never carry it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers.tiny_run import tiny_config
from trd_jax import memory_plan as mp
from trd_jax.config import ConfigError, base_config, resolve
from trd_jax.layouts import distill_batch
from trd_jax.models.config import REMAT, ModelConfig
from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.models.transformer import Transformer, init_cache, with_runtime
from trd_jax.losses import LossConfig
from trd_jax.steps import TeacherSignal, UpdateBatch, init_state, score, update

V = 97
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, qk_norm=True, architecture="Qwen3ForCausalLM")
TEACHER = CFG.replace(hidden_size=48, num_heads=6, num_kv_heads=3, qk_norm=False, architecture="LlamaForCausalLM")
RNG = np.random.default_rng(0)
PROMPTS = [list(RNG.integers(1, V, n)) for n in (3, 7, 5, 2)]
RESPONSES = [list(RNG.integers(1, V, n)) for n in (6, 1, 9, 4)]


def _seq(layout):
    return jax.tree.map(jnp.asarray, layout)


def _graphs():
    """graphdef per remat policy, all over one set of parameters."""
    graphs = {}
    for remat in REMAT:
        graphs[remat], params = nnx.split(Transformer(CFG.replace(remat=remat), rngs=nnx.Rngs(0)))
    return graphs, params


def _close(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def test_config_default_choices_and_error():
    assert base_config().train.remat == "none" and resolve(base_config()).train.remat == "none"
    for remat in REMAT:
        cfg = base_config()
        cfg.train.remat = remat
        assert resolve(cfg).train.remat == remat
    cfg = base_config()
    cfg.train.remat = "selective"
    with pytest.raises(ConfigError) as e:
        resolve(cfg)
    assert e.value.key == "train.remat" and "config.train.remat: 'selective' is not one of none, full, dots" in str(
        e.value)
    with pytest.raises(ValueError, match=r"ModelConfig.remat='all'"):
        CFG.replace(remat="all")


def test_loss_and_gradients_equal_without_remat():
    """A padded token cross-entropy through the forward without a cache: value and gradient of every
    parameter are the same under full and dots remat (float32)."""
    graphs, params = _graphs()
    batch = distill_batch(PROMPTS, RESPONSES, PROMPTS)
    seq = _seq(batch.student)

    def loss(params, graph):
        model = nnx.merge(graph, params)
        hidden, cache = model(seq.tokens, seq.positions, seq.mask)
        assert cache is None
        logp = jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1)
        nll = -jnp.take_along_axis(logp, seq.tokens[:, 1:, None], axis=-1)[..., 0]
        valid = seq.mask[:, 1:] & seq.mask[:, :-1]
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_loss, ref_grads = grad(params, graphs["none"])
    # remat really is in the differentiated program (jax.checkpoint's primitive), and only with the option
    for remat in REMAT:
        text = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, graphs[remat]))
        assert ("remat" in text) == (remat != "none"), remat
    for remat in ("full", "dots"):
        value, grads = grad(params, graphs[remat])
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
        _close(grads, ref_grads, remat)


def test_update_step_equal_without_remat():
    """steps.update (fused forward-KL against a teacher, two micro-batches): loss, gradient norm and the new
    parameters under remat full / dots equal those without."""
    graphs, params = _graphs()
    t_graph, t_params = nnx.split(Transformer(TEACHER, rngs=nnx.Rngs(1)))
    batch = distill_batch(PROMPTS, RESPONSES, PROMPTS)
    targets, mask = jnp.asarray(batch.targets), jnp.asarray(batch.response_mask)
    scored = jax.jit(score, static_argnums=0)(
        t_graph, t_params, _seq(batch.teacher), targets, mask)
    t_head = nnx.merge(t_graph, t_params).lm_head_weight()

    def micro(x):
        return jax.tree.map(lambda a: a.reshape((2, a.shape[0] // 2) + a.shape[1:]), x)

    opt = optax.sgd(1.0)
    fn = jax.jit(update, static_argnames=("graphdef", "optimizer", "cfg"))
    out = {}
    for remat in REMAT:
        rows = UpdateBatch(micro(_seq(batch.student)), micro(targets), micro(mask))
        teacher = TeacherSignal(micro(scored.hidden), t_head, micro(scored.logp))
        state, metrics = fn(init_state(params, opt), rows, teacher,
                            graphdef=graphs[remat], optimizer=opt, cfg=LossConfig(name="forward_kl", chunk_size=8))
        out[remat] = (state.params, metrics)
    ref_params, ref = out["none"]
    assert float(ref.grad_norm) > 0
    for remat in ("full", "dots"):
        new_params, metrics = out[remat]
        np.testing.assert_allclose(metrics.loss, ref.loss, rtol=1e-6)
        np.testing.assert_allclose(metrics.grad_norm, ref.grad_norm, rtol=1e-5)
        _close(new_params, ref_params, remat)


def test_compiled_update_temp_smaller_with_remat():
    """XLA's memory_analysis of the jitted update step, the remat taken from the model's own config (a d=64,
    2-layer model, 2 micro-batches of 2 rows x 256 tokens, so the [heads, T, T] attention scores dominate what
    autodiff keeps). In a fresh CPU process with the memory-minimising scheduler (memory_plan.MEASURE_FLAGS), as
    tests/test_plan.py measures: XLA:CPU's default scheduler would place the recomputation beside the forward."""
    model = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, qk_norm=True, tie_word_embeddings=True)
    case = dict(rows=2, context=16, response=240, chunk_size=32, teacher_hidden=64)
    temps = {remat: r["temp"] for remat, r in zip(REMAT, mp.measure_in_subprocess(
        [dict(case, model=dict(model, remat=remat)) for remat in REMAT]))}
    # measured when written: full 0.78, dots 0.69 of none (with 2 layers, the recomputed layer's own residuals
    # are a large part of what is left; tests/test_plan.py's 4 layers give full < 0.6)
    assert temps["full"] < 0.85 * temps["none"], temps
    assert temps["dots"] < 0.85 * temps["none"], temps


def test_with_runtime_remat_changes_the_jit_static_not_the_parameters_nor_sampling():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)
    tokens = jnp.asarray(RNG.integers(1, V, (2, 6)))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    key_mask = jnp.ones((2, 8), bool)
    before, _ = model(tokens, positions, key_mask, cache=init_cache(CFG, 2, 8), cache_index=0)
    assert with_runtime(model, remat="none") is model and nnx.graphdef(model) == graph
    assert with_runtime(model, remat="full") is model
    remat_graph, remat_params = nnx.split(model)
    assert remat_graph != graph and hash(remat_graph) != hash(graph)  # a new jit static: the steps recompile
    assert {m.cfg for _, m in nnx.iter_graph(model) if hasattr(m, "cfg")} == {CFG.replace(remat="full")}
    jax.tree.map(np.testing.assert_array_equal, remat_params, params)
    # with a KV cache (prefill / decode) the layers run as they are
    after, _ = model(tokens, positions, key_mask, cache=init_cache(CFG, 2, 8), cache_index=0)
    np.testing.assert_array_equal(after, before)


def test_hf_files_never_carry_remat(tmp_path):
    model = with_runtime(Transformer(CFG, rngs=nnx.Rngs(0)), remat="dots")
    assert CFG.replace(remat="full").to_hf_dict() == CFG.to_hf_dict()
    save_hf(model, str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert "remat" not in written
    loaded = load_hf(str(tmp_path))
    assert loaded.cfg.remat == "none" and loaded.cfg == CFG
    # a config.json that happens to name it is not read; only an explicit override sets it
    assert ModelConfig.from_hf_dict(dict(written, remat="full")).remat == "none"
    assert ModelConfig.from_hf_dir(str(tmp_path), remat="full").remat == "full"


def test_trainer_student_gets_remat_teacher_does_not(tmp_path):
    from trd_jax.controller import Trainer

    trainer = Trainer(tiny_config(**{"train.remat": "full", "distill.mode": "opd"}), str(tmp_path))
    try:
        student = nnx.merge(trainer.s_graph, trainer.state.params)
        teacher = nnx.merge(trainer.t_graph, trainer.teacher_params)
        assert student.cfg.remat == "full" and teacher.cfg.remat == "none"
        assert "remat" not in json.loads((tmp_path / "student_model" / "config.json").read_text())
    finally:
        trainer.task_close()
