"""Refine-context scoring from the refine pass's own states (trd_jax/score_reuse.py): the sampler's kept
states equal a full forward's (plain, speculative, row groups, n samples); the assembled ScoreOutput equals
score() on the whole batch with reused and recomputed rows mixed; through the controller, a run that reuses
trains like one that recomputes, and says how many rows it reused."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.tiny_run import tiny_config
from trd_jax import score_reuse
from trd_jax.controller import Trainer
from trd_jax.layouts import distill_batch
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.sampling import Sampler, SamplingConfig
from trd_jax.steps import score

PROMPTS = [[5, 9, 13], list(range(20, 37)), [42], [7, 8], [11, 12, 13, 14, 15]]
EOS = 3


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    graph, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    return graph, params, Sampler(graph, eos_ids=(EOS,))


def _forward(graph, params, prompts, out, n=1):
    """score() over prompt + sampled tokens: the reference the kept states must equal."""
    ys = [out.tokens[i, :k].tolist() for i, k in enumerate(out.lengths)]
    batch = distill_batch([prompts[i // n] for i in range(len(ys))], ys, pad_id=0)
    return batch, score(graph, params, batch.teacher, batch.targets, batch.response_mask)


@pytest.mark.parametrize("how", ["plain", "speculative", "row_groups", "n_samples", "greedy"])
def test_kept_states_equal_a_full_forward(model, how):
    graph, params, sampler = model
    kwargs = {"plain": {}, "speculative": {"drafts": [[9, 1, 2, 3, 4, 5]] * len(PROMPTS), "draft_tokens": 3},
              "row_groups": {"max_rows": 2}, "n_samples": {"n": 2}, "greedy": {}}[how]
    sampling = SamplingConfig(0.0 if how == "greedy" else 1.0)
    out = sampler(params, PROMPTS, 30, sampling=sampling, key=3, keep_hidden=True, **kwargs)
    n = kwargs.get("n", 1)
    assert out.hidden.shape[0] == len(PROMPTS) * n and out.hidden.shape[1] >= out.tokens.shape[1]
    batch, ref = _forward(graph, params, PROMPTS, out, n)
    width = out.tokens.shape[1]
    mask = batch.response_mask[:, :width, None]
    kept = np.asarray(out.hidden)
    np.testing.assert_allclose(kept[:, :width] * mask, np.asarray(ref.hidden)[:, :width] * mask, atol=2e-5)
    assert not kept[:, width:].any()  # nothing past the longest row
    for i, k in enumerate(out.lengths):  # zero past each row's length; not all zero within it
        assert not kept[i, k:].any() and np.abs(kept[i, :k]).sum(axis=-1).min() > 0


def test_assembled_scores_equal_scoring_the_whole_batch(model):
    """Rows 0, 2 and 3 reused (their kept states in another order, as rows.y_r holds them), rows 1 and 4
    recomputed in a sub-batch padded by repetition: the ScoreOutput of score() on the whole batch."""
    graph, params, sampler = model
    out = sampler(params, PROMPTS, 20, sampling=SamplingConfig(1.0), key=5, keep_hidden=True)
    batch, ref = _forward(graph, params, PROMPTS, out)
    order = [3, 0, 2]  # kept row j is batch row order[j]
    kept = out.hidden[jnp.asarray(order)]
    src = np.full(len(PROMPTS), -1, np.int32)
    for j, b in enumerate(order):
        src[b] = j
    index, slot = score_reuse.rows_to_recompute(src)
    assert index.tolist() == [1, 4] and slot.tolist() == [-1, 0, -1, -1, 1]
    recomputed = score(graph, params, *score_reuse.sub_batch(batch, index)).hidden
    got = score_reuse.assemble(graph, params, score_reuse.pad_rows(kept), src, recomputed, slot, batch.targets,
                               batch.response_mask)
    mask = batch.response_mask
    np.testing.assert_allclose(np.asarray(got.hidden) * mask[..., None], np.asarray(ref.hidden) * mask[..., None],
                               atol=2e-5)
    np.testing.assert_allclose(got.logp, ref.logp, atol=1e-4)
    assert np.all(np.asarray(got.logp)[~mask] == 0) and np.all(np.asarray(got.logp)[mask] < 0)
    # Every row reused: no sub-batch at all.
    index, slot = score_reuse.rows_to_recompute(np.arange(len(PROMPTS), dtype=np.int32))
    assert index.size == 0
    alone = score_reuse.assemble(graph, params, out.hidden, np.arange(len(PROMPTS), dtype=np.int32), None, slot,
                                 batch.targets, batch.response_mask)
    np.testing.assert_allclose(alone.logp, ref.logp, atol=1e-4)


def test_rows_to_recompute_pads_to_a_bucket():
    index, slot = score_reuse.rows_to_recompute(np.array([0, -1, 1, -1, -1, -1, -1], np.int32))
    assert index.tolist() == [1, 3, 4, 5, 6, 1]  # 5 rows -> bucket 6, the first repeated
    assert slot.tolist() == [-1, 0, -1, 1, 2, 3, 4]


def _lines(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("rows", ["all_rewrites", "mixed"])
def test_reusing_trains_like_recomputing(rows, tmp_path, monkeypatch):
    """TRD (refine-context forward KL) with refine.reuse_states on and off: the same rows, losses equal within
    float rounding, and the reusing run reports its reused rows and counts fewer score FLOPs. "mixed": grading
    is fixed so that the rewrites of rows 1 and 3 are wrong and fall back to y_o (vanilla context): those are
    recomputed, rows 0 and 2 reused."""
    from trd_jax import trajectories

    overrides = {"eval.initial": False, "eval.teacher": False, "log.diagnostics": False}
    if rows == "mixed":
        monkeypatch.setattr(trajectories, "grade", lambda task, tok, ys, examples: np.array(
            [1.0, 0.0, 1.0, 0.0] if len(ys) == 4 else [0.0] * len(ys), np.float32))
        overrides["refine.on_wrong_rewrite"] = "fallback"
    runs = {}
    for reuse in (False, True):
        workdir = tmp_path / str(reuse)
        summary = Trainer(tiny_config(**overrides, **{"refine.reuse_states": reuse}), str(workdir)).run()
        runs[reuse] = (_lines(workdir), summary)
    (plain, plain_summary), (reused, reused_summary) = runs[False], runs[True]
    for a, b in zip(plain, reused):
        assert a["rows/trained"] == b["rows/trained"] and a["tokens"] == b["tokens"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
        assert "score/reused_rows" not in a
        expected = 4 if rows == "all_rewrites" else 4 - b["rows/y_r_wrong_fallback"]
        assert b["score/reused_rows"] == expected
    if rows == "mixed":
        assert any(b["rows/y_r_wrong_fallback"] for b in reused)
    assert reused_summary["phase_flops"]["score"] < plain_summary["phase_flops"]["score"]
