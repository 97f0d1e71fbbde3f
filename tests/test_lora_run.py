"""OPSD with LoRA through the host controller (tiny models, the arithmetic task): the initial teacher is the
student's own base with the adapters off (the same buffers, no second copy), its logits stay the base model's
while the student moves; the summary's persistent bytes show the saving; checkpoints hold the adapters, resume
is bitwise exact, the run's student loads merged, and the exports are a merged folder and PEFT adapters."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from helpers.tiny_run import tiny_config
from trd_jax.controller import Trainer
from trd_jax.models import lora
from trd_jax.models.hf_io import load_hf
from trd_jax.models.peft_io import load_peft_adapter
from trd_jax.roles import build_model
from trd_jax.run_checkpoint import load_run_student

LORA_OPSD = {"distill.mode": "opsd", "distill.trajectory": "y_r", "distill.opsd_teacher": "initial",
             "lora.enabled": True, "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "eval.initial": False,
             "eval.n": 1,
             "eval.num_problems": 2, "log.diagnostics": False}


def _logits(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model.logits(model(tokens, positions, jnp.ones(tokens.shape, bool))[0]))


def _pointers(tree):
    return [x.addressable_data(0).unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 20, (2, 12)))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_opsd")
    trainer = Trainer(tiny_config(**LORA_OPSD), str(workdir))
    teacher_graph, teacher_params = trainer.t_graph, trainer.teacher_params
    before = dict(teacher=_logits(teacher_graph, teacher_params, TOKENS),
                  student=_logits(trainer.s_graph, trainer._student_params(), TOKENS),
                  pointers=_pointers(trainer.base_params))
    summary = trainer.run()
    return trainer, summary, before, workdir


def test_teacher_is_the_frozen_base_with_adapters_off(lora_run):
    trainer, summary, before, _ = lora_run
    s = trainer.s
    assert summary["status"] == "completed" and summary["steps"] == 2
    # No second copy: the teacher's parameters are the student's base state, buffer for buffer.
    assert trainer.teacher_params is trainer.base_params
    assert _pointers(trainer.teacher_params) == before["pointers"] == _pointers(trainer.base_params)
    assert not lora.adapters(nnx.merge(trainer.t_graph, trainer.teacher_params))  # adapters off
    # The base model's logits (a fresh build from the same source) = the teacher's, before and after updates.
    base = build_model(trainer.sources.student, trainer.tok, s.seed, "student")
    reference = _logits(*nnx.split(base), TOKENS)
    np.testing.assert_array_equal(before["teacher"], reference)
    np.testing.assert_array_equal(_logits(trainer.t_graph, trainer.teacher_params, TOKENS), reference)
    np.testing.assert_array_equal(before["student"], reference)  # B = 0 at step 0
    after = _logits(trainer.s_graph, trainer._student_params(), TOKENS)
    assert np.abs(after - reference).max() > 1e-4  # the student moved, through its adapters alone
    assert int(trainer.state.step) == 2


def test_persistent_bytes_show_the_shared_teacher(lora_run, tmp_path):
    trainer, summary, _, _ = lora_run
    memory = summary["memory"]
    lora_bytes = memory["bytes"]
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.base_params))
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state.params))
    assert memory["teacher_shares_student_weights"] and lora_bytes["teacher"] == 0
    assert lora_bytes["frozen_base"] == base_bytes and lora_bytes["trainable"] == adapter_bytes
    assert 2 * adapter_bytes <= lora_bytes["optimizer"] <= 2 * adapter_bytes + 64  # AdamW on adapters (+ counts)
    assert memory["trainable_params"] == lora.num_params(trainer.state.params)
    # Full fine-tuning of the same run holds the parameters, two moments and the frozen initial copy.
    full = Trainer(tiny_config(**{**LORA_OPSD, "lora.enabled": False}), str(tmp_path)).memory["bytes"]
    assert full["teacher"] == full["trainable"] == base_bytes and full["frozen_base"] == 0
    # saved: the teacher copy and AdamW's two moments of the base, less the adapters and their moments
    assert full["total"] - lora_bytes["total"] == 3 * (base_bytes - adapter_bytes)


def test_checkpoint_exports_and_run_student(lora_run):
    trainer, summary, _, workdir = lora_run
    # The base is saved once beside the model card; checkpoints hold the adapters and their optimizer state.
    assert (workdir / "student_model" / "lora.json").exists()
    assert (workdir / "student_model" / "model.safetensors").exists()
    saved = ocp.PyTreeCheckpointer().metadata(str(workdir / "checkpoints" / "2" / "state"))
    saved = saved.item_metadata.tree if hasattr(saved, "item_metadata") else saved.tree
    paths = ["/".join(map(str, k)) for k, _ in jax.tree_util.tree_flatten_with_path(saved["train"]["params"])[0]]
    assert paths and all("_lora" in p for p in paths)  # no base weights in the checkpoint
    assert not jax.tree.leaves(saved.get("teacher_ref"))  # nor a teacher copy
    merged = lora.merge_lora(nnx.merge(trainer.s_graph, trainer.state.params, trainer.base_params))
    expected = _leaves(nnx.split(merged)[1])
    run_student, step = load_run_student(str(workdir))
    assert step == 2 and not lora.adapters(run_student)
    chex.assert_trees_all_equal(_leaves(nnx.split(run_student)[1]), expected, strict=True)
    # workdir/export: the merged student; workdir/export_adapter: PEFT adapters that give the same model.
    exported = load_hf(str(workdir / "export"))
    chex.assert_trees_all_equal(_leaves(nnx.split(exported)[1]), expected, strict=True)
    config = json.loads((workdir / "export_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 7
    assert config["base_model_name_or_path"] == os.path.join(str(workdir), "student_model")
    adapted = load_peft_adapter(load_hf(config["base_model_name_or_path"]), str(workdir / "export_adapter"))
    np.testing.assert_allclose(_logits(*nnx.split(adapted), TOKENS), _logits(*nnx.split(merged), TOKENS),
                               atol=1e-5)


def test_lora_resume_is_bitwise_exact(lora_run, tmp_path):
    """Interrupted after step 1 and resumed (the base read back from workdir/student_model), the adapters and
    their optimizer state equal the uninterrupted run's bit for bit (adapter dropout on: its keys too)."""
    straight = lora_run[0]
    cfg = tiny_config(**{**LORA_OPSD, "eval.teacher": False, "export.enabled": False})  # neither touches the state
    first = Trainer(cfg, str(tmp_path), halt_after=1).run()
    assert first["status"] == "preempted" and first["steps"] == 1
    resumed = Trainer(cfg, str(tmp_path))
    assert resumed.run()["status"] == "completed"
    chex.assert_trees_all_equal(_leaves(straight.state), _leaves(resumed.state), strict=True)
    moved = [np.asarray(v.get_value()) for k, v in nnx.to_flat_state(straight.state.params) if k[-1] == "b"]
    assert all(np.any(x) for x in moved)  # B left zero: the adapters trained


def test_lora_resume_keeps_the_runtime_settings(tmp_path):
    """A resumed LoRA run loads its base from workdir/student_model: it must still run the configured attention
    kernel (the qwen3 recipes would otherwise fall back to dense scores over 40k-token contexts)."""
    cfg = tiny_config(**{**LORA_OPSD, "eval.teacher": False, "export.enabled": False, "train.steps": 2,
                         "student.attention": "blockwise", "student.attention_block": 8, "train.remat": "full"})
    first = Trainer(cfg, str(tmp_path), halt_after=1)
    assert first.run()["status"] == "preempted"
    resumed = Trainer(cfg, str(tmp_path))
    for trainer in (first, resumed):
        student = nnx.merge(trainer.s_graph, trainer._student_params()).cfg
        teacher = nnx.merge(trainer.t_graph, trainer._teacher_params()).cfg
        for model_cfg in (student, teacher):
            assert (model_cfg.attention, model_cfg.attention_block, model_cfg.remat) == ("blockwise", 8, "full")
