"""The memory planner (trd_jax/memory_plan/, its command line cli.py): parameter, optimizer and KV-cache bytes
against hand counts, per-device division under FSDP, the analytical update activations against XLA's compiled
memory analysis, the fit verdict, and the command line on the Qwen3 recipe (no model files)."""

import json

import pytest

from trd_jax import memory_plan as mp
from trd_jax.config import base_config, resolve
from trd_jax.models.config import ModelConfig
from trd_jax.models.lora import LoRAConfig
from trd_jax.losses import LossConfig
from trd_jax.memory_plan import cli

# d=64, 2 layers, GQA (4 query heads, 2 kv heads of 16), MLP 128, vocab 256, untied, Qwen3's q/k norms.
D, LAYERS, H, K, HD, M, V = 64, 2, 4, 2, 16, 128, 256
SMALL = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=M, num_layers=LAYERS, num_heads=H,
                    num_kv_heads=K, head_dim=HD, qk_norm=True, tie_word_embeddings=False)

EMBED = V * D  # 16,384
PER_LAYER = (D * H * HD  # q_proj 4,096
             + 2 * D * K * HD  # k_proj, v_proj 2 x 2,048
             + H * HD * D  # o_proj 4,096
             + 2 * HD  # q_norm, k_norm (head_dim: replicated by the rules)
             + 2 * D  # input_norm, post_attn_norm
             + 3 * D * M)  # gate, up, down 3 x 8,192; in all 37,024
HAND_PARAMS = EMBED + LAYERS * PER_LAYER + D + D * V  # + final_norm + lm_head: 106,880
REPLICATED = LAYERS * 2 * HD  # the q/k norm weights: no mesh axis


def one_device(**kw):
    return dict(data=1, fsdp=1, tensor=1, **kw)


def test_parameter_count_by_hand():
    state = mp.state_bytes(SMALL, tuple(sorted(one_device().items())), True)
    assert state.num_params == HAND_PARAMS == SMALL.num_params
    assert state.params == HAND_PARAMS * 4
    tied = mp.state_bytes(SMALL.replace(tie_word_embeddings=True, param_dtype="bfloat16"),
                          tuple(sorted(one_device().items())), False)
    assert tied.num_params == HAND_PARAMS - D * V and tied.params == (HAND_PARAMS - D * V) * 2
    assert tied.optimizer == 0  # a frozen teacher has no optimizer state


def test_optimizer_bytes_are_two_moments_in_the_parameter_dtype():
    sizes = tuple(sorted(one_device().items()))
    counters = 2 * 4  # adam's and the schedule's int32 step counts
    f32 = mp.state_bytes(SMALL, sizes, True)
    assert f32.optimizer == 2 * HAND_PARAMS * 4 + counters
    # make_optimizer's AdamW keeps mu and nu in the parameters' dtype: bfloat16 moments for bfloat16 params
    bf16 = mp.state_bytes(SMALL.replace(param_dtype="bfloat16"), sizes, True)
    assert bf16.optimizer == 2 * HAND_PARAMS * 2 + counters
    assert set(bf16.optimizer_dtypes) == {"bfloat16", "int32"}


@pytest.mark.parametrize("fsdp", [4, 8])
def test_per_device_division_under_fsdp(fsdp):
    sizes = tuple(sorted(dict(data=1, fsdp=fsdp, tensor=1).items()))
    state = mp.state_bytes(SMALL, sizes, True)
    # every matrix and the embed-sized norms have an "embed" axis (64, divisible by 4 and 8) on fsdp
    per_device = (HAND_PARAMS - REPLICATED) // fsdp + REPLICATED
    assert state.params == per_device * 4
    assert state.params_total == HAND_PARAMS * 4
    assert state.optimizer == 2 * per_device * 4 + 8  # moments sharded like the parameters, counters replicated
    assert state.layer_params_total == PER_LAYER * 4


def test_a_dimension_the_mesh_does_not_divide_stays_replicated():
    odd = SMALL.replace(hidden_size=60)  # 60 % 8 != 0: the rules leave "embed" unsharded
    state = mp.state_bytes(odd, tuple(sorted(dict(data=1, fsdp=8, tensor=1).items())), False)
    assert state.params == state.params_total


# LoRA rank 8 on all seven projections of SMALL: rank x (fan_in + fan_out) per projection.
R = 8
LORA_PER_LAYER = R * ((D + H * HD) + 2 * (D + K * HD) + (H * HD + D) + 2 * (D + M) + (M + D))  # 8,192
# Per device under fsdp: the adapter matrices with an "embed" axis (A of q, k, v, gate, up; B of o, down) shard
# like their base matrices; the others (rank x heads, mlp) are replicated on a mesh without a tensor axis.
LORA_EMBED_PER_LAYER = R * (5 * D + 2 * D)


def test_lora_adapter_and_optimizer_bytes_by_hand():
    lora = LoRAConfig(rank=R, alpha=16.0)
    adapters = LAYERS * LORA_PER_LAYER
    counters = 2 * 4
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        state = mp.state_bytes(SMALL.replace(param_dtype=dtype), tuple(sorted(one_device().items())), True, lora)
        assert state.trainable_params == adapters == 16_384 and state.num_params == HAND_PARAMS
        assert state.trainable == adapters * 4  # float32 adapters whatever the base's dtype
        assert state.params == HAND_PARAMS * size + adapters * 4
        assert state.optimizer == 2 * adapters * 4 + counters  # AdamW on the adapters alone
    sharded = mp.state_bytes(SMALL, tuple(sorted(dict(data=1, fsdp=4, tensor=1).items())), True, lora)
    per_device = LAYERS * (LORA_EMBED_PER_LAYER // 4 + LORA_PER_LAYER - LORA_EMBED_PER_LAYER)
    assert sharded.trainable == per_device * 4 and sharded.optimizer == 2 * per_device * 4 + counters


def test_lora_opsd_plan_drops_the_teacher_copy_and_base_moments():
    work = _workload(**{"distill.mode": "opsd", "distill.opsd_teacher": "initial"})
    models = {"student": mp.ModelInfo(SMALL, "test")}
    mesh, acc = one_device(), mp.ACCELERATORS["v5e"]
    full = mp.make_plan(work, models, mesh, acc)
    lora = mp.make_plan(work, models, mesh, acc, mp.PlanOptions(lora=LoRAConfig(rank=R, alpha=16.0)))
    items = {i.name: i.bytes for i in lora.persistent}
    adapters = LAYERS * LORA_PER_LAYER * 4
    assert items["OPSD frozen initial copy"] == 0 and items["LoRA adapters"] == adapters
    assert items["student base parameters (frozen)"] == HAND_PARAMS * 4
    assert items["optimizer state"] == 2 * adapters + 8
    # full fine-tuning: parameters + two moments + the frozen copy; LoRA: base + adapters + their moments
    assert full.persistent_bytes - lora.persistent_bytes == 3 * HAND_PARAMS * 4 - 3 * adapters
    assert lora.update.gradients == 2 * adapters and full.update.gradients == 2 * HAND_PARAMS * 4


def test_kv_cache_bytes_by_hand():
    bf16 = SMALL.replace(dtype="bfloat16")
    # k and v per layer, [rows, kv_heads, length, head_dim] in the compute dtype
    assert mp.kv_cache_bytes(bf16, 3, 100) == LAYERS * 2 * 3 * K * 100 * HD * 2 == 76_800
    assert mp.kv_cache_bytes(SMALL, 3, 100) == 2 * 76_800
    assert mp.kv_cache_bytes(bf16, 3, 100, kv_shards=2) == 76_800 // 2
    qwen = mp.builtin_model("qwen3-1.7b", dtype="bfloat16", param_dtype="bfloat16")
    assert mp.kv_cache_bytes(qwen, 1, 1) == 2 * 28 * 8 * 128 * 2  # 112 KiB per token


def _workload(**overrides):
    return mp.workload_from_settings(_settings(**overrides))


def _settings(**overrides):
    cfg = base_config()
    cfg.train.update(batch_size=8, micro_batches=2)
    cfg.task.max_prompt_tokens = 32
    cfg.rollout.max_new_tokens = 64
    cfg.refine.update(prompt_budget=96, rewrite_budget=64)
    cfg.eval.update(n=2, max_new_tokens=64)
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return resolve(cfg)


def test_plan_kv_caches_replicated_and_sharded():
    work = _workload()
    models = {"student": mp.ModelInfo(SMALL.replace(dtype="bfloat16"), "test"),
              "teacher": mp.ModelInfo(SMALL.replace(dtype="bfloat16", num_layers=3), "test")}
    mesh = dict(data=1, fsdp=4, tensor=1)
    acc = mp.ACCELERATORS["v5e"]
    rollout_rows, refine_len = 8, 96 + 64  # bucket(8) rows; refine prompt budget + rewrite budget

    def item(plan, phase, prefix):
        return next(i.bytes for p in plan.phases if p.name == phase for i in p.items if i.name.startswith(prefix))

    plan = mp.make_plan(work, models, mesh, acc, mp.PlanOptions(kv_cache="replicated"))
    assert item(plan, "rollout", "rollout KV cache") == mp.kv_cache_bytes(models["student"].config, rollout_rows,
                                                                           32 + 64)
    teacher_layers = 3
    assert item(plan, "refine", "refine KV cache") == teacher_layers * 2 * rollout_rows * K * refine_len * HD * 2
    sharded = mp.make_plan(work, models, mesh, acc)  # the Sampler's default
    assert item(sharded, "rollout", "rollout KV cache") * 4 == item(plan, "rollout", "rollout KV cache")
    # rollout.max_rows_per_call: a cache of that many rows
    grouped = mp.make_plan(work, models, mesh, acc, mp.options_from_settings(
        _settings(**{"rollout.max_rows_per_call": 4})))
    assert item(grouped, "rollout", "rollout KV cache") * 2 == item(sharded, "rollout", "rollout KV cache")
    # without rollout.release_kv_cache the rollout cache is still held in refine, and both after it
    assert any(i.name.startswith("rollout KV cache (held") for p in plan.phases if p.name == "refine" for i in p.items)
    assert any(i.name.startswith("refine KV cache (kept") for p in plan.phases if p.name == "update" for i in p.items)
    early = mp.make_plan(_workload(**{"rollout.release_kv_cache": True}), models, mesh, acc)
    assert not any("cache" in i.name and ("held" in i.name or "kept" in i.name) for p in early.phases
                   for i in p.items)


def test_speculative_drafts_widen_the_caches_they_write_into():
    """Speculative refine writes refine.draft_tokens positions past the rewrite budget, prompt lookup
    rollout.prompt_lookup_tokens past the rollout budget: the caches are planned that much longer."""
    models = {"student": mp.ModelInfo(SMALL, "test"), "teacher": mp.ModelInfo(SMALL.replace(num_layers=3), "test")}
    mesh, acc = dict(data=1, fsdp=1, tensor=1), mp.ACCELERATORS["v5e"]

    def caches(**overrides):
        plan = mp.make_plan(_workload(**overrides), models, mesh, acc)
        found = {i.name: i.bytes for p in plan.phases for i in p.items}
        return found["rollout KV cache (student)"], found["refine KV cache (teacher)"]

    rollout, refine = caches()
    work = _workload()
    spec_rollout, spec_refine = caches(**{"refine.speculative": True, "refine.draft_tokens": 8,
                                          "rollout.prompt_lookup_tokens": 4})
    assert spec_refine == mp.kv_cache_bytes(models["teacher"].config, work.rows, work.refine_prompt + work.rewrite + 8)
    assert spec_rollout == mp.kv_cache_bytes(models["student"].config, work.rows, work.prompt + work.max_new + 4)
    assert spec_refine > refine and spec_rollout > rollout


def test_continuous_batching_plans_its_slots_on_every_device_and_frees_them():
    """rollout.continuous_slots: the student's rollout and eval caches and the teacher's refine cache hold the slots
    (sharded over the batch axes where they divide them, else on every device) and are not held after their
    phase."""
    work = _workload()
    models = {"student": mp.ModelInfo(SMALL.replace(dtype="bfloat16"), "test"),
              "teacher": mp.ModelInfo(SMALL.replace(dtype="bfloat16", num_layers=3), "test")}
    mesh, acc = dict(data=1, fsdp=4, tensor=1), mp.ACCELERATORS["v5e"]

    def items(plan, phase):
        return {i.name: i.bytes for p in plan.phases if p.name == phase for i in p.items}

    static = mp.make_plan(work, models, mesh, acc)
    slots = mp.make_plan(work, models, mesh, acc, mp.options_from_settings(
        _settings(**{"rollout.continuous_slots": 3})))
    assert items(slots, "rollout")["rollout KV cache (student)"] == mp.kv_cache_bytes(
        models["student"].config, 3, 32 + 64)
    # Refine runs through the slots too (3 slots do not divide fsdp=4: on every device), and frees them after.
    assert items(slots, "refine")["refine KV cache (teacher)"] == mp.kv_cache_bytes(
        models["teacher"].config, 3, work.refine_prompt + work.rewrite)
    assert not any(name.startswith("refine KV cache") for name in items(slots, "score"))
    assert any(name.startswith("refine KV cache") for name in items(static, "score"))
    eight = mp.make_plan(work, models, mesh, acc, mp.options_from_settings(
        _settings(**{"rollout.continuous_slots": 8})))  # 8 slots over fsdp=4: 2 per device
    assert items(eight, "rollout")["rollout KV cache (student)"] == mp.kv_cache_bytes(
        models["student"].config, 2, 32 + 64)
    assert not any(name.startswith("rollout KV cache (held") for name in items(slots, "refine"))
    assert any(name.startswith("rollout KV cache (held") for name in items(static, "refine"))
    # The outputs (i32 tokens + f32 log-probs per new token): the static sampler's rows on this device (8 rollout
    # rows over fsdp=4); under continuous batching a whole call's rows and the scratch row, on every device.
    out = "sampled tokens and log-probs"
    assert items(static, "rollout")[out] == 2 * 64 * 8
    assert items(slots, "rollout")[out] == (8 + 1) * 64 * 8
    assert items(slots, "eval")[out] == (work.eval_rows + 1) * 64 * 8 and work.eval_rows <= 16 * 3


def test_reused_refine_states_are_planned_in_refine_and_score():
    """refine.reuse_states under refine-context scoring: [rows, rewrite, d_teacher] per device, twice in refine
    (the loop's buffer and the rows gathered) and once in score; nothing without it or under vanilla scoring."""
    models = {"student": mp.ModelInfo(SMALL.replace(dtype="bfloat16"), "test"),
              "teacher": mp.ModelInfo(SMALL.replace(dtype="bfloat16", hidden_size=96), "test")}
    mesh, acc = dict(data=2, fsdp=1, tensor=1), mp.ACCELERATORS["v5e"]

    def kept(plan, phase):
        return sum(i.bytes for p in plan.phases if p.name == phase for i in p.items if i.name.startswith("kept"))

    plan = mp.make_plan(_workload(**{"distill.teacher_context": "refine"}), models, mesh, acc)
    one = 4 * 64 * 96 * 2  # 8 rows over 2 data shards, rewrite budget 64, d=96, bfloat16
    assert (kept(plan, "refine"), kept(plan, "score")) == (2 * one, one)
    for off in ({"distill.teacher_context": "refine", "refine.reuse_states": False},
                {"distill.teacher_context": "vanilla"}):
        plan = mp.make_plan(_workload(**off), models, mesh, acc)
        assert kept(plan, "refine") == kept(plan, "score") == 0


def test_offline_training_plans_no_teacher_and_the_stored_targets():
    """offline.dir (trd_jax/offline): no teacher, no sampling or scoring phases, the stored top-k targets held in the
    update, [rows, R, k] ids and log-probs + [rows, R] tail and token log-prob; a lower peak than online."""
    models = {"student": mp.ModelInfo(SMALL.replace(dtype="bfloat16"), "test"),
              "teacher": mp.ModelInfo(SMALL.replace(dtype="bfloat16", num_layers=4), "test")}
    mesh, acc = dict(data=2, fsdp=1, tensor=1), mp.ACCELERATORS["v5e"]
    online = mp.make_plan(_workload(), models, mesh, acc)
    offline = mp.make_plan(_workload(**{"offline.dir": "/targets", "offline.top_k": 16}), models, mesh, acc)
    assert [p.name for p in offline.phases] == ["update", "eval"]
    assert offline.teacher_state is None and not any("teacher" in i.name for i in offline.persistent)
    stored = next(i.bytes for i in offline.phases[0].items if i.name.startswith("stored targets"))
    assert stored == 4 * 64 * (16 * 8 + 8)  # 8 rows over 2 data shards, response width 64
    assert offline.peak_bytes < online.peak_bytes
    assert offline.persistent_bytes < online.persistent_bytes


def test_fused_loss_is_chunk_by_vocab_not_rows_by_response_by_vocab():
    qwen = mp.builtin_model("qwen3-1.7b", dtype="bfloat16", param_dtype="bfloat16")
    loss = mp.loss_buffers(qwen, 4096, rows=1, response=16384, loss=LossConfig(chunk_size=1024))
    head_grad = 2048 * 151936 * 4
    chunks = 2 * 1024 * 151936 * 4 + 1024 * 151936 * 2
    hidden = 16384 * 2 * (2 * 2048 + 4096)
    assert loss == chunks + head_grad + hidden
    assert mp.full_logits_bytes(151936, 1, 16384) > 3 * loss  # one unfused f32 [1, R, V] array alone


# The analytical update activations against XLA:CPU's memory analysis of the jitted update step (compiled, not
# run) of a small Qwen3-like model: 4 layers, 2 rows x 256 tokens, so that attention scores, MLP activations,
# gradients and the loss all count. Tolerance: the estimate within -20% / +25% of the compiled temp size
# (measured 0.98-1.11 when written).
TOLERANCE = (0.80, 1.25)
VALIDATION_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True)
VALIDATION_CASE = dict(rows=2, context=16, response=240, chunk_size=32, teacher_hidden=64)


@pytest.mark.slow
def test_analytical_update_activations_match_compiled_memory_analysis():
    """Dense and blockwise attention (tiles of 64: 4 x 4 tiles over 256 tokens), every remat policy."""
    models = {"dense": VALIDATION_MODEL, "blockwise": dict(VALIDATION_MODEL, attention="blockwise", attention_block=64)}
    cases = [dict(model=models[a], remat=remat, **VALIDATION_CASE) for a in models for remat in mp.REMAT]
    measured = {(c["model"].get("attention", "dense"), c["remat"]): r["temp"]
                for c, r in zip(cases, mp.measure_in_subprocess(cases))}
    for (attention, remat), temp in measured.items():
        estimate = mp.analytical_update_temp(ModelConfig(**models[attention]), remat=remat, **VALIDATION_CASE)
        assert TOLERANCE[0] <= estimate / temp <= TOLERANCE[1], (attention, remat, estimate, temp)
    for attention in models:  # remat works under the memory-minimising scheduler
        assert measured[attention, "full"] < 0.6 * measured[attention, "none"]
    assert measured["blockwise", "none"] < 0.5 * measured["dense", "none"]  # no [heads, T, T] scores kept


def test_fit_verdict_and_headroom():
    work = _workload()
    models = {"student": mp.ModelInfo(SMALL, "test"), "teacher": mp.ModelInfo(SMALL, "test")}
    mesh = dict(data=1, fsdp=4, tensor=1)
    peak = mp.make_plan(work, models, mesh, mp.ACCELERATORS["v5e"]).peak_bytes
    roomy = mp.Accelerator("roomy", "roomy", int(peak / 0.9) + 1)
    tight = mp.Accelerator("tight", "tight", int(peak / 0.9) - 1)
    assert mp.make_plan(work, models, mesh, roomy).fits
    assert not mp.make_plan(work, models, mesh, tight).fits
    assert mp.make_plan(work, models, mesh, tight, mp.PlanOptions(headroom=0.0)).fits
    # a micro-batch that does not split over the devices is an error whatever the memory
    bad = _workload(**{"train.micro_batches": 4})  # 8 rows / 4 = 2 rows over 4 devices
    plan = mp.make_plan(bad, models, mesh, mp.Accelerator("huge", "huge", 2**50))
    assert not plan.fits and plan.errors


def test_cli_qwen3_opd_1_7b_trd_v5p_8(capsys):
    """The recipe as configured (blockwise attention, 16 rows per sampler call, 32 per scoring forward) fits a
    v5p-8; the figures are checked by hand (full fine-tuning here; LoRA below)."""
    code = cli.main(["--config", "configs/qwen3.py:opd,1.7b,trd,v5p-8", "--config.lora.enabled=false"])
    out = capsys.readouterr().out
    assert code == 0 and "-> FITS" in out, out[-3000:]
    assert "TPU v5p: 95.00 GiB" in out and "data=1 fsdp=4 tensor=1: 4 devices" in out
    assert "1,720,574,976 params" in out and "8,190,735,360 params" in out  # Qwen3-1.7B, Qwen3-8B
    assert "attention blockwise/blockwise (student/teacher)" in out
    student = 1_720_574_976 * 2 / 4 / 2**30  # bf16, every matrix sharded over 4
    assert f"student parameters{'':<34}{student:>12.2f}" in out
    assert f"optimizer state{'':<37}{2 * student:>12.2f}" in out
    # 16 rows per call over 4 devices x (2048 + 16384) slots x 28 layers x k, v x 8 kv heads x 128 x bf16
    assert f"rollout KV cache (student){'':<26}{4 * 18432 * 2 * 28 * 8 * 128 * 2 / 2**30:>12,.2f}" in out


def test_cli_suggests_the_config_that_fits(capsys):
    """Without its memory settings the recipe does not fit; the suggested config changes make it fit."""
    lean = ["--attention", "dense", "--config.rollout.max_rows_per_call=0", "--config.train.max_score_rows=0"]
    code = cli.main(["--config", "configs/qwen3.py:opd,1.7b,trd,v5p-8", *lean])
    out = capsys.readouterr().out
    assert code == cli.DOES_NOT_FIT and "DOES NOT FIT" in out
    suggested = [line for line in out.splitlines() if line.startswith("  ") and ": --config." in line]
    assert any("--config.student.attention=blockwise --config.teacher.attention=blockwise" in s for s in suggested)
    assert ": fits" in out.splitlines()[-1]
    flags = [f for line in suggested for f in line.split(": ", 1)[1].split("  -> ")[0].split()]
    assert cli.main(["--config", "configs/qwen3.py:opd,1.7b,trd,v5p-8", *lean, *flags]) == 0
    assert "-> FITS" in capsys.readouterr().out


def test_cli_qwen3_recipe_plans_lora(capsys):
    """configs/qwen3.py trains LoRA r 64 on all seven projections: the plan holds the bf16 base, float32
    adapters and their moments, and OPSD's initial teacher adds no copy."""
    cli.main(["--config", "configs/qwen3.py:opsd,1.7b,trd,v5p-8", "--no-suggest"])
    out = capsys.readouterr().out
    d, h, k, hd, m, layers = 2048, 16, 8, 128, 6144, 28
    adapters = layers * 64 * ((d + h * hd) + 2 * (d + k * hd) + (h * hd + d) + 3 * (d + m))
    assert f"{adapters:,} trainable parameters" in out  # 69,730,304
    base = 1_720_574_976 * 2 / 4 / 2**30  # bf16, every matrix sharded over 4
    assert f"student base parameters (frozen){'':<20}{base:>12.2f}" in out
    assert f"OPSD frozen initial copy{'':<28}{0:>12.2f}" in out
    assert "AdamW mu + nu in float32, adapters only" in out


@pytest.mark.parametrize("spec", [f"{s},{m},trd,{hw}" for s in ("opd", "opsd") for m in ("1.7b", "4b")
                                  for hw in ("v5p-8", "h100x8")])
def test_cli_recipes_fit_as_configured(capsys, spec):
    code = cli.main(["--config", f"configs/qwen3.py:{spec}", "--no-suggest"])
    out = capsys.readouterr().out
    assert code == 0 and "-> FITS" in out, out[-2000:]


def test_cli_local_config_json_overrides_and_errors(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(mp.BUILTIN_MODELS["qwen3-1.7b"]))
    args = ["--config", "configs/qwen3.py:opsd,1.7b,trd,v5p-8", "--model-config", f"student={tmp_path}",
            "--no-suggest", "--config.train.micro_batches=64"]
    assert cli.main(args) == cli.DOES_NOT_FIT
    out = capsys.readouterr().out
    assert f"[{tmp_path}]" in out and "1,720,574,976 params" in out
    assert "OPSD frozen initial copy" in out
    assert "error: a micro-batch of 2 rows does not split over the 4" in out
    assert cli.main(["--config", "configs/qwen3.py:opd,1.7b,trd,v5p-8", "--config.train.micro_batchez=4"]) == 2
    assert "config.train.micro_batchez: unknown key" in capsys.readouterr().err
    assert cli.main(["--config", "configs/default.py"]) == 2  # names no hardware
    assert "--accelerator is required" in capsys.readouterr().err


def test_a_paged_cache_is_planned_by_its_pool():
    """rollout.kv_page_size: the slots' cache is a pool of pages, kv heads over tensor: every slot's longest row in
    whole pages by default, kv_pool_tokens when set, split over the batch shards where they divide the slots (else
    whole on every one), plus one scratch page per part."""
    work = _workload()
    models = {"student": mp.ModelInfo(SMALL.replace(dtype="bfloat16"), "test"),
              "teacher": mp.ModelInfo(SMALL.replace(dtype="bfloat16", num_layers=3), "test")}
    mesh, acc = dict(data=1, fsdp=4, tensor=1), mp.ACCELERATORS["v5e"]

    def rollout_cache(**over):
        plan = mp.make_plan(work, models, mesh, acc, mp.options_from_settings(_settings(**over)))
        (item,) = [i for p in plan.phases if p.name == "rollout" for i in p.items
                   if i.name == "rollout KV cache (student)"]
        return item

    full = rollout_cache(**{"rollout.continuous_slots": 8, "rollout.kv_page_size": 16})  # 8 slots over 4 shards
    row = -(-(32 + 64) // 16) * 16
    assert full.bytes == mp.kv_cache_bytes(models["student"].config, 1, 8 * row // 4 + 16)
    assert "paged pool of" in full.note and "split over 4" in full.note
    small = rollout_cache(**{"rollout.continuous_slots": 8, "rollout.kv_page_size": 16, "rollout.kv_pool_tokens": 300})
    assert small.bytes == mp.kv_cache_bytes(models["student"].config, 1, 5 * 16 + 16)  # 18 pages: 5 per part
    whole = rollout_cache(**{"rollout.continuous_slots": 6, "rollout.kv_page_size": 16})  # 6 slots: not over 4
    assert whole.bytes == mp.kv_cache_bytes(models["student"].config, 1, 6 * row + 16)
    assert "whole on every batch shard" in whole.note


def test_the_package_runs_as_the_command_line():
    """python -m trd_jax.memory_plan is the planner's command line (python -m trd_jax.tools.plan, its old name, too)."""
    import subprocess
    import sys

    for module in ("trd_jax.memory_plan", "trd_jax.tools.plan"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "--config" in out.stdout and "--accelerator" in out.stdout, out.stderr[-2000:]
