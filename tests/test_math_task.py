"""Real-data math tasks: local files built by the TFDS builders, grain prompts, math-verify grading, the
generated mini_math set, training on it end to end, and evaluation of a run's checkpoint (configs/eval.py)."""

import json
import os

import numpy as np
import pytest

from helpers.tiny_run import tiny_config
from trd_jax.config import ConfigError
from trd_jax.data import mini_math
from trd_jax.data.registry import make_task
from trd_jax.data.toy_tokenizer import save_tokenizer
from trd_jax.prompts import MATH_ANSWER_INSTRUCTION
from trd_jax.recipes import apply_overrides


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer that covers the mini_math texts (tiny random models need a small vocabulary)."""
    rows = mini_math.generate(200, 0)
    corpus = [r["problem"] + " " + r["solution"] for r in rows] + [MATH_ANSWER_INSTRUCTION]
    return save_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer"), corpus)


def _task_cfg(**kw):
    return apply_overrides(tiny_config(), {f"task.{k}": v for k, v in kw.items()}).task


def test_mini_math_is_deterministic_and_its_references_grade_correct(tmp_path, tokenizer_dir):
    assert mini_math.generate(20, 3) == mini_math.generate(20, 3) != mini_math.generate(20, 4)
    with pytest.raises(ValueError, match=f"mini_math has {mini_math.NUM_PROBLEMS} distinct problems"):
        mini_math.generate(mini_math.NUM_PROBLEMS + 1, 0)  # an error, not an endless draw
    task = make_task(_task_cfg(name="mini_math", train_size=40, eval_size=16, tokenizer=tokenizer_dir), str(tmp_path))
    try:
        evals = list(task.split("eval"))
        assert len(evals) == 16 and all(ex.problem.endswith(MATH_ANSWER_INSTRUCTION) for ex in evals)
        assert all(ex.problem.count("\\boxed") == 1 for ex in evals)  # the instruction exactly once
        assert task.grade_batch([ex.reference for ex in evals], evals).tolist() == [1.0] * 16
        wrong = [ex.reference.replace(f"{{{ex.answer}}}", f"{{{int(ex.answer) + 1}}}") for ex in evals]
        assert task.grade_batch(wrong, evals).tolist() == [0.0] * 16
        assert task.grade("no boxed answer here", evals[0]) == 0.0
        assert task.stats["no_answer"] == 1
    finally:
        task.close()


def test_math_task_from_user_files_and_grain_order(tmp_path, tokenizer_dir):
    rows = mini_math.generate(30, 1)
    with open(tmp_path / "train.jsonl", "w") as f:  # DeepScaleR-style field names
        for r in rows[:20]:
            f.write(json.dumps(r) + "\n")
    with open(tmp_path / "aime.jsonl", "w") as f:  # an eval set with question / final_answer and no solution
        for i, r in enumerate(rows[20:]):
            f.write(json.dumps({"id": f"q{i}", "question": r["problem"], "final_answer": r["answer"]}) + "\n")
    cfg = _task_cfg(name="math", train_files=str(tmp_path / "train.jsonl"), eval_files=str(tmp_path / "aime.jsonl"),
                    tokenizer=tokenizer_dir)
    task = make_task(cfg, str(tmp_path / "work"))
    try:
        assert [ex.id for ex in task.split("eval")] == [f"q{i}" for i in range(10)]
        assert task.split("eval")[0].reference is None
        it = task.prompt_iterator(seed=7)
        first = [ex.id for ex in it.next(6)]
        state = it.state()
        after = [ex.id for ex in it.next(30)]  # crosses two epoch boundaries
        again = task.prompt_iterator(seed=7)
        again.restore(json.loads(json.dumps(state)))  # as saved in a checkpoint's JSON meta
        assert [ex.id for ex in again.next(30)] == after
        assert sorted(first + after[:14]) == sorted(ex.id for ex in task.split("train"))  # one epoch = each once
        assert first != [ex.id for ex in task.prompt_iterator(seed=8).next(6)]
        # Built once: a second task over the same files reuses the datasets; edited files get a fresh build.
        assert make_task(cfg, str(tmp_path / "work")).dirs == task.dirs
        with open(tmp_path / "aime.jsonl", "a") as f:
            f.write(json.dumps({"question": "What is 1 + 1?", "final_answer": "2"}) + "\n")
        again = make_task(cfg, str(tmp_path / "work"))
        assert again.dirs["eval"] != task.dirs["eval"] and len(again.split("eval")) == 11
    finally:
        task.close()


def test_math_task_errors_name_the_key_file_and_row(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match="task.eval_files"):
        make_task(_task_cfg(name="math", tokenizer=tokenizer_dir), str(tmp_path))
    with pytest.raises(ConfigError, match="task.tokenizer"):
        make_task(_task_cfg(name="math", eval_files="x.jsonl", tokenizer=str(tmp_path)), str(tmp_path))
    with pytest.raises(ConfigError, match="task.eval_files: no file matches"):  # a glob too
        make_task(_task_cfg(name="math", eval_files=str(tmp_path / "*" / "none*.jsonl"), tokenizer=tokenizer_dir),
                  str(tmp_path))
    with pytest.raises(ConfigError, match="task.eval_files: no file matches"):
        make_task(_task_cfg(name="math", eval_files=str(tmp_path / "none.jsonl"), tokenizer=tokenizer_dir),
                  str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(ConfigError, match=r"task.eval_files: .*bad.jsonl.*line 2.*answer"):
        make_task(_task_cfg(name="math", eval_files=str(bad), tokenizer=tokenizer_dir), str(tmp_path))


@pytest.fixture(scope="module")
def mini_math_run(tmp_path_factory, tokenizer_dir):
    """OPSD + TRD on mini_math with a tiny random student, 2 steps (the SmolLM2 recipe's path, small)."""
    from trd_jax.controller import train

    workdir = str(tmp_path_factory.mktemp("mini_math_run"))
    cfg = tiny_config(**{"task.name": "mini_math", "task.tokenizer": tokenizer_dir, "task.train_size": 32,
                         "task.eval_size": 4, "distill.mode": "opsd", "distill.teacher_context": "vanilla",
                         "rollout.max_new_tokens": 16, "refine.rewrite_budget": 16, "eval.max_new_tokens": 16,
                         "refine.prompt_budget": 600, "task.max_prompt_tokens": 200})
    return workdir, train(cfg, workdir)


def test_mini_math_opsd_trd_run_completes_and_resumes_its_grain_position(mini_math_run):
    workdir, summary = mini_math_run
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["final_eval"]["num_problems"] == 4
    assert sum(summary["grading"].values()) > 0  # math-verify graded every rollout, rewrite and eval sample
    with open(os.path.join(workdir, "checkpoints", "2", "meta", "metadata")) as f:
        data = json.load(f)["data"]
    assert data["iterator"] == "grain" and data["epoch"] * data["records"] + data["index"] == 2 * 4


def test_eval_config_evaluates_a_run_checkpoint(mini_math_run, tokenizer_dir, tmp_path):
    import importlib.util

    from trd_jax.controller import Trainer
    from trd_jax.run_checkpoint import load_run_student
    from trd_jax.api import LM, load_model

    run_dir, _ = mini_math_run
    spec = importlib.util.spec_from_file_location("eval_cfg", os.path.join(os.path.dirname(__file__), "..",
                                                                             "configs", "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.model.path = run_dir  # the alias of student.path that the command line uses
    # No task.tokenizer: a run's tokenizer comes with it (run_dir/student_model).
    # task.train_size as the run's: the default (the embedded task's 8000) is more than mini_math's problems.
    apply_overrides(cfg, {"task.name": "mini_math", "task.train_size": 32, "task.eval_size": 4, "eval.n": 2,
                          "eval.max_new_tokens": 8, "log.progress": False})
    assert cfg.student.path == run_dir
    summary = Trainer(cfg, str(tmp_path / "eval")).evaluate_only()
    assert summary["status"] == "evaluated" and summary["model"] == run_dir and summary["steps"] == 2
    assert summary["final_eval"]["n"] == 2 and summary["final_eval"]["num_problems"] == 4
    assert 0.0 <= summary["final_eval"]["greedy"] <= 1.0 and len(summary["final_eval"]["correct_counts"]) == 4
    assert os.path.isfile(tmp_path / "eval" / "eval" / "step_000002.md")  # named after the checkpoint's step
    with open(tmp_path / "eval" / "config.json") as f:
        assert "model" not in json.load(f)  # the alias is not written twice
    # The checkpoint's student is the run's final student (its export), bit for bit.
    ids = np.array([[3, 4, 5, 6]])
    student, step = load_run_student(run_dir)
    assert step == 2
    np.testing.assert_array_equal(LM(student).logits(ids), load_model(os.path.join(run_dir, "export")).logits(ids))


def test_training_prompts_over_the_limit_are_skipped_and_counted(tmp_path, tokenizer_dir):
    task = make_task(_task_cfg(name="mini_math", train_size=40, eval_size=4, tokenizer=tokenizer_dir), str(tmp_path))
    try:
        long_ids = {ex.id for ex in task.split("train") if "Wednesday" in ex.problem}
        assert 0 < len(long_ids) < 40
        task.set_filter(lambda ex: "Wednesday" not in ex.problem)  # as the trainer's token-length check
        it = task.prompt_iterator(seed=0)
        seen = [ex.id for ex in it.next(80)]
        assert not set(seen) & long_ids and len(seen) == 80
        assert task.stats["skipped_train_examples"] >= len(long_ids)
        task.set_filter(lambda ex: False)
        with pytest.raises(ValueError, match="no training example is usable"):
            task.prompt_iterator(seed=0).next(1)
    finally:
        task.close()
