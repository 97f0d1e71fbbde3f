"""The SmolLM2 recipe (configs/smollm2_opsd_trd.py) on CPU, shortened: the real model's tokenizer and chat
template, mini_math built by the TFDS builder, math-verify grading, OPSD's self-teacher shown the reference,
refinement and one update."""

import importlib.util
import os

import numpy as np
import pytest

from trd_jax.recipes import apply_overrides


@pytest.mark.slow
def test_smollm2_opsd_trd_recipe_runs_a_step(smollm2_dir, tmp_path):
    from trd_jax.controller import train

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2_opsd_trd.py")
    spec = importlib.util.spec_from_file_location("smollm2_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    # The converted folder of the session (the recipe converts into workdir/models itself).
    apply_overrides(cfg, {"student.source": "path", "student.path": smollm2_dir, "train.steps": 1,
                          "train.batch_size": 2, "task.train_size": 16, "task.eval_size": 4, "eval.n": 1,
                          "rollout.max_new_tokens": 48, "refine.rewrite_budget": 48, "eval.max_new_tokens": 48,
                          "log.progress": False})
    summary = train(cfg, str(tmp_path))
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert summary["mode"] == "opsd" and summary["trajectory"] == "y_r"
    assert summary["teacher_eval"]["num_problems"] == 4
    assert sum(summary["grading"].values()) >= 2 + 3 * 4  # y_o (and y_r), three evals of 4 problems
    assert np.isfinite(summary["cost"]["seconds_per_step"]) and summary["phase_tokens"]["refine"] > 0
