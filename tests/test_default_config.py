"""Smoke test of the README's default command (configs/default.py) with a tiny budget: bootstrap, TRD, evals,
the before/after report; and the bootstrap cache."""

import json
import os
import subprocess
import sys

import pytest

from trd_jax.config import ConfigError
from trd_jax.controller import Trainer
from trd_jax.recipes import apply_overrides, default_config, method_config

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = {
    "bootstrap.teacher_solve_steps": 4, "bootstrap.teacher_mixed_steps": 2, "bootstrap.student_solve_steps": 4,
    "bootstrap.student_mixed_steps": 2, "bootstrap.batch_tokens": 512,
    "task.train_size": 48, "task.eval_size": 4, "task.min_steps": 3, "task.max_steps": 5, "train.steps": 2,
    "train.batch_size": 4, "eval.n": 2,
    "rollout.max_new_tokens": 24, "refine.rewrite_budget": 24, "eval.max_new_tokens": 24,
    "refine.on_empty_rewrite": "drop", "log.progress": False,
}
for role in ("teacher", "student"):
    TINY.update({f"bootstrap.{role}_model.{k}": v for k, v in
                 dict(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16).items()})


def test_default_command_runs_end_to_end(tmp_path):
    args = [f"--config.{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run([sys.executable, "-m", "trd_jax.main", "--config", "configs/default.py", "--workdir",
                           str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["trajectory"] == "y_r" and summary["mode"] == "opd"
    assert set(summary["trajectory_accuracy"]) == {"y_o", "y_r"}
    assert summary["teacher_eval"]["k"] == 2 and summary["bootstrap"]["seconds"] > 0
    assert summary["bootstrap"]["source"] == "trained"  # tiny settings: not the shipped models
    for role in ("teacher", "student"):
        assert (tmp_path / "bootstrap" / summary["bootstrap"]["identity"] / role / "model.safetensors").exists()
    # The printed report: before/after table, teacher accuracy, accuracy of y_r, per-phase cost.
    for text in ("| Avg@2 (%) |", "teacher (vanilla context)", "accuracy of y_r", "| refine |", "| rollout |"):
        assert text in proc.stdout, proc.stdout


@pytest.mark.slow
def test_bootstrap_is_reused_and_keyed_by_what_shapes_it(tmp_path):
    boot = tmp_path / "boot"
    cfg = method_config("forward_kl", "opsd", 0, apply_overrides(default_config(), dict(TINY)))
    apply_overrides(cfg, {"bootstrap.dir": str(boot), "train.steps": 1, "eval.initial": False})
    first = Trainer(cfg, str(tmp_path / "a")).run()["bootstrap"]
    manifest = boot / first["identity"] / "bootstrap.json"
    stamp = os.path.getmtime(manifest)
    # The eval split's size does not shape the models: the same bootstrap is reused.
    apply_overrides(cfg, {"task.eval_size": 6})
    summary = Trainer(cfg, str(tmp_path / "b")).run()
    assert summary["bootstrap"]["source"] == "cache" and summary["bootstrap"]["identity"] == first["identity"]
    assert os.path.getmtime(manifest) == stamp and summary["bootstrap"]["seconds"] < 10
    assert summary["bootstrap"]["models_sha256"] == first["models_sha256"]
    assert summary["teacher_eval"] is not None and "y_r" not in summary["trajectory_accuracy"]
    # A setting that shapes them trains anew, in its own folder: the first one is left as it was.
    apply_overrides(cfg, {"bootstrap.student_bug_rate": 0.3})
    other = Trainer(cfg, str(tmp_path / "c")).run()["bootstrap"]
    assert other["identity"] != first["identity"] and other["source"] == "trained"
    assert json.loads((boot / other["identity"] / "bootstrap.json").read_text())["config"]["student_bug_rate"] == 0.3
    assert os.path.getmtime(manifest) == stamp


def test_resume_refuses_other_bootstrap_models(tmp_path):
    cfg = apply_overrides(default_config(), dict(TINY))
    apply_overrides(cfg, {"bootstrap.dir": str(tmp_path / "boot"), "train.steps": 2, "eval.initial": False,
                          "eval.teacher": False, "checkpoint.every": 1})
    Trainer(cfg, str(tmp_path / "run"), halt_after=1).run()
    record = tmp_path / "run" / "bootstrap_models.json"
    started = json.loads(record.read_text())["models_sha256"]
    record.write_text(json.dumps({"models_sha256": "0" * 64}))  # as if the run had started from other models
    with pytest.raises(ConfigError, match="config.bootstrap: .*started from 0000"):
        Trainer(cfg, str(tmp_path / "run"))
    record.write_text(json.dumps({"models_sha256": started}))
    assert Trainer(cfg, str(tmp_path / "run")).run()["status"] == "completed"
