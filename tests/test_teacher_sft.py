"""mini_math's worked examples (task.shots, Example.shots) and OPD's teacher fine-tuned here (teacher_sft):
flawed attempts, the SFT sets, the settings-hash cache, and a run that trains with the fine-tuned teacher."""

import json
import os
import re

import numpy as np
import pytest

from helpers.tiny_run import tiny_config
from trd_jax.config import ConfigError, resolve, teacher_sft_config
from trd_jax.data import mini_math
from trd_jax.data.registry import make_task
from trd_jax.data.task import Example
from trd_jax.data.toy_tokenizer import save_tokenizer
from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.models.transformer import init_for_tokenizer
from trd_jax.recipes import apply_overrides
from trd_jax.prompts import MATH_ANSWER_INSTRUCTION, REFERENCE, refine_prompt_text
from trd_jax.teacher_sft import build_teacher, flawed_attempt, sft_sets
from trd_jax.tokenization import Tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rows = mini_math.generate(300, 0) + [r for rows in mini_math.shot_rows(2).values() for r in rows]
    corpus = [r["problem"] + " " + r["solution"] for r in rows] + [MATH_ANSWER_INSTRUCTION, refine_prompt_text(
        "p", "a", mode="opd", task="math")]
    return save_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer"), corpus)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random model with the tokenizer: the teacher's base."""
    model = init_for_tokenizer(Tokenizer.from_dir(tokenizer_dir), seed=3, hidden_size=32, intermediate_size=64,
                               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    return save_hf(model, str(tmp_path_factory.mktemp("base")), tokenizer_dir=tokenizer_dir)


def _task(tmp_path, tokenizer_dir, shots=1):
    cfg = apply_overrides(tiny_config(), {"task.name": "mini_math", "task.train_size": 24, "task.eval_size": 8,
                                          "task.shots": shots, "task.tokenizer": tokenizer_dir}).task
    return make_task(cfg, str(tmp_path))


def test_worked_examples_match_the_problem_kind_and_stay_out_of_both_splits(tmp_path, tokenizer_dir):
    shots = mini_math.shot_rows(2)
    assert shots == mini_math.shot_rows(2) and [len(v) for v in shots.values()] == [2, 2, 2, 2]
    assert all(mini_math.kind_of(r["problem"]) == k for k, rows in shots.items() for r in rows)
    task = _task(tmp_path, tokenizer_dir)
    try:
        shown = {r["problem"] for rows in mini_math.shot_rows(1).values() for r in rows}
        for split in ("train", "eval"):
            for ex in task.split(split):
                (question, solution), = ex.shots
                assert mini_math.kind_of(question) == mini_math.kind_of(ex.problem)
                assert question.endswith(MATH_ANSWER_INSTRUCTION) and "\\boxed{" in solution
                assert question.split("\n\n")[0] in shown and ex.problem.split("\n\n")[0] not in shown
        ex = task.split("eval")[0]
        roles = [m["role"] for m in ex.prompt()]
        assert roles == ["user", "assistant", "user"] and ex.prompt()[-1]["content"] == ex.problem
        tok = Tokenizer.from_dir(tokenizer_dir)
        text = tok.render_prompt(ex.prompt(), "chat")
        assert text.index(ex.shots[0][1]) < text.index(ex.problem.split("\n\n")[0])  # the example comes first
        assert Example("i", "x", "1").prompt() == "x"  # no shots: the problem as before
    finally:
        task.close()
    assert len(_task(tmp_path / "none", tokenizer_dir, shots=0).split("eval")[0].shots) == 0


def test_shots_are_checked():
    for overrides, message in (({"task.name": "arithmetic"}, "made for task 'mini_math'"),
                               ({"task.name": "mini_math", "task.prompt_mode": "plain"}, "are chat turns"),
                               ({"task.name": "mini_math", "task.shots": -1}, "must be >=")):
        cfg = apply_overrides(tiny_config(), {"task.shots": 1, **overrides})
        with pytest.raises(ConfigError, match=f"task.shots: .*{message}"):
            resolve(cfg)


def test_flawed_attempt_changes_one_result_and_carries_it_forward():
    solution = ("On Wednesday she reads 11 + 6 = 17 pages. In total she reads 13 + 11 + 17 = 41 pages. "
                "The answer is $\\boxed{41}$.")
    seen = set()
    for seed in range(40):
        attempt = flawed_attempt(solution, np.random.default_rng(seed))
        assert attempt != solution and attempt == flawed_attempt(solution, np.random.default_rng(seed))
        first = re.search(r"= (\d+) pages\. In", attempt).group(1)
        if first != "17":  # the first result changed: every later 17 follows it, the sums after stay as written
            assert attempt.count(first) == 2 and "17" not in attempt and "= 41" in attempt
            seen.add("first")
        else:  # the total changed, and the boxed answer with it
            total = re.search(r"= (\d+) pages\. The", attempt).group(1)
            assert total != "41" and attempt.endswith(f"\\boxed{{{total}}}$.") and "41" not in attempt
            seen.add("total")
    assert seen == {"first", "total"}
    assert flawed_attempt("It is $\\boxed{5}$.", np.random.default_rng(0)) != "It is $\\boxed{5}$."


def test_sft_sets_pair_prompts_with_the_reference(tmp_path, tokenizer_dir):
    task = _task(tmp_path, tokenizer_dir)
    tok = Tokenizer.from_dir(tokenizer_dir)
    conf = teacher_sft_config(apply_overrides(tiny_config(), {"teacher_sft.enabled": True,
                                                              "task.name": "mini_math"}))
    try:
        train = task.split("train")
        solve, refine = sft_sets(train, tok, conf, task_kind="math", prompt_mode="chat", refine_mode="chat")
        assert (solve.name, refine.name) == ("solve", "refine_opd") and len(solve.contexts) == len(train)
        assert solve.contexts[0] == tok.encode_prompt(train[0].prompt(), "chat")  # with its worked example
        assert solve.responses[0] == tok.encode_response(train[0].reference, append_eos=True)
        assert refine.responses == solve.responses  # the rewrite is the reference
        texts = [tok.decode(c) for c in refine.contexts]
        assert all(REFERENCE not in t for t in texts)  # OPD's refine prompt: no reference shown
        assert sum(ex.reference in t for ex, t in zip(train, texts)) < len(train)  # most attempts are flawed
    finally:
        task.close()


def test_teacher_is_trained_once_cached_by_settings_and_used_by_the_run(tmp_path, tokenizer_dir, base_dir):
    from trd_jax.controller import train

    cfg = tiny_config(**{"task.name": "mini_math", "task.shots": 1, "task.tokenizer": tokenizer_dir,
                         "task.train_size": 24, "task.eval_size": 4, "teacher.source": "path", "teacher.path": base_dir,
                         "teacher_sft.enabled": True, "teacher_sft.steps": 3, "teacher_sft.batch_tokens": 512,
                         "teacher_sft.learning_rate": 1e-2, "teacher_sft.dir": str(tmp_path / "teachers"),
                         "rollout.max_new_tokens": 12, "refine.rewrite_budget": 12, "eval.max_new_tokens": 12,
                         "refine.prompt_budget": 600, "task.max_prompt_tokens": 400, "train.steps": 1})
    summary = train(cfg, str(tmp_path / "run"))
    sft = summary["teacher_sft"]
    assert sft["source"] == "trained" and sft["path"].startswith(str(tmp_path / "teachers"))
    base, tuned = load_hf(base_dir), load_hf(sft["path"])
    assert not np.allclose(np.asarray(base.lm_head_weight()), np.asarray(tuned.lm_head_weight()))
    assert summary["teacher_eval"]["num_problems"] == 4
    # The same settings reuse it; other settings get their own folder.
    task = _task(tmp_path / "data", tokenizer_dir)
    tok = Tokenizer.from_dir(tokenizer_dir)
    try:
        conf = teacher_sft_config(cfg)
        kw = dict(task_kind="math", prompt_mode="chat", refine_mode="chat")
        again = build_teacher(base_dir, task.split("train"), tok, conf, str(tmp_path / "teachers"), **kw)
        assert again["source"] == "cache" and again["path"] == sft["path"]
        other = conf.__class__(**{**conf.__dict__, "learning_rate": 2e-2})
        moved = build_teacher(base_dir, task.split("train"), tok, other, str(tmp_path / "teachers"), **kw)
        assert moved["source"] == "trained" and moved["path"] != sft["path"]
        assert os.path.isfile(os.path.join(sft["path"], "model.safetensors"))  # the first is left alone
    finally:
        task.close()


def test_teacher_sft_is_checked():
    for overrides, key in (({"distill.mode": "opsd"}, "teacher_sft.enabled"),
                           ({"task.name": "arithmetic"}, "teacher_sft.enabled"),
                           ({"teacher_sft.steps": 0}, "teacher_sft.steps")):
        cfg = apply_overrides(tiny_config(), {"task.name": "mini_math", "teacher_sft.enabled": True, **overrides})
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve(cfg)


def test_operand_range_bounds_the_problems_and_the_eval_split_is_drawn_first(tmp_path):
    rows = mini_math.generate(100, 0, max_operand=5)
    operands = {int(v) for r in rows for v in re.findall(r"\d+", r["problem"])}
    assert min(operands) == 2 and max(operands) == 10  # operands 2..5; a box of a + b pens holds up to 10
    assert max(int(r["answer"]) for r in rows) == 25  # 5 notebooks at 5 dollars
    assert mini_math.num_problems(5) == 3 * 4**2 + 4**3 and mini_math.num_problems() == mini_math.NUM_PROBLEMS
    with pytest.raises(ValueError, match="112 distinct problems with operands up to 5"):
        mini_math.generate(113, 0, max_operand=5)
    # 48 simple problems in all: a large train split drawn after the eval split leaves the eval split's kinds as
    # drawn, about a quarter each; the train split takes what is left.
    paths = mini_math.write(str(tmp_path), train=60, eval=40, seed=0, shots=1, max_operand=5)
    read = {s: [json.loads(line) for line in open(p)] for s, p in paths.items()}
    kinds = [mini_math.kind_of(r["problem"]) for r in read["eval"]]
    assert min(kinds.count(k) for k in range(4)) >= 4
    assert not {r["problem"] for r in read["eval"]} & {r["problem"] for r in read["train"]}
