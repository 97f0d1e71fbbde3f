"""The SmolLM2 OPD recipe (configs/smollm2.py:opd,trd) on CPU, shortened to 1 step: the teacher fine-tuned
here (teacher_sft), mini_math with one worked example per prompt through the real tokenizer's chat template,
rollout, refinement, scoring and the LoRA update on the real model, math-verify grading."""

import importlib.util
import os

import numpy as np
import pytest

from trd_jax.recipes import apply_overrides


@pytest.mark.slow
def test_smollm2_opd_trd_recipe_runs_a_step(smollm2_dir, tmp_path):
    from trd_jax.controller import train

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2.py")
    spec = importlib.util.spec_from_file_location("smollm2_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("opd,trd")
    # The converted folder of the session (the recipe converts into workdir/models itself).
    apply_overrides(cfg, {"student.path": smollm2_dir, "teacher.path": smollm2_dir, "train.steps": 1,
                          "train.batch_size": 2, "task.train_size": 16, "task.eval_size": 4, "eval.n": 1,
                          "teacher_sft.steps": 1, "teacher_sft.batch_tokens": 512, "eval.max_new_tokens": 48,
                          "rollout.max_new_tokens": 48, "refine.rewrite_budget": 48, "log.progress": False,
                          "eval.initial": False, "eval.teacher": False})  # the final evaluation is enough here
    summary = train(cfg, str(tmp_path))
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert summary["mode"] == "opd" and summary["trajectory"] == "y_r"
    sft = summary["teacher_sft"]
    assert sft["source"] == "trained" and os.path.isfile(os.path.join(sft["path"], "model.safetensors"))
    for phase in ("rollout", "refine", "score", "update"):  # every phase ran, on the 135M model's tokens
        assert summary["phase_seconds"][phase] > 0 and summary["phase_tokens"][phase] > 0, phase
    assert summary["phase_flops"]["update"] > 1e11  # 135M parameters: not a tiny stand-in
    assert summary["final_eval"]["num_problems"] == 4
    grading = summary["grading"]
    boxed = grading["exact"] + grading["match"] + grading["mismatch"]
    assert boxed > 0, grading  # the one-shot prompt gets boxed answers the grader parsed
    assert np.isfinite(summary["cost"]["seconds_per_step"])
    # The export is a Hugging Face folder transformers loads by itself; it answers a held-out problem with the
    # recipe's one-shot prompt, and the answer is graded like any rollout (docs/smollm2's demonstration).
    from trd_jax.experiments.smollm2_answer import answer

    (shown,) = answer(os.path.join(str(tmp_path), "export"), [0], max_new_tokens=48)
    assert "\\boxed{}" in shown["problem"] and shown["answer"]  # eval problem 0 of the split, with its reference
    assert shown["response"].strip() and isinstance(shown["correct"], bool)
