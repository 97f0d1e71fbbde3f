"""The embedded running-arithmetic task, its tokenizer, the answer extractor and the checkpointable prompt iterator."""

import numpy as np
import pytest

from trd_jax.data.arithmetic import (ArithmeticConfig, ArithmeticTask, Problem, continuation_after_error,
                                     corrupted_attempt, first_error, flawed_solution, parse_problem, parse_steps,
                                     problem_text, solution_text)
from trd_jax.data.task import Example, PromptIterator
from trd_jax.refine import RefineConfig, build_refine_prompts, strip_answer_instruction
from trd_jax.rewards.answers import last_boxed
from trd_jax.tokenization import Tokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return ArithmeticTask(str(tmp_path_factory.mktemp("arith")), ArithmeticConfig(train_size=300, eval_size=40))


@pytest.fixture(scope="module")
def tok(task):
    return Tokenizer.from_dir(task.tokenizer_dir)


def _chain(p: Problem) -> list[int]:
    """Independent reference: the running values with Python's own modulo."""
    out, v = [], p.start
    for op, b in p.ops:
        v = (v + b if op == "+" else v - b) % 10
        out.append(v)
    return out


def test_reference_solutions_are_correct_and_parse(task):
    for ex in list(task.split("train"))[:50] + list(task.split("eval")):
        p = task.problem_of(ex)
        assert 3 <= len(p.ops) <= 5 and all(op in "+-" and 1 <= b <= 2 for op, b in p.ops)
        assert p.values() == _chain(p) and ex.answer == str(_chain(p)[-1])
        assert task.grade(ex.reference, ex) == 1.0
        assert first_error(ex.reference, p) is None
        steps = parse_steps(ex.reference)
        assert [s[0] for s in steps] == list(range(1, len(p.ops) + 1)) and [s[4] for s in steps] == p.values()
        assert all(steps[i][1] == steps[i - 1][4] for i in range(1, len(steps)))  # results carried forward
        assert strip_answer_instruction(ex.problem) != ex.problem  # ends with the boxed instruction


def test_splits_are_deterministic_and_disjoint(task, tmp_path):
    again = ArithmeticTask(str(tmp_path), ArithmeticConfig(train_size=300, eval_size=40))
    assert list(again.split("train")) == list(task.split("train"))
    assert list(again.split("eval")) == list(task.split("eval"))
    train = {ex.problem for ex in task.split("train")}
    assert len(train) == 300 and not train & {ex.problem for ex in task.split("eval")}
    other = ArithmeticTask(str(tmp_path), ArithmeticConfig(train_size=300, eval_size=40, seed=1))
    assert list(other.split("eval")) != list(task.split("eval"))
    with pytest.raises(ValueError, match="unknown split"):
        task.split("test")
    with pytest.raises(ValueError, match="task.max_operand=10"):
        ArithmeticConfig(max_operand=10)


def test_flawed_solutions_propagate_the_error(task):
    rng = np.random.default_rng(0)
    for ex in list(task.split("train"))[:100]:
        p = task.problem_of(ex)
        text, step = flawed_solution(p, rng)
        assert step < (len(p.ops) + 1) // 2  # early
        assert first_error(text, p) == step
        assert task.grade(text, ex) == 0.0  # adding mod 10 is a bijection: the error reaches the answer
        steps = parse_steps(text)
        for i in range(step + 1, len(steps)):  # later steps are right *given* the wrong value
            _, a, op, b, c = steps[i]
            assert a == steps[i - 1][4] and c == (a + b if op == "+" else a - b) % 10


def test_continuations_after_an_error_repair_or_continue(task):
    rng = np.random.default_rng(1)
    for ex in list(task.split("train"))[:60]:
        p = task.problem_of(ex)
        for repair in (True, False):
            prefix, rest = continuation_after_error(p, rng, repair=repair)
            assert prefix.endswith("\n") and not rest.startswith("\n")
            err = first_error(prefix, p)
            assert err is not None and err == len(parse_steps(prefix)) - 1  # the prefix ends with the wrong line
            full = prefix + rest
            assert task.grade(full, ex) == float(repair)  # repairing reaches the right answer
            steps = parse_steps(full)
            nxt = steps[err + 1]
            if repair:  # the next line starts again from the correct value
                assert nxt[1] == p.values()[err] and steps[err + 1:] == parse_steps(ex.reference)[err + 1:]
            else:  # consistent with the wrong value
                assert nxt[1] == steps[err][4]


def test_corrupted_attempts_are_wrong(task):
    rng = np.random.default_rng(2)
    for ex in list(task.split("train"))[:200]:
        p = task.problem_of(ex)
        attempt = corrupted_attempt(p, rng)
        # A wrong step, or (a cut after the last step) no answer: never a correct solution.
        assert first_error(attempt, p) is not None or task.grade(attempt, ex) == 0.0, attempt


def test_first_error_finds_missing_and_inconsistent_lines():
    p = Problem(4, (("+", 2), ("-", 1), ("+", 1)))
    good = solution_text(p)
    assert good.splitlines()[0] == "Step 1: 4 + 2 = 6" and good.endswith("\\boxed{6}.")
    assert first_error("Step 1: 4 + 2 = 6\nStep 2: 6 - 1 = 5", p) == 2  # missing line
    assert first_error("Step 1: 4 + 2 = 6\nStep 2: 7 - 1 = 6\nStep 3: 6 + 1 = 7", p) == 1  # input not carried
    assert first_error("Step 1: 4 + 1 = 5\nStep 2: 5 - 1 = 4\nStep 3: 4 + 1 = 5", p) == 0  # wrong operand
    assert first_error("Step 1: 4 + 2 = 6\nStep 3: 6 - 1 = 5\nStep 3: 5 + 1 = 6", p) == 1  # wrong label
    assert first_error("Step 1: 9 + 2 = 1", Problem(9, (("+", 2),))) is None  # wraps around
    assert first_error("", p) == 0
    assert parse_problem(problem_text(p)) == p


def test_grader(task):
    ex = task.split("eval")[0]
    assert task.grade(f"work\nThe answer is \\boxed{{{ex.answer}}}.", ex) == 1.0
    assert task.grade(f"\\boxed{{{ex.answer}}} then \\boxed{{{(int(ex.answer) + 1) % 10}}}", ex) == 0.0  # last one
    assert task.grade(ex.answer, ex) == 0.0  # no box
    assert task.grade("The answer is \\boxed{", ex) == 0.0


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{ 7 }") == "7"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None
    assert last_boxed("\\boxed{}") == ""


def test_tokenizer_round_trips_and_has_a_chat_template(task, tok):
    ex = task.split("train")[0]
    ids = tok.encode(ex.reference)
    assert tok.decode(ids) == ex.reference and tok.encode(tok.decode(ids)) == ids
    assert "[UNK]" not in tok.hf.convert_ids_to_tokens(ids)
    assert tok.vocab_size < 400 and tok.eos_ids == (tok.hf.convert_tokens_to_ids("<|end|>"),)
    prompt = tok.render_prompt(ex.problem, "chat")
    assert prompt == f"<|user|>\n{ex.problem}<|end|>\n<|assistant|>\n"
    assert tok.decode(tok.encode_response(ex.reference, append_eos=True), skip_special_tokens=True) == ex.reference
    # Refine prompts for both modes use only known pieces.
    for mode in ("opd", "opsd"):
        rp = build_refine_prompts(tok, [ex.problem], [ex.reference], [ex.reference], RefineConfig(mode=mode))
        assert "[UNK]" not in tok.hf.convert_ids_to_tokens(rp.ids[0])
        assert rp.full_lengths[0] < 300


def test_prompt_iterator_is_deterministic_and_resumes():
    examples = [Example(str(i), f"p{i}", "0") for i in range(10)]
    it = PromptIterator(examples, seed=3)
    seen = [e.id for e in it.next(4) + it.next(4) + it.next(4)]  # crosses an epoch
    assert sorted(seen[:10]) == sorted(map(str, range(10)))  # one epoch is a permutation
    assert seen[:10] != [str(i) for i in range(10)]
    it2 = PromptIterator(examples, seed=3)
    it2.next(4)
    state = it2.state()
    it3 = PromptIterator(examples, seed=3)
    it3.restore(state)
    assert [e.id for e in it3.next(8)] == seen[4:12]
    with pytest.raises(ValueError, match="dataset or data seed changed"):
        PromptIterator(examples[:9], seed=3).restore(state)
    with pytest.raises(ValueError, match="no examples"):
        PromptIterator([], seed=0)
