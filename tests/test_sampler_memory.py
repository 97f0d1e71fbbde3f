"""Sampler memory options (trd_jax.sampling): row groups (max_rows), the prompt bucket capped at the caller's
budget (max_prompt_len), cache release, the KV cache sharded over the batch axes of a 4-device CPU mesh
(in a subprocess), and the controller's use of them (release after each phase and after evaluation,
rollout.max_rows_per_call). None of them may change what is sampled."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.sampling import Sampler, row_groups
from trd_jax.token_selection import SamplingConfig, _row_uniforms, select_tokens
from trd_jax.shapes import bucket

TESTS = os.path.dirname(__file__)
ROOT = os.path.dirname(TESTS)

VOCAB = 4096  # 32 chunks of 128: top-k 20 goes through the candidate gather
EOS = tuple(range(3, VOCAB, 37))  # ~2.7% of the ids: rows end at different steps
CASES = {
    "sample": dict(sampling=SamplingConfig(1.0), n=1, key=3),
    "top-k-top-p-n3": dict(sampling=SamplingConfig(0.7, top_k=20, top_p=0.9), n=3, key=5),
    "greedy-n2": dict(sampling=SamplingConfig(0.0), n=2, key=0),
}


def tiny_model():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    return graphdef, jax.tree.map(lambda x: 8 * x, params)  # larger weights: peaked, varied distributions


def prompts_of(lengths=(5, 17, 3, 30, 9)):
    rng = np.random.default_rng(0)
    return [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    """One call over all rows, per case."""
    graphdef, params = model
    sampler = Sampler(graphdef, eos_ids=EOS)
    return {name: sampler(params, prompts_of(), 24, **kw) for name, kw in CASES.items()}


def assert_same_samples(out, ref, logprob_atol=None):
    """Tokens and lengths bit for bit; log-probs bit for bit, or (another batch shape, whose matmuls may round
    differently) within logprob_atol."""
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    if logprob_atol is None:
        np.testing.assert_array_equal(out.logprobs, ref.logprobs)
    else:
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=logprob_atol, rtol=0)


# ---------------------------------------------------------------- row groups


def test_row_groups_cover_every_row_once():
    for prompts in (1, 2, 5, 8, 9, 16):
        for n in (1, 2, 3, 8):
            for max_rows in (0, 1, 2, 3, 4, 5, 7, 9, 16, 100):
                batch, samples, groups = row_groups(prompts, n, max_rows)
                if max_rows == 0 or prompts * n <= max_rows:
                    assert (batch, samples, len(groups)) == (bucket(prompts), n, 1)
                else:
                    assert batch * samples <= max_rows
                rows = []
                for first, count, offset, keep in groups:
                    assert 1 <= count <= batch and keep <= batch * samples
                    # the group's real rows are rows offset .. offset + keep - 1 of the whole call
                    if samples == n:
                        assert offset == first * n and keep == count * n
                    else:
                        assert count == 1 and first * n <= offset < (first + 1) * n
                    rows += range(offset, offset + keep)
                assert rows == list(range(prompts * n)), (prompts, n, max_rows)


def test_row_uniforms_are_the_whole_calls():
    key = jax.random.key(7)
    full = np.asarray(_row_uniforms(key, 12))
    for offset in (0, 3, 7, 11):
        part = np.asarray(_row_uniforms(key, 4, jax.numpy.int32(offset), 12))
        want = np.concatenate([full, np.ones((4, 1), np.float32)])[offset:offset + 4]
        np.testing.assert_array_equal(part, want)
    logits = jax.random.normal(jax.random.key(1), (12, 300)) * 3
    cfg = SamplingConfig(0.9, top_k=40, top_p=0.95)
    tokens, _ = select_tokens(logits, key, cfg)
    for offset in (0, 4, 8):
        part, _ = select_tokens(logits[offset:offset + 4], key, cfg, row_offset=jax.numpy.int32(offset),
                                total_rows=12)
        np.testing.assert_array_equal(np.asarray(part), np.asarray(tokens)[offset:offset + 4])


@pytest.mark.parametrize("case", list(CASES))
def test_row_groups_sample_what_one_call_samples(model, reference, case):
    """Groups of 2 prompts (or 1 prompt, or part of one prompt's n samples) draw the rows' numbers of the whole
    call: the same tokens and lengths. Log-probs are bit-identical where a group's batch has >= 2 prompts on
    this CPU backend, and equal to float rounding otherwise (a batch of 1 rounds its matmuls differently)."""
    graphdef, params = model
    kw, ref = CASES[case], reference[case]
    sampler = Sampler(graphdef, eos_ids=EOS)
    n = kw["n"]
    for max_rows in sorted({2 * n, n + 1, max(1, n - 1)}):
        out = sampler(params, prompts_of(), 24, max_rows=max_rows, **kw)
        batch, samples, groups = row_groups(5, n, max_rows)
        assert len(groups) > 1 and sampler._cache[0].k.shape[0] == batch * samples <= max_rows
        assert_same_samples(out, ref, logprob_atol=None if batch >= 2 else 2e-3)


# ---------------------------------------------------------------- prompt bucket cap, release


def test_prompt_bucket_capped_at_the_callers_budget(model, reference):
    graphdef, params = model
    prompts = prompts_of()  # longest 30: bucket 32
    sampler = Sampler(graphdef, eos_ids=EOS)
    out = sampler(params, prompts, 24, max_prompt_len=32, **CASES["sample"])
    assert sampler._cache[0].k.shape[2] == 32 + 24  # a cap at the bucket changes nothing
    assert_same_samples(out, reference["sample"])
    out = sampler(params, prompts, 24, max_prompt_len=30, **CASES["sample"])
    assert sampler._cache[0].k.shape[2] == 30 + 24  # not rounded above the budget
    assert_same_samples(out, reference["sample"], logprob_atol=2e-3)  # less left padding: the same samples
    with pytest.raises(ValueError, match=r"prompts\[3\]: 30 tokens exceed max_prompt_len=29"):
        sampler(params, prompts, 24, max_prompt_len=29)


def test_release_frees_the_cache_and_changes_nothing(model, reference):
    graphdef, params = model
    sampler = Sampler(graphdef, eos_ids=EOS)
    assert not sampler.holds_cache
    first = sampler(params, prompts_of(), 24, **CASES["top-k-top-p-n3"])
    assert sampler.holds_cache
    sampler.release()
    assert not sampler.holds_cache
    again = sampler(params, prompts_of(), 24, **CASES["top-k-top-p-n3"])
    assert_same_samples(first, reference["top-k-top-p-n3"])
    assert_same_samples(again, first)


# ---------------------------------------------------------------- KV cache sharded over 4 CPU devices

SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_sampler_memory import CASES, EOS, assert_same_samples, prompts_of, tiny_model
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from trd_jax.models.config import ModelConfig
    from trd_jax.sampling import Sampler
    from trd_jax.sharding import MeshConfig, make_mesh, param_shardings

    assert jax.device_count() == 4
    graphdef, params = tiny_model()
    prompts = prompts_of((5, 17, 3, 30, 9, 12, 2, 21))  # 8 prompts: rows divide 4 devices
    kw = CASES["top-k-top-p-n3"]
    # Tokens and lengths bit for bit; log-probs to rounding: each device multiplies a smaller batch (CPU matmuls
    # round differently per shape), and fsdp-sharded parameters are gathered instead of reduced in partial sums.
    for mesh_cfg, spec in ((MeshConfig(data=4, fsdp=1), P(("data", "fsdp"), None, None, None)),
                           (MeshConfig(data=2, fsdp=1, tensor=2), P(("data", "fsdp"), "tensor", None, None)),
                           (MeshConfig(data=1, fsdp=4), P(("data", "fsdp"), None, None, None))):
        mesh = make_mesh(mesh_cfg)
        placed = jax.device_put(params, param_shardings(nnx.state(nnx.merge(graphdef, params)), mesh))
        plain = Sampler(graphdef, eos_ids=EOS, shard_cache=False)
        ref = plain(placed, prompts, 24, **kw)
        for max_rows in (0, 12):
            sampler = Sampler(graphdef, eos_ids=EOS)
            out = sampler(placed, prompts, 24, max_rows=max_rows, **kw)
            k = sampler._cache[0].k
            assert k.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4), (mesh_cfg, k.sharding)
            rows = 24 if max_rows == 0 else 12
            assert k.shape[0] == rows and k.addressable_shards[0].data.shape[0] == rows // (4 // mesh_cfg.tensor)
            assert_same_samples(out, ref, logprob_atol=2e-3)
            print("ok", mesh_cfg, max_rows, flush=True)
    # rows that the batch shards do not divide (5 prompts x 3 = 15): the cache stays as before
    sampler = Sampler(graphdef, eos_ids=EOS)
    sampler(placed, prompts[:5], 24, **kw)
    assert sampler._cache[0].k.sharding.is_equivalent_to(NamedSharding(mesh, P()), 4)
    print("ALL OK")
""")


@pytest.mark.slow
def test_sharded_cache_equals_unsharded_on_4_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(tests=TESTS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


# ---------------------------------------------------------------- controller


@pytest.mark.slow
def test_controller_releases_caches_and_samples_in_row_groups(tmp_path):
    """rollout.release_kv_cache frees each sampler's cache when its phase ends; evaluation always frees its
    cache; rollout.max_rows_per_call samples in groups and trains on exactly the same rows."""
    from helpers.tiny_run import tiny_config
    from trd_jax.controller import Trainer

    common = {"distill.mode": "opd", "distill.trajectory": "y_r", "train.steps": 1}
    plain = Trainer(tiny_config(**common), str(tmp_path / "plain"))
    released = []
    real_release = Sampler.release

    def spy(sampler):
        released.append(sampler)
        real_release(sampler)

    Sampler.release = spy
    try:
        plain.run()
        # release_kv_cache=False: the train samplers keep their caches; evaluation (teacher, initial, final)
        # released the refine sampler (teacher eval) and the eval sampler.
        assert plain.rollout_sampler.holds_cache and plain.refine_sampler.holds_cache
        assert not plain.eval_sampler.holds_cache
        assert released == [plain.eval_sampler, plain.refine_sampler, plain.eval_sampler]
        released.clear()
        grouped = Trainer(tiny_config(**common, **{"rollout.release_kv_cache": True,
                                                   "rollout.max_rows_per_call": 2}), str(tmp_path / "grouped"))
        grouped.run()
    finally:
        Sampler.release = real_release
    assert released == [grouped.eval_sampler, grouped.refine_sampler, grouped.rollout_sampler,
                        grouped.refine_sampler, grouped.eval_sampler]
    assert not any(s.holds_cache for s in (grouped.rollout_sampler, grouped.refine_sampler, grouped.eval_sampler))
    a, b = jax.tree.leaves(plain.state.params), jax.tree.leaves(grouped.state.params)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_in_segments_emits_the_same_rows(model, reference, name):
    """decode's segment (stop checked every few steps, the steps past it writing into slack columns): bit for
    bit the rows of one step per iteration, kept states included, with budgets and row groups."""
    graphdef, params = model
    segmented = Sampler(graphdef, eos_ids=EOS, decode_segment=5)
    assert_same_samples(segmented(params, prompts_of(), 24, **CASES[name]), reference[name])
    budgets = [3, 24, 1, 9, 13]
    plain = Sampler(graphdef, eos_ids=EOS, decode_segment=1)
    a = plain(params, prompts_of(), 24, budgets=budgets, max_rows=6, keep_hidden=True, **CASES[name])
    b = segmented(params, prompts_of(), 24, budgets=budgets, max_rows=6, keep_hidden=True, **CASES[name])
    assert_same_samples(b, a)
    np.testing.assert_array_equal(np.asarray(a.hidden), np.asarray(b.hidden))
    assert np.all(a.lengths <= np.repeat(budgets, CASES[name]["n"]))
