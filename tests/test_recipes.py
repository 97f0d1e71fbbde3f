"""Recipes: the default and every method of the reproduction resolve to valid settings."""

import pytest

from trd_jax.config import ConfigError, base_config, resolve
from trd_jax.recipes import BASELINES, METHODS, default_config, get_method, method_config, parse_overrides

REFINE_CONTEXT = ("trd", "trd_refine_wrong_only", "trd_fallback_wrong")  # [code-trd]'s scoring and its ablations


@pytest.mark.parametrize("setting", ["opd", "opsd"])
def test_every_method_resolves(setting):
    for method, m in METHODS.items():
        s = resolve(method_config(method, setting, seed=3))
        assert s.distill.mode == setting and s.seed == 3
        assert s.distill.trajectory == m.trajectory == ("y_r" if method.startswith("trd") else "y_o")
        assert s.distill.teacher_context == m.teacher_context == ("refine" if method in REFINE_CONTEXT else "vanilla")
        assert s.loss.name == m.loss and m.describe() == {"loss": m.loss, "trajectory": m.trajectory,
                                                          "teacher_context": m.teacher_context}
        assert s.rollout.n == 1
        assert (s.refine.rows, s.refine.on_wrong_rewrite) == (
            "wrong" if method == "trd_refine_wrong_only" else "all",
            "fallback" if method == "trd_fallback_wrong" else "keep")
    s = resolve(method_config("trd", setting, 0))  # the paper's TRD (TRD_SPEC §3a)
    assert (s.loss.name, s.distill.trajectory, s.distill.teacher_context) == ("forward_kl", "y_r", "refine")
    assert dict(resolve(method_config("jsd0.5", setting, 0)).loss.params) == {"beta": 0.5}
    assert dict(resolve(method_config("reverse_kl_top32", setting, 0)).loss.params) == {"k": 32}


def test_compute_matched_baselines():
    assert set(BASELINES) == {"reverse_kl_k1_pg", "reverse_kl", "forward_kl", "forward_kl_clip0.1",
                              "reverse_kl_top32", "jsd0.5"}
    for name in BASELINES:
        m = get_method(f"{name}@2x")
        s = resolve(method_config(f"{name}@2x", "opd", 0))
        assert s.rollout.n == 2 and s.distill.trajectory == "y_o" and s.loss.name == METHODS[name].loss
        assert m.describe() == METHODS[name].describe()
    assert dict(resolve(method_config("forward_kl_clip0.1@2x", "opsd", 0)).loss.params) == {"clip": 0.1}
    for bad, message in (("trd@2x", "applies to the baselines"), ("forward_kl@3x", "is not one of"),
                         ("sft", "is not one of")):
        with pytest.raises(ValueError, match=message):
            get_method(bad)


def test_refine_ablations_need_rewrites():
    for key, value in (("refine.rows", "wrong"), ("refine.on_wrong_rewrite", "drop")):
        cfg = method_config("forward_kl", "opd", 0)
        cfg.refine[key.split(".")[1]] = value
        with pytest.raises(ConfigError, match=f"config.{key}: .*trajectory='y_o'"):
            resolve(cfg)


def test_default_is_trd_with_bootstrap():
    cfg = default_config()
    s = resolve(cfg)
    assert cfg.bootstrap.enabled and s.distill.trajectory == "y_r" and s.loss.name == "forward_kl"
    assert s.distill.mode == "opd"
    assert s.distill.teacher_context == "refine"  # the method trd: the paper's TRD (refine-context scoring)
    assert get_method("trd").describe() == {"loss": s.loss.name, "trajectory": s.distill.trajectory,
                                            "teacher_context": s.distill.teacher_context}
    assert s.lora is None  # full fine-tuning of the small from-scratch models, as before LoRA existed


def test_parse_overrides():
    assert parse_overrides(["a.b=3", "c=x", "d=true", "e=0.5"]) == {"a.b": 3, "c": "x", "d": True, "e": 0.5}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(["novalue"])


def _config_module(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("setting", ["opd", "opsd"])
@pytest.mark.parametrize("hardware,devices", [("h100x8", 8), ("v5p-8", 4), ("v5e-16", 16)])
def test_qwen3_recipes_resolve_with_the_paper_values(setting, hardware, devices):
    qwen3 = _config_module("qwen3")
    for student in ("1.7b", "4b"):
        for method in METHODS:
            cfg = _with_paths(qwen3.get_config(f"{setting},{student},{method},{hardware}"))
            s = resolve(cfg)
            assert s.distill.mode == setting and s.distill.trajectory == ("y_r" if method.startswith("trd") else "y_o")
            assert (s.teacher is None) == (setting == "opsd")
            assert s.optim.learning_rate == 5e-6 and s.train.batch_size == 128
            assert s.refine.prompt_budget == (18432 if setting == "opd" else 22528)
            assert s.rollout.sampling.temperature == 0.6 and s.rollout.sampling.top_k == 20
            assert s.rollout.max_new == 16384
            assert cfg.mesh.fsdp == devices and 128 % (s.train.micro_batches * devices) == 0  # one row per device
            assert s.student.dtype == "bfloat16"
            assert s.distill.teacher_context == ("refine" if method in REFINE_CONTEXT else "vanilla")
            assert s.task.prompt_mode == ("thinking" if student == "1.7b" else "chat")
            # LoRA r 64, alpha 128 on all seven projections [code-trd]
            assert s.lora is not None and (s.lora.rank, s.lora.alpha, s.lora.dropout) == (64, 128.0, 0.0)
            assert s.lora.targets == ("q", "k", "v", "o", "gate", "up", "down")


def test_qwen3_recipe_rejects_unknown_parts():
    qwen3 = _config_module("qwen3")
    with pytest.raises(ValueError, match="HARDWARE 'tpu' is not one of"):
        qwen3.get_config("opd,1.7b,trd,tpu")
    with pytest.raises(ValueError, match="METHOD"):
        qwen3.get_config("opd,1.7b,sft")
    assert resolve(_with_paths(qwen3.get_config())).distill.mode == "opd"  # defaults: opd,1.7b,trd,h100x8


def _with_paths(cfg):
    cfg.student.path = cfg.teacher.path = "/models/x"
    cfg.task.train_files, cfg.task.eval_files = "/data/deepscaler.json", "/data/aime24.jsonl"
    return cfg


def test_eval_and_smollm2_configs_resolve():
    cfg = _config_module("eval").get_config()
    cfg.model.path = "/models/x"
    cfg.task.update(name="math", eval_files="/data/aime24.jsonl")  # no training set needed to evaluate
    s = resolve(cfg)
    assert cfg.mode == "eval" and s.student.path == "/models/x" and s.eval.n == 16
    assert s.lora is None  # evaluation loads a run's student merged
    smollm2 = _config_module("smollm2")
    s = resolve(smollm2.get_config("opsd,trd"))
    assert s.distill.mode == "opsd" and s.distill.trajectory == "y_r" and s.student.source == "smollm2"
    assert s.lora is not None and (s.lora.rank, s.lora.alpha) == (64, 128.0) and len(s.lora.targets) == 7
    cfg = smollm2.get_config("opd,reverse_kl")
    s = resolve(cfg)
    assert (s.distill.mode, s.distill.trajectory, s.teacher.source) == ("opd", "y_o", "smollm2")
    assert cfg.teacher_sft.enabled
    assert cfg.task.shots == 1 and s.eval.n == 8
    with pytest.raises(ValueError, match="method 'trd_x' is not one of"):
        smollm2.get_config("opd,trd_x")


def test_task_fields_are_checked():
    cfg = base_config()
    for key, value, message in (("grade_timeout_s", -1.0, "must be >"), ("grade_workers", 0, "must be >="),
                                ("dataset_name", "a/b", "use letters"), ("name", "mathh", "is not one of")):
        bad = base_config()
        bad.task[key] = value
        with pytest.raises(ConfigError, match=f"config.task.{key}: .*{message}"):
            resolve(bad)
    cfg.task.name = "math"
    with pytest.raises(ConfigError, match="config.task.train_files: is empty"):
        resolve(cfg)
