"""Continuous batching (trd_jax/continuous.py): rows decoded through fewer slots than rows, admitted as slots free
up, get exactly the static sampler's tokens and lengths (its draws, row by row) and its log-probs up to the
rounding of another batch shape: sampled (top-k / top-p), greedy, n samples per prompt, per-prompt budgets, any
slot count and segment length. And no slot idles while rows wait."""

import numpy as np
import pytest

from tests.test_sampler_memory import CASES, EOS, VOCAB, assert_same_samples, prompts_of, tiny_model
from trd_jax.continuous import generate
from trd_jax.sampling import ContinuousConfig, Sampler, SamplingConfig
from trd_jax.shapes import bucket

PROMPTS = prompts_of((5, 17, 3, 30, 9, 12, 4))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def static(model):
    graphdef, params = model
    sampler = Sampler(graphdef, eos_ids=EOS)
    return {name: sampler(params, PROMPTS, 24, **kw) for name, kw in CASES.items()}


@pytest.mark.parametrize("name,slots,segment", [(name, 3, 4) for name in sorted(CASES)]
                         + [("sample", 4, 1), ("greedy-n2", 32, 8)])  # 32 slots: more than rows
def test_the_static_samplers_tokens_through_fewer_slots(model, static, name, slots, segment):
    graphdef, params = model
    stats = {}
    out = generate(graphdef, params, PROMPTS, 24, slots=slots, segment=segment, eos_ids=EOS, stats=stats,
                   **CASES[name])
    assert_same_samples(out, static[name], logprob_atol=2e-3)  # another batch shape
    rows = len(PROMPTS) * CASES[name]["n"]
    assert stats["admissions"] >= (1 if slots >= rows else 2)
    # A prompt is prefilled once per admission that starts any of its samples: once in all with enough slots.
    assert len(PROMPTS) <= stats["prefilled"] <= rows and (slots < rows or stats["prefilled"] == len(PROMPTS))
    # Slots beyond the rows would decode padding: a call uses at most the rows' bucket (14 rows -> 16, not 32).
    assert stats["slots"] == min(slots, bucket(rows, 8))


def test_no_slot_idles_while_rows_wait(model):
    """Slot-steps run against the static sampler's row-steps for the same work: with more rows than slots,
    decoding continues through finished rows' slots instead of waiting for the longest row of a group."""
    graphdef, params = model
    sampling = SamplingConfig(1.0)
    prompts = prompts_of((4,) * 24)
    budgets = [24 if i % 6 == 0 else 4 for i in range(24)]  # a long tail: every sixth row runs 6x longer
    stats = {}
    out = generate(graphdef, params, prompts, 24, slots=4, segment=2, eos_ids=(), budgets=budgets, key=1,
                   sampling=sampling, stats=stats)
    np.testing.assert_array_equal(out.lengths, budgets)
    useful = sum(budgets)
    # Static groups of 4 rows each wait for their longest: every group holds a 24-token row -> 6 x 24 x 4.
    static_row_steps = 6 * 24 * 4
    assert stats["slot_steps"] < 0.5 * static_row_steps and stats["slot_steps"] >= useful
    # The budgets bind exactly as EOS would: the static sampler with the same budgets emits the same rows.
    ref = Sampler(graphdef)(params, prompts, 24, sampling=sampling, key=1, eos_ids=(), budgets=budgets)
    assert_same_samples(out, ref, logprob_atol=2e-3)


def test_bad_arguments(model):
    graphdef, params = model
    with pytest.raises(ValueError, match="budgets"):
        generate(graphdef, params, PROMPTS[:2], 8, slots=2, budgets=[9, 1])
    with pytest.raises(ValueError, match="slots"):
        generate(graphdef, params, PROMPTS[:2], 8, slots=0)
    assert VOCAB > 0


def test_a_run_with_continuous_batching_trains_the_static_samplers_rows(tmp_path):
    """rollout.continuous_slots: a tiny run's rollouts and evaluation go through 3 slots, with contiguous rows or a
    paged cache (rollout.kv_page_size; a pool of 2 rows' tokens, so rows are preempted); the same rows are sampled
    and trained (loss equal up to rounding), and the step reports the slots' occupancy."""
    import json

    from helpers.tiny_run import tiny_config
    from trd_jax.controller import Trainer

    overrides = {"train.steps": 1, "log.diagnostics": False, "eval.teacher": False}
    variants = {"static": {}, "slots": {"rollout.continuous_slots": 3},
                "paged": {"rollout.continuous_slots": 3, "rollout.kv_page_size": 8, "rollout.kv_pool_tokens": 128,
                          "task.max_prompt_tokens": 112}}
    runs = {}
    for name, over in variants.items():
        summary = Trainer(tiny_config(**overrides, **over), str(tmp_path / name)).run()
        with open(tmp_path / name / "metrics.jsonl") as f:
            runs[name] = (summary, [json.loads(line) for line in f])
    static, (a,) = runs["static"]
    assert "rollout/slot_occupancy" not in a
    for name in ("slots", "paged"):
        cont, (b,) = runs[name]
        assert a["tokens"] == b["tokens"] and a["length/y_o"] == b["length/y_o"], name
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
        assert 0 < b["rollout/slot_occupancy"] <= 1.5
        assert cont["final_eval"]["correct_counts"] == static["final_eval"]["correct_counts"], name


def test_paged_settings_are_checked():
    from helpers.tiny_run import tiny_config
    from trd_jax.config import resolve
    from trd_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout.kv_page_size.*continuous_slots"):
        resolve(tiny_config(**{"rollout.kv_page_size": 8}))
    with pytest.raises(ConfigError, match="rollout.kv_pool_tokens.*kv_page_size"):
        resolve(tiny_config(**{"rollout.continuous_slots": 2, "rollout.kv_pool_tokens": 64}))
    c = resolve(tiny_config(**{"rollout.continuous_slots": 2, "rollout.kv_page_size": 8})).rollout.continuous
    assert (c.slots, c.page_size, c.pool_tokens) == (2, 8, 0)
    # The pool must hold the longest row: prompt budget 64 + 12 new tokens = 75 positions, 10 pages of 8.
    short = {"rollout.continuous_slots": 2, "rollout.kv_page_size": 8, "task.max_prompt_tokens": 64}
    with pytest.raises(ConfigError, match="rollout.kv_pool_tokens: 72 tokens in pages of 8 cannot hold the longest"):
        resolve(tiny_config(**short, **{"rollout.kv_pool_tokens": 72}))
    assert resolve(tiny_config(**short, **{"rollout.kv_pool_tokens": 80})).rollout.continuous.pool_tokens == 80


SHARDED_SCRIPT = """
import sys
import jax
import numpy as np
sys.path.insert(0, {root!r})
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tests.test_sampler_memory import EOS, prompts_of, tiny_model
from trd_jax.continuous import generate
from trd_jax.sampling import ContinuousConfig, Sampler, SamplingConfig
from trd_jax.sharding import MeshConfig, make_mesh, param_shardings

assert jax.device_count() == 4
graphdef, params = tiny_model()
prompts = prompts_of((5, 17, 3, 30, 9, 12, 2, 21, 4, 6))
kw = dict(sampling=SamplingConfig(0.7, top_k=20, top_p=0.9), n=2, key=5)
ref = Sampler(graphdef, eos_ids=EOS, shard_cache=False)(params, prompts, 24, **kw)
for mesh_cfg, spec in ((MeshConfig(data=2, fsdp=1, tensor=2), P(("data", "fsdp"), "tensor", None, None)),):
    mesh = make_mesh(mesh_cfg)
    placed = jax.device_put(params, param_shardings(nnx.state(nnx.merge(graphdef, params)), mesh))
    stats = {{}}
    out = generate(graphdef, placed, prompts, 24, slots=8, segment=4, eos_ids=EOS, stats=stats, **kw)
    assert stats["cache_sharding"].is_equivalent_to(NamedSharding(mesh, spec), 4), stats["cache_sharding"]
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-3, rtol=0)
    print("ok", mesh_cfg, stats["compactions"], flush=True)
# A paged pool split over the batch axes: each shard's 4 slots draw pages from its own part (ids local to it), its
# devices decode only those; the pool pages over (data, fsdp), kv heads over tensor. pool_tokens 192: 12 pages of 8
# per part, under a part's 4 slots' longest rows, so rows are preempted and decoded again within their shard.
mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2))
placed = jax.device_put(params, param_shardings(nnx.state(nnx.merge(graphdef, params)), mesh))
stats = {{}}
out = generate(graphdef, placed, prompts, 24, slots=8, segment=4, eos_ids=EOS, stats=stats, page_size=8,
               pool_tokens=192, block_pages=2, **kw)
assert stats["page_shards"] == 2 and stats["pages"] == 12 and stats["cache_sharding"].is_equivalent_to(
    NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None)), 4), stats
assert stats["preemptions"] > 0 and stats["compactions"] > 0, stats
np.testing.assert_array_equal(out.tokens, ref.tokens)
np.testing.assert_array_equal(out.lengths, ref.lengths)
np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-3, rtol=0)
print("ok paged", stats["preemptions"], stats["compactions"], flush=True)
# Speculative decoding through the split pool: the static speculative sampler's rows.
drafts = [list(t[:n]) for t, n in zip(ref.tokens[::2], ref.lengths[::2])]
spec = dict(drafts=drafts, draft_tokens=3, **kw)
want = Sampler(graphdef, eos_ids=EOS, shard_cache=False)(params, prompts, 24, **spec)
stats = {{}}
out = generate(graphdef, placed, prompts, 24, slots=8, segment=2, eos_ids=EOS, stats=stats, page_size=4,
               block_pages=2, **spec)
assert stats["page_shards"] == 2, stats
np.testing.assert_array_equal(out.tokens, want.tokens)
np.testing.assert_array_equal(out.lengths, want.lengths)
print("ok speculative", stats["draft"], flush=True)
print("ALL OK")
"""


@pytest.mark.slow
def test_slots_sharded_over_4_cpu_devices_give_the_same_tokens():
    """The slots' cache sharded over the batch axes and kv heads over tensor (data=2 x tensor=2 CPU devices), the
    tail's halved batches too; a paged pool split over the batch axes (2 shards; preempting; speculative):
    the static sampler's tokens (one device, unsharded)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(root=root)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("name,slots,segment,page_size,pool_tokens", [
    ("top-k-top-p-n3", 3, 4, 4, 0),  # a pool for every slot's longest row: never preempted
    ("sample", 4, 2, 8, 96),  # a pool for about 1.5 rows of the longest length: rows preempted and decoded again
    ("greedy-n2", 32, 8, 16, 0),
])
def test_a_paged_cache_gives_the_static_samplers_tokens(model, static, name, slots, segment, page_size, pool_tokens):
    """The cache as pages (models/paged.py; page_pool.py allocates them per row and frees them when it ends): the same
    tokens as the static sampler, whatever the page size; a pool smaller than the slots' longest rows preempts rows
    and still emits them exactly."""
    graphdef, params = model
    stats = {}
    out = generate(graphdef, params, PROMPTS, 24, slots=slots, segment=segment, eos_ids=EOS, stats=stats,
                   page_size=page_size, pool_tokens=pool_tokens, block_pages=2, **CASES[name])
    assert_same_samples(out, static[name], logprob_atol=2e-3)
    assert 0 < stats["peak_pages"] <= stats["pages"]
    if pool_tokens:
        assert stats["pages"] == pool_tokens // page_size and stats["preemptions"] > 0
    else:
        assert stats["preemptions"] == 0


def test_a_pool_too_small_for_one_row_is_refused(model):
    graphdef, params = model
    with pytest.raises(ValueError, match="pool_tokens=16: 2 pages of 8 cannot hold the longest row"):
        generate(graphdef, params, PROMPTS, 24, slots=2, page_size=8, pool_tokens=16)


def test_key_groups_give_each_group_its_own_calls_draws(model, monkeypatch):
    """Sampler(key_groups=...): consecutive groups of prompts, each with its own key (an evaluation's chunks), give the
    rows of one call per group; the static sampler runs the groups in turn, continuous batching (contiguous or paged)
    streams them all through its slots in one call."""
    import jax

    from trd_jax import sampling
    from trd_jax.sampling import ContinuousConfig

    graphdef, params = model
    sizes, starts = [3, 3, 1], [0, 3, 6]
    keys = [jax.random.fold_in(jax.random.key(7), c) for c in starts]
    kw = dict(sampling=SamplingConfig(0.7, top_k=20, top_p=0.9), n=2)
    sampler = Sampler(graphdef, eos_ids=EOS)
    parts = [sampler(params, PROMPTS[a:a + g], 24, key=k, **kw) for a, g, k in zip(starts, sizes, keys)]
    lengths = np.concatenate([p.lengths for p in parts])
    rows = [t[:n] for p in parts for t, n in zip(p.tokens, p.lengths)]
    for continuous, rows_per_slot in ((ContinuousConfig(), 16), (ContinuousConfig(slots=4, segment=3), 16),
                                      (ContinuousConfig(slots=4, segment=3, page_size=8), 16),
                                      (ContinuousConfig(slots=4, segment=3), 2)):  # calls of <= 8 rows: 2 calls
        monkeypatch.setattr(sampling, "CONTINUOUS_CALL_ROWS_PER_SLOT", rows_per_slot)
        out = Sampler(graphdef, eos_ids=EOS, continuous=continuous)(params, PROMPTS, 24, key=keys, key_groups=sizes,
                                                                     **kw)
        np.testing.assert_array_equal(out.lengths, lengths)
        assert [list(t[:n]) for t, n in zip(out.tokens, out.lengths)] == [list(r) for r in rows], continuous
    with pytest.raises(ValueError, match="key_groups"):
        sampler(params, PROMPTS, 24, key=keys, key_groups=[3, 3], **kw)


def test_a_lora_adapted_model_gives_the_static_samplers_tokens(model):
    """A student under LoRA samples as the base model merged with its adapters' state (the rollout's params): the
    adapters (B made nonzero, so they change the model) go through continuous batching over a paged cache as
    through the static sampler."""
    import jax
    from flax import nnx

    from trd_jax.models import lora

    graphdef, params = model
    student = nnx.merge(graphdef, params)
    lora.add_lora(student, lora.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(params=1))
    for i, (_, _, adapter) in enumerate(lora.adapters(student)):  # B random (it starts at 0): the model changes
        b = adapter.b.get_value()
        adapter.b.set_value(0.5 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
    lora_graph, state = nnx.split(student)
    base = Sampler(graphdef, eos_ids=EOS)(params, PROMPTS, 24, **CASES["sample"])
    ref = Sampler(lora_graph, eos_ids=EOS)(state, PROMPTS, 24, **CASES["sample"])
    assert not np.array_equal(ref.tokens, base.tokens)
    out = generate(lora_graph, state, PROMPTS, 24, slots=3, segment=4, eos_ids=EOS, page_size=8, **CASES["sample"])
    assert_same_samples(out, ref, logprob_atol=2e-3)


@pytest.mark.parametrize("name,page_size", [("sample", 0), ("top-k-top-p-n3", 8), ("greedy-n2", 4)])
def test_kept_states_are_the_static_samplers(model, name, page_size):
    """keep_hidden through continuous batching (refine's states for the score phase): each token's final-layer
    state as the static sampler keeps it, zero past each row's length; 3 slots, so rows wait and slots shrink."""
    graphdef, params = model
    static = Sampler(graphdef, eos_ids=EOS)(params, PROMPTS, 24, keep_hidden=True, **CASES[name])
    out = generate(graphdef, params, PROMPTS, 24, slots=3, segment=4, eos_ids=EOS, keep_hidden=True,
                   page_size=page_size, block_pages=2, **CASES[name])
    assert_same_samples(out, static, logprob_atol=2e-3)
    assert out.hidden.shape == static.hidden.shape and out.hidden.dtype == static.hidden.dtype
    np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(static.hidden), atol=2e-3)  # as the log-probs
    past = np.arange(out.hidden.shape[1])[None, :] >= out.lengths[:, None]
    assert past.any() and np.all(np.asarray(out.hidden)[past] == 0)


@pytest.mark.parametrize("name,page_size,mode", [("sample", 0, "aligned"), ("top-k-top-p-n3", 8, "aligned"),
                                                 ("greedy-n2", 4, "lookup")])
def test_speculation_through_slots_gives_the_static_speculative_samplers_rows(model, name, page_size, mode):
    """Speculative decoding through 3 slots (rows wait for them; paged or not; drafts aligned or looked up): the
    static speculative sampler's tokens row for row (each row's pass p draws the same numbers), its kept states, and
    the same draft statistics."""
    graphdef, params = model
    plain = Sampler(graphdef, eos_ids=EOS)(params, PROMPTS, 24, **CASES[name])
    rng = np.random.default_rng(0)  # drafts: each prompt's first plain row with a fifth of its tokens changed
    per = CASES[name]["n"]
    drafts = ([[t if rng.random() > 0.2 else int(rng.integers(1, VOCAB)) for t in plain.tokens[i * per, :n]]
               for i, n in enumerate(plain.lengths[::per])] if mode == "aligned" else PROMPTS)
    spec = dict(drafts=drafts, draft_tokens=3, draft_mode=mode, keep_hidden=True, **CASES[name])
    static = Sampler(graphdef, eos_ids=EOS)
    ref = static(params, PROMPTS, 24, **spec)
    stats = {}
    out = generate(graphdef, params, PROMPTS, 24, slots=3, segment=2, eos_ids=EOS, page_size=page_size,
                   block_pages=2, stats=stats, **spec)
    assert_same_samples(out, ref, logprob_atol=2e-3)
    np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(ref.hidden), atol=2e-3)
    assert stats["draft"] == static.last_draft_stats and (mode == "lookup" or stats["draft"]["accepted"] > 0)
    assert stats["admissions"] >= 2  # rows waited for slots
    # Through the Sampler: its continuous calls take the drafts too.
    through = Sampler(graphdef, eos_ids=EOS, continuous=ContinuousConfig(slots=3, segment=2, page_size=page_size,
                                                                          block_pages=2))
    assert_same_samples(through(params, PROMPTS, 24, **spec), ref, logprob_atol=2e-3)
    assert through.last_draft_stats == static.last_draft_stats and through.last_continuous_stats["segments"] > 0
