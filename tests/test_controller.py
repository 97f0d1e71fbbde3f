"""End-to-end runs of the host controller with tiny random models on the running-arithmetic task: every distill
mode x trajectory with several losses, row accounting, bitwise-exact resume, SIGTERM, config errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from helpers.tb_events import read_tb_scalars
from helpers.tiny_run import tiny_config
from trd_jax.api import generate, load_model
from trd_jax.config import ConfigError
from trd_jax.controller import Trainer
from trd_jax.models.hf_io import load_hf
from trd_jax.roles import build_model

TESTS = os.path.dirname(__file__)
ROOT = os.path.dirname(TESTS)


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _initial_params(trainer):
    s = trainer.s
    return nnx.split(build_model(trainer.sources.student, trainer.tok, s.seed, "student"))[1]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


CASES = {  # id: (overrides, loss)
    "opd-y_o-reverse_kl": {"distill.mode": "opd", "distill.trajectory": "y_o", "distill.teacher_context": "vanilla",
                           "loss.name": "reverse_kl"},
    "opd-y_r-forward_kl": {"distill.mode": "opd", "distill.trajectory": "y_r", "loss.name": "forward_kl",
                           "eval.every": 1},
    "opd-y_r-topk-vanilla": {"distill.mode": "opd", "distill.trajectory": "y_r", "distill.teacher_context": "vanilla",
                             "loss.name": "reverse_kl_topk", "loss.top_k": 8},
    "opsd-y_o-jsd": {"distill.mode": "opsd", "distill.trajectory": "y_o", "distill.teacher_context": "vanilla",
                     "loss.name": "jsd", "train.micro_batches": 2, "log.diagnostics_every": 2},
    "opsd-y_r-k1pg-live": {"distill.mode": "opsd", "distill.trajectory": "y_r", "loss.name": "k1_policy_gradient",
                           "distill.opsd_teacher": "live", "loss.temperature": 1.1,
                           "rollout.release_kv_cache": True},
    "opsd-y_r-clipped": {"distill.mode": "opsd", "distill.trajectory": "y_r", "loss.name": "forward_kl_clipped"},
}


def _spy_greedy(monkeypatch, trainer) -> list:
    """Records (prompts, max_new_tokens, rows) of the evaluator's temperature-0 sampler calls."""
    from trd_jax import evaluator

    calls, sample = [], evaluator.sample_rows

    def spy(s, sampler, params, prompts, max_new, sampling, n, key, max_prompt_len=None, **drafts):
        rows = sample(s, sampler, params, prompts, max_new, sampling, n, key, max_prompt_len, **drafts)
        if sampling.temperature == 0:
            assert sampler is trainer.eval_sampler and n == 1
            calls.append((prompts, max_new, rows))
        return rows

    monkeypatch.setattr(evaluator, "sample_rows", spy)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_end_to_end(case, tmp_path, monkeypatch):
    overrides = CASES[case]
    trainer = Trainer(tiny_config(**overrides), str(tmp_path))
    teacher_before = _leaves(trainer.teacher_params) if trainer.teacher_params is not None else None
    greedy_calls = _spy_greedy(monkeypatch, trainer)
    summary = trainer.run()
    y_r = overrides["distill.trajectory"] == "y_r"

    # Metrics: one line per step, losses and diagnostics present, every row accounted for.
    lines = _lines(tmp_path)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert math.isfinite(m["loss"]) and m["tokens"] > 0 and m["skipped"] == 0
        assert m["divergence/p50"] <= m["divergence/p95"] <= m["divergence/max"]
        assert m["rows/total"] == 4 and m["rows/trained"] + m["rows/dropped"] == 4
        assert 0.0 <= m["accuracy/y_o"] <= 1.0
        if (m["step"] - 1) % overrides.get("log.diagnostics_every", 1):  # diagnostics skipped on this step
            assert not any(k.startswith("diag/") for k in m) and "phase_s/diagnostics" not in m
        else:
            for key in ("diag/y_o/teacher_entropy", "diag/trained/teacher_top2_gap", "diag/trained/teacher_nll",
                        "diag/trained/advantage_sign_flip_rate", "diag/y_o/teacher_argmax_mismatch",
                        "diag/trained/advantage_sign_flip_rate_weighted",
                        "diag/y_o/advantage_sign_flip_rate_decisions", "diag/y_o/uncertain_token_fraction"):
                assert key in m and math.isfinite(m[key])
        if y_r:
            assert m["rows/rewrite_ok"] + m["rows/rewrite_empty"] + m["rows/rewrite_capped"] + \
                m["rows/rewrite_prompt_over_budget"] == 4
            assert m["rows/rewrite_drop"] == m["rows/dropped"]
            assert m["rows/rewrite_keep"] + m["rows/fallback_to_y_o"] == m["rows/trained"]
            assert "accuracy/y_r" in m and 0.0 <= m["capped/y_r"] <= 1.0 and m["phase_tokens/refine"] > 0
        else:
            assert "phase_s/refine" not in m and "accuracy/y_r" not in m
    assert {name for _, name, _ in read_tb_scalars(next((tmp_path / "tb").iterdir()))} >= {"loss", "accuracy/y_o"}

    # Summary: evaluations before and after, per-phase cost.
    for key in ("initial_eval", "final_eval"):
        ev = summary[key]
        assert set(ev) >= {"avg_at_k", "pass_at_k", "k"} and ev["k"] == 2 and 0.0 <= ev["avg_at_k"] <= ev["pass_at_k"]
        assert 0.0 <= ev["greedy"] <= 1.0 and set(ev["pass_at"]) == {"1", "2"} and ev["pass_at"]["2"] == ev["pass_at_k"]
        assert len(ev["correct_counts"]) == ev["num_problems"] == 4 and all(0 <= c <= 2 for c in ev["correct_counts"])
    assert summary["broadened_problems"] == sum(a == 0 < b for a, b in zip(summary["initial_eval"]["correct_counts"],
                                                                          summary["final_eval"]["correct_counts"]))
    assert "teacher_eval" in summary and "greedy" not in summary["teacher_eval"]  # the teacher eval samples alone
    assert len(greedy_calls) == 2 + bool(overrides.get("eval.every"))  # one chunk of 4 problems per evaluation
    assert summary["steps"] == 2 and summary["status"] == "completed"
    phases = {"rollout", "grade", "score", "update"} | ({"refine"} if y_r else set())
    assert phases <= set(summary["phase_seconds"]) and all(summary["phase_seconds"][p] > 0 for p in phases)
    assert all(summary["phase_tokens"][p] > 0 for p in phases)
    assert ("refine" in summary["phase_flops"]) == y_r
    assert summary["rows"]["total"] == 8
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["phase_tokens"] == summary["phase_tokens"]
    assert (tmp_path / "eval" / "step_000000.md").exists() and (tmp_path / "eval" / "step_000002.json").exists()
    evaluated = [e["step"] for e in summary["evals"]]
    assert evaluated == ([0, 1, 2] if overrides.get("eval.every") else [0, 2])
    assert ("eval/avg_at_k" in lines[0]) == bool(overrides.get("eval.every"))
    if overrides.get("eval.every"):
        assert {"eval/greedy", "eval/pass_at_1", "eval/pass_at_2"} <= set(lines[0])
    md = (tmp_path / "eval" / "step_000002.md").read_text()
    assert "| Greedy (%) |" in md and "| Pass@1 (%) |" in md
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["name"] == overrides["loss.name"]

    # The student moved; the export is the final student; a frozen teacher did not move.
    final = _leaves(trainer.state.params)
    assert any(not np.array_equal(a, b) for a, b in zip(final, _leaves(_initial_params(trainer))))
    exported = _leaves(nnx.split(load_hf(str(tmp_path / "export")))[1])
    chex.assert_trees_all_equal(final, exported, strict=True)
    if teacher_before is not None:
        chex.assert_trees_all_equal(teacher_before, _leaves(trainer.teacher_params), strict=True)

    if case == "opd-y_o-reverse_kl":
        # Greedy accuracy is the accuracy of an independent temperature-0 decode of the exported final student.
        prompts, max_new, rows = greedy_calls[-1]
        examples = list(trainer.task.split("eval"))[:4]
        assert prompts == [trainer.tok.encode_prompt(ex.problem, trainer.s.task.prompt_mode) for ex in examples]
        assert max_new == 12
        assert generate(load_model(str(tmp_path / "export")), prompts, max_new, eos_id=trainer.tok.eos_ids) == rows
        graded = [trainer.task.grade(trainer.tok.decode(r, skip_special_tokens=True), ex)
                  for r, ex in zip(rows, examples)]
        assert summary["final_eval"]["greedy"] == pytest.approx(np.mean(np.asarray(graded) > 0.5))
        # Evaluations that do not count the same problems (eval.* changed on resume): no broadening, no error.
        trainer.evals[0] = {**trainer.evals[0], "n": 3}
        assert trainer._finish(2, "completed")["broadened_problems"] is None


def test_rows_over_budget_are_dropped_or_fall_back_and_counted(tmp_path):
    # Refine prompts need ~150 tokens: a budget of 60 sends none of them to the teacher.
    base = {"distill.trajectory": "y_r", "refine.prompt_budget": 60, "train.steps": 1, "eval.initial": False}
    summary = Trainer(tiny_config(**base, **{"refine.on_prompt_over_budget": "drop"}), str(tmp_path / "d")).run()
    m = _lines(tmp_path / "d")[0]
    assert m["rows/dropped"] == 4 and m["rows/refine_prompt_dropped"] == 4 and m["tokens"] == 0 and m["loss"] == 0.0
    assert summary["rows"]["dropped"] == 4
    Trainer(tiny_config(**base, **{"refine.on_prompt_over_budget": "fallback"}), str(tmp_path / "f")).run()
    m = _lines(tmp_path / "f")[0]
    assert m["rows/fallback_to_y_o"] == 4 and m["rows/trained"] == 4 and m["tokens"] > 0
    with pytest.raises(ValueError, match=r"refine prompt row 0: \d+ tokens > prompt_budget 60"):
        Trainer(tiny_config(**base, **{"refine.on_prompt_over_budget": "error"}), str(tmp_path / "e")).run()


def test_resume_is_bitwise_exact(tmp_path):
    """OPSD with an EMA teacher, TRD, 2 micro-batches: interrupted after step 2 and resumed, the final state
    (parameters, optimizer moments, EMA, counters) equals an uninterrupted run's bit for bit."""
    cfg = tiny_config(**{"distill.mode": "opsd", "distill.opsd_teacher": "ema", "train.steps": 4,
                         "train.micro_batches": 2, "eval.initial": False})
    straight = Trainer(cfg, str(tmp_path / "a"))
    straight.run()
    first = Trainer(cfg, str(tmp_path / "b"), halt_after=2).run()
    assert first["status"] == "preempted" and first["steps"] == 2 and first["final_eval"] is None
    resumed = Trainer(cfg, str(tmp_path / "b"))
    summary = resumed.run()
    assert summary["status"] == "completed" and summary["steps"] == 4
    chex.assert_trees_all_equal(_leaves(straight.state), _leaves(resumed.state), strict=True)  # bitwise, dtypes
    assert int(resumed.state.step) == 4
    assert [m["step"] for m in _lines(tmp_path / "b")] == [1, 2, 3, 4]
    # The same prompts were drawn: per-step metrics of the resumed part match the uninterrupted run.
    for x, y in zip(_lines(tmp_path / "a")[2:], _lines(tmp_path / "b")[2:]):
        assert x["loss"] == y["loss"] and x["accuracy/y_o"] == y["accuracy/y_o"]
    # Resuming under a different training config is refused, naming the key.
    with pytest.raises(ConfigError, match="config.optim.learning_rate"):
        Trainer(tiny_config(**{"distill.mode": "opsd", "distill.opsd_teacher": "ema", "train.steps": 4,
                               "train.micro_batches": 2, "optim.learning_rate": 0.5}), str(tmp_path / "b"))


def _main(workdir, *args, **popen):
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "trd_jax.main", "--config", os.path.join(TESTS, "helpers", "tiny_recipe.py"),
           "--workdir", str(workdir), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
    args = ("--config.train.steps=40", "--config.checkpoint.every=1000", "--config.eval.initial=False")
    proc = _main(tmp_path, *args)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["status"] == "preempted" and 2 <= stopped < 40
    assert [m["step"] for m in _lines(tmp_path)] == list(range(1, stopped + 1))
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [stopped]
    assert "rerun the same command to resume" in err
    proc = _main(tmp_path, *args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert [m["step"] for m in _lines(tmp_path)] == list(range(1, 41))
    assert "Cost per phase" in out


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=3"], "config.train.stepz: unknown key (did you mean train.steps?)"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.distill.trajectory=y_o"], "config.distill.teacher_context: 'refine' conditions"),
    (["--config.train.micro_batches=3"], "config.train.micro_batches: 3 does not divide the 4 rows"),
    (["--config.refine.on_empty_rewrite=skip"], "config.refine.on_empty_rewrite: must be one of"),
    (["--config.distill.mode=opsd", "--config.distill.opsd_teacher=ema", "--config.distill.ema_decay=1.0"],
     "config.distill.ema_decay: 1.0 must be < 1"),
    (["--config.teacher.source=path"], "config.teacher.path: is empty"),
    (["--config.task.min_steps=6"], "config.task.min_steps: must be in [1, task.max_steps=5]"),
    (["--config.refine.top_p=0.0"], "config.refine.top_p: must be in (0, 1] (or -1: the rollout's value)"),
    (["--config.bootstrap.enabled=True", "--config.bootstrap.student_bug_rate=2.0"],
     "config.bootstrap.student_bug_rate: 2.0 must be <= 1.0"),
])
def test_config_errors_exit_2_with_one_line(args, message, tmp_path):
    proc = _main(tmp_path / "run", *args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_mostly_skipped_steps_fail_the_run_with_exit_3(tmp_path):
    """A learning rate that overflows the weights after one step: every later step is non-finite and skipped.
    Past train.max_skipped_fraction the run stops with exit 3 and one error line; the console report and
    summary.json count the skipped steps, and the checkpoints stay."""
    proc = _main(tmp_path / "run", "--config.optim.learning_rate=1e38", "--config.train.steps=4",
                 "--config.eval.initial=False")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, (out, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "3 of 4 steps were skipped as non-finite" in lines[0], err
    assert "**3 of 4 steps skipped**" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["skipped_steps"], summary["final_eval"]) == ("failed", 3, None)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))


@pytest.mark.parametrize("mode", ["opd", pytest.param("opsd", marks=pytest.mark.slow)])
def test_speculative_greedy_refine_trains_on_the_same_trajectories(mode, tmp_path):
    """Greedy refine with and without speculation: the same y_r, so the same losses step by step and the
    same final weights; the speculative run reports its draft statistics."""
    overrides = {"distill.mode": mode, "refine.temperature": 0.0, "eval.initial": False, "eval.teacher": False,
                 "log.diagnostics": False, "refine.rewrite_budget": 24}
    finals, lines = {}, {}
    for speculative in (False, True):
        workdir = tmp_path / str(speculative)
        trainer = Trainer(tiny_config(**overrides, **{"refine.speculative": speculative, "refine.draft_tokens": 4}),
                          str(workdir))
        trainer.run()
        finals[speculative] = _leaves(trainer.state.params)
        lines[speculative] = _lines(workdir)
    for plain, fast in zip(lines[False], lines[True]):
        for key in ("loss", "tokens", "rows/trained", "accuracy/y_r", "length/y_r", "phase_tokens/refine"):
            assert plain.get(key) == fast.get(key), (key, plain.get(key), fast.get(key))
        assert "refine/passes" not in plain
        assert fast["refine/draft_proposed"] == 4 * fast["refine/passes"]
        assert 0 < fast["refine/passes_per_token"] <= 1.0 and fast["refine/accepted_per_pass"] >= 0
    for a, b in zip(finals[False], finals[True]):
        np.testing.assert_array_equal(a, b)


def test_prompt_lookup_rollouts_and_evaluation_train_on_the_same_trajectories(tmp_path):
    """Greedy rollouts and evaluation with and without rollout.prompt_lookup_tokens: the same y_o, losses and
    accuracies; the lookup run reports its rollout draft statistics."""
    overrides = {"rollout.temperature": 0.0, "eval.temperature": 0.0, "eval.initial": True, "eval.teacher": False,
                 "log.diagnostics": False, "distill.trajectory": "y_o", "distill.teacher_context": "vanilla"}
    lines, evals = {}, {}
    for k in (0, 3):
        workdir = tmp_path / str(k)
        summary = Trainer(tiny_config(**overrides, **{"rollout.prompt_lookup_tokens": k}), str(workdir)).run()
        lines[k], evals[k] = _lines(workdir), summary["final_eval"]
    for plain, fast in zip(lines[0], lines[3]):
        for key in ("loss", "tokens", "accuracy/y_o", "length/y_o"):
            assert plain[key] == fast[key], (key, plain[key], fast[key])
        assert "rollout/passes" not in plain
        assert fast["rollout/draft_proposed"] == 3 * fast["rollout/passes"]
        assert 0 < fast["rollout/passes_per_token"] <= 1.0
    assert evals[0]["avg_at_k"] == evals[3]["avg_at_k"] and evals[0]["mean_length"] == evals[3]["mean_length"]


def test_resume_accepts_memory_settings_and_refuses_training_changes(tmp_path):
    """The planner's memory fixes (kernel, remat, row groups, cache release) may change on resume; a training
    setting may not, and the error names it."""
    from trd_jax.controller import check_resume_config

    cfg = tiny_config()
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    changed = tiny_config(**{"student.attention": "blockwise", "teacher.attention_block": 64, "train.remat": "full",
                             "train.max_score_rows": 2, "rollout.max_rows_per_call": 2,
                             "rollout.release_kv_cache": True})
    check_resume_config(str(tmp_path), changed)
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_resume_config(str(tmp_path), tiny_config(**{"train.batch_size": 8}))


def test_refine_ablations_refine_only_wrong_rollouts_and_fall_back_on_wrong_rewrites(tmp_path, monkeypatch):
    """trd_refine_wrong_only with refine.on_wrong_rewrite=fallback through the controller: grading is fixed so that
    rollouts 0 and 2 of each step are right and every rewrite is wrong; then only rows 1 and 3 reach the teacher,
    both rewrites fall back to y_o, and the step trains on all four rollouts."""
    from trd_jax import trajectories
    from trd_jax.recipes import method_config

    def fixed_grade(task, tok, rows, examples):
        if len(rows) == 4:  # the step's rollouts (evaluation grades 8 rows, rewrites 2)
            return np.array([1.0, 0.0, 1.0, 0.0], np.float32)
        return np.zeros(len(rows), np.float32)

    monkeypatch.setattr(trajectories, "grade", fixed_grade)
    cfg = method_config("trd_refine_wrong_only", "opd", 0, tiny_config(**{"log.diagnostics": False}))
    cfg.refine.on_wrong_rewrite = "fallback"
    cfg.eval.update(initial=False, teacher=False)
    summary = Trainer(cfg, str(tmp_path)).run()
    lines = _lines(tmp_path)
    assert len(lines) == 2
    for m in lines:
        assert m["accuracy/y_o"] == 0.5 and m["rows/refine_prompt_skipped"] == 2 and m["rows/rewrite_not_sent"] == 2
        assert m["rows/y_r_generated"] == 2 and m["rows/y_r_wrong_fallback"] == 2 and m["rows/y_r_wrong_kept"] == 0
        assert m["rows/fallback_to_y_o"] == 4 and m["rows/trained"] == 4 and m["accuracy/y_r"] == 0.0
    assert summary["rows"]["y_r_generated"] == 4 and summary["trajectory_accuracy"]["y_o"] == 0.5


def test_a_run_compiles_its_update_and_score_once(tmp_path, monkeypatch):
    """Three steps of a run: the update step and the teacher's scoring forward are traced once each (steps of the
    same shapes reuse the compiled functions; the run's first state is placed as later states are)."""
    import chex

    from trd_jax import steps

    monkeypatch.setattr(steps, "update", chex.assert_max_traces(steps.update, n=1))
    monkeypatch.setattr(steps, "score", chex.assert_max_traces(steps.score, n=1))
    cfg = tiny_config(**{"train.steps": 3, "log.diagnostics": False, "eval.initial": False, "eval.teacher": False,
                         "distill.trajectory": "y_o", "distill.teacher_context": "vanilla"})
    summary = Trainer(cfg, str(tmp_path)).run()
    assert summary["steps"] == 3
