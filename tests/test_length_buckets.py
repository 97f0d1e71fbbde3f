"""Rows sorted by length into micro-batches of their own widths (train.length_buckets): the plan, and the update
against steps.update's scan over equal-width micro-batches (loss, gradient, per-token values in the caller's row
order), for a full-vocabulary and a sampled-token loss, a live teacher head, and through the controller."""

import json

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from helpers.step_inputs import step_inputs
from helpers.tiny_run import tiny_config
from trd_jax.bucketed_update import BucketedUpdate
from trd_jax.controller import Trainer
from trd_jax.layouts import distill_batch
from trd_jax.length_buckets import plan_micro_batches
from trd_jax.losses import LossConfig
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.sharding import MeshConfig, make_mesh
from trd_jax.steps import TeacherSignal, UpdateBatch, init_state, jit_update, shardings_of, to_micro_batches

V = 61
STUDENT = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8)
TEACHER = STUDENT.replace(hidden_size=48, num_heads=6, num_kv_heads=3)
RNG = np.random.default_rng(3)
# Long-tailed: most responses short, two long; contexts of mixed lengths (the longest context is not on the
# longest response).
PROMPT_LENGTHS = (3, 20, 5, 2, 7, 4, 6, 3)
RESPONSE_LENGTHS = (6, 2, 40, 4, 3, 0, 5, 25)
PROMPTS = [list(RNG.integers(1, V, n)) for n in PROMPT_LENGTHS]
RESPONSES = [list(RNG.integers(1, V, n)) for n in RESPONSE_LENGTHS]


def test_plan_sorts_rows_and_cuts_widths_to_each_micro_batch():
    plan = plan_micro_batches(PROMPT_LENGTHS, RESPONSE_LENGTHS, 4, context_width=32, response_width=48)
    totals = np.add(PROMPT_LENGTHS, RESPONSE_LENGTHS)
    assert list(totals[plan.order]) == sorted(totals, reverse=True)
    assert sorted(plan.order) == list(range(8))
    for m, (c, r) in enumerate(plan.widths):
        rows = plan.order[2 * m:2 * m + 2]
        assert max(PROMPT_LENGTHS[i] for i in rows) <= c <= 32 and max(RESPONSE_LENGTHS[i] for i in rows) <= r <= 48
    # Rows 2 (5 + 40) and 7 (3 + 25) first, at the full response width; the two shortest (2 + 4, 4 + 0) last.
    assert plan.widths[0] == (16, 48) and plan.widths[-1] == (16, 8)
    assert plan.padded_tokens() < 8 * (32 + 48)
    with pytest.raises(ValueError, match="8 rows do not split into 3"):
        plan_micro_batches(PROMPT_LENGTHS, RESPONSE_LENGTHS, 3, context_width=32, response_width=48)
    with pytest.raises(ValueError, match="longer than the layout"):
        plan_micro_batches(PROMPT_LENGTHS, RESPONSE_LENGTHS, 2, context_width=16, response_width=48)


@pytest.fixture(scope="module")
def setup():
    s_graph, s_params = nnx.split(Transformer(STUDENT, rngs=nnx.Rngs(0)))
    t_graph, t_params = nnx.split(Transformer(TEACHER, rngs=nnx.Rngs(1)))
    batch = distill_batch(PROMPTS, RESPONSES)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    # A live head (OPSD: the student's own, read from the state) with states of the student's shape; from another
    # initialisation, so that the loss is not zero.
    live = step_inputs(batch, s_graph, nnx.split(Transformer(STUDENT, rngs=nnx.Rngs(2)))[1])["scored"]
    return dict(s_graph=s_graph, s_params=s_params, batch=batch, mesh=mesh, live=live,
                **step_inputs(batch, t_graph, t_params))


def _both(setup, cfg: LossConfig, num_micro: int, head_source: str = "given"):
    """(scan over equal-width micro-batches, length-bucketed) from the same state: (state, metrics) each."""
    opt = optax.sgd(1.0)  # new params = params - gradient
    fresh = lambda: init_state(jax.tree.map(lambda x: x.copy(), setup["s_params"]), opt)  # noqa: E731
    head = setup["head"] if head_source == "given" else None
    scored = setup["scored"] if head_source == "given" else setup["live"]
    state = fresh()
    step = jit_update(setup["s_graph"], opt, cfg, shardings_of(state), setup["mesh"], teacher_head_source=head_source)
    seq, targets, mask, hidden, logp = to_micro_batches(
        (setup["student"], setup["targets"], setup["mask"], scored.hidden, scored.logp), num_micro,
        setup["mesh"])
    scanned = step(state, UpdateBatch(seq, targets, mask), TeacherSignal(hidden, head, logp))
    state = fresh()
    bucketed = BucketedUpdate(setup["s_graph"], opt, cfg, shardings_of(state), setup["mesh"],
                              teacher_head_source=head_source)
    b = setup["batch"]  # host arrays, as the controller passes them
    out = bucketed(state, UpdateBatch(b.student, b.targets, b.response_mask),
                   TeacherSignal(scored.hidden, head, scored.logp), num_micro=num_micro)
    return scanned, out, bucketed.last_plan


@pytest.mark.parametrize("loss,num_micro,head_source", [
    (LossConfig("forward_kl", chunk_size=8), 4, "given"),
    (LossConfig("k1_policy_gradient", chunk_size=8), 2, "given"),
    (LossConfig("reverse_kl", chunk_size=8), 2, "live"),
])
def test_bucketed_update_equals_the_scan(setup, loss, num_micro, head_source):
    (s_state, s_metrics), (b_state, b_metrics), plan = _both(setup, loss, num_micro, head_source)
    assert plan.padded_tokens() < setup["student"].tokens.size  # fewer columns computed
    np.testing.assert_allclose(b_metrics.loss, s_metrics.loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b_metrics.grad_norm, s_metrics.grad_norm, rtol=1e-5)
    assert int(b_metrics.num_tokens) == int(s_metrics.num_tokens) == sum(RESPONSE_LENGTHS)
    assert not bool(b_metrics.skipped) and int(b_state.step) == 1
    chex.assert_trees_all_close(b_state.params, s_state.params, atol=1e-6, rtol=1e-5)
    # The per-token values come back in the caller's row order.
    scan_rows = np.asarray(s_metrics.per_token).reshape(len(PROMPTS), -1)
    np.testing.assert_allclose(b_metrics.per_token, scan_rows, rtol=1e-5, atol=1e-6)
    assert np.all(b_metrics.per_token[~np.asarray(setup["mask"])] == 0)
    assert np.any(b_metrics.per_token[2, 30:] != 0)  # the long row's tail, in its own place


def _losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_controller_trains_the_same_with_length_buckets(tmp_path):
    """Two TRD steps of 2 micro-batches: the same losses, gradient norms and final weights as the scan."""
    base = {"train.micro_batches": 2, "train.batch_size": 8, "rollout.max_new_tokens": 24, "eval.initial": False,
            "eval.teacher": False, "checkpoint.every": 2, "export.enabled": False}
    runs = {}
    for on in (False, True):
        trainer = Trainer(tiny_config(**base, **{"train.length_buckets": on}), str(tmp_path / str(on)))
        trainer.run()
        runs[on] = (trainer.state.params, _losses(tmp_path / str(on)))
    (p0, m0), (p1, m1) = runs[False], runs[True]
    assert [m["step"] for m in m1] == [1, 2]
    for a, b in zip(m0, m1):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
        assert a["tokens"] == b["tokens"] and a["accuracy/y_o"] == b["accuracy/y_o"]
    chex.assert_trees_all_close(p1, p0, atol=1e-4, rtol=1e-4)  # AdamW magnifies tiny gradients' rounding
