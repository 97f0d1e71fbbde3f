"""The embedded running-arithmetic task, its tokenizer, the answer extractor and the checkpointable prompt iterator."""

import numpy as np
import pytest

from trd_jax.data.arithmetic import (ArithmeticConfig, ArithmeticTask, Problem, after_error_outcome, buggy_values,
                                     flawed_prefix, line_accuracy, misremembered_facts,
                                     continuation_after_error, corrupted_attempt, first_error, flawed_solution, wraps,
                                     line_forms, parse_problem, parse_steps, problem_text, random_forms,
                                     solution_text, step_errors)
from trd_jax.data.task import Example, NoUsableExamples, PromptIterator
from trd_jax.prompts import strip_answer_instruction
from trd_jax.refine import RefineConfig, build_refine_prompts
from trd_jax.rewards.answers import last_boxed
from trd_jax.tokenization import Tokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return ArithmeticTask(str(tmp_path_factory.mktemp("arith")),
                          ArithmeticConfig(train_size=300, eval_size=40, max_operand=3))


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
        cfg = task.cfg
        assert cfg.min_steps <= len(p.ops) <= cfg.max_steps
        assert all(op in "+-" and 1 <= b <= cfg.max_operand for op, b in p.ops)
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
    # The train split does not depend on the eval split's size (a bootstrap trained on it stays valid).
    more_eval = ArithmeticTask(str(tmp_path), ArithmeticConfig(train_size=300, eval_size=200))
    assert list(more_eval.split("train")) == list(task.split("train"))
    assert list(more_eval.split("eval"))[:40] == list(task.split("eval"))
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
        for repair, at_wrap in ((True, False), (False, False), (True, True), (False, True)):
            prefix, rest = continuation_after_error(p, rng, repair=repair, at_wrap=at_wrap)
            assert prefix.endswith("\n") and not rest.startswith("\n")
            err = first_error(prefix, p)
            assert err is not None and err == len(parse_steps(prefix)) - 1  # the prefix ends with the wrong line
            _, a, op, b, c = parse_steps(prefix)[-1]
            if at_wrap and any(wraps(x, o, y) for _, x, o, y, _ in parse_steps(ex.reference)[:-1]):
                # the student's kind of error (buggy_values): a line that wraps, one too far
                assert wraps(a, op, b) and c == ((a + b + 1) if op == "+" else (a - b - 1)) % 10, prefix
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


def _by_hand(p: Problem, forms) -> list[tuple[str, int, int]]:
    """Independent reference of a solution in given forms: (op, operand, result) per line, with Python's %."""
    out, v = [], p.start
    for (op, b), f in zip(p.ops, forms):
        wop, wb = (op, b) if f == 0 else ({"+": "-", "-": "+"}[op], 10 - b)
        v = (v + wb) % 10 if wop == "+" else (v - wb) % 10
        out.append((wop, wb, v))
    return out


def test_alternative_derivations_are_accepted(task):
    rng = np.random.default_rng(3)
    for ex in list(task.split("train"))[:100]:
        p = task.problem_of(ex)
        forms = random_forms(len(p.ops), rng, 0.5)
        text = solution_text(p, forms=forms)
        steps = parse_steps(text)
        assert [(op, b, c) for _, _, op, b, c in steps] == _by_hand(p, forms)
        assert first_error(text, p) is None and step_errors(text, p) == [] and task.grade(text, ex) == 1.0
        assert line_forms(text, p) == forms
        if any(forms):
            assert text != ex.reference  # a correct solution that differs from the reference
    p = Problem(4, (("+", 2), ("-", 1)))
    assert first_error("Step 1: 4 - 8 = 6\nStep 2: 6 + 9 = 5", p) is None  # both lines in the other form
    assert first_error("Step 1: 4 - 2 = 2\nStep 2: 2 + 9 = 1", p) == 0  # "- 2" is neither form of "add 2"
    assert first_error("Step 1: 4 - 8 = 5\nStep 2: 5 + 9 = 4", p) == 0  # right form, wrong result


def test_step_errors_locate_every_local_mistake():
    p = Problem(3, (("+", 1), ("+", 2), ("-", 1), ("+", 1)))
    # Step 2 wrong (5 instead of 6), step 3 consistent with it, step 4 wrong again (4 + 1 = 6).
    text = "Step 1: 3 + 1 = 4\nStep 2: 4 + 2 = 5\nStep 3: 5 - 1 = 4\nStep 4: 4 + 1 = 6\nThe answer is \\boxed{6}."
    assert step_errors(text, p) == [1, 3] and first_error(text, p) == 1
    assert step_errors("Step 1: 3 + 1 = 4\nStep 3: 4 - 1 = 3", p) == [1, 3]  # lines 2 and 4 missing
    assert step_errors("Step 1: 3 + 1 = 4\nStep 2: 5 + 2 = 7", p)[0] == 1  # input not carried forward


def test_buggy_values_err_only_where_a_line_wraps(task):
    rng = np.random.default_rng(4)
    wrap_lines = wrong_wraps = 0
    for ex in list(task.split("train"))[:200]:
        p = task.problem_of(ex)
        forms = random_forms(len(p.ops), rng, 0.3)
        text = solution_text(p, buggy_values(p, forms, rng, 0.6), forms)
        steps = parse_steps(text)
        prev = p.start
        for _, a, op, b, c in steps:
            assert a == prev  # every line starts from the value above it: errors propagate
            wrapped = a + b >= 10 if op == "+" else a - b < 0
            exact = (a + b) % 10 if op == "+" else (a - b) % 10
            if not wrapped:
                assert c == exact
            else:
                wrap_lines += 1
                wrong_wraps += c != exact
                assert c in (exact, (exact + (1 if op == "+" else -1)) % 10)
            prev = c
        # One off-by-one error, or several that do not cancel, spoil the answer.
        assert task.grade(text, ex) <= float(not step_errors(text, p)) or len(step_errors(text, p)) > 1
    assert 0.5 < wrong_wraps / wrap_lines < 0.7


def test_grader(task):
    ex = task.split("eval")[0]
    assert task.grade(ex.reference, ex) == 1.0
    assert task.grade(f"work\nThe answer is \\boxed{{{ex.answer}}}.", ex) == 1.0  # the final answer decides
    assert task.grade(ex.reference + f" \\boxed{{{(int(ex.answer) + 1) % 10}}}", ex) == 0.0  # the last box counts
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
        assert rp.full_lengths[0] < 512  # within the default recipe's refine.prompt_budget


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
    with pytest.raises(NoUsableExamples, match="no usable examples"):
        PromptIterator([], seed=0)


def test_misremembered_facts_are_plain_facts_each_with_its_own_wrong_result():
    facts = misremembered_facts(0.5, np.random.default_rng([7, 3]))
    assert facts == misremembered_facts(0.5, np.random.default_rng([7, 3]))  # a draw of the seed
    assert facts != misremembered_facts(0.5, np.random.default_rng([8, 3]))
    plain = [(a, op, b) for a in range(10) for op in "+-" for b in range(1, 10)
             if not (a + b >= 10 if op == "+" else a - b < 0)]
    assert len(plain) == 90 and set(facts) <= set(plain)
    assert 30 <= len(facts) <= 60  # about half of the 90
    for (a, op, b), wrong in facts.items():
        exact = (a + b) % 10 if op == "+" else (a - b) % 10
        assert wrong in ((exact + 1) % 10, (exact - 1) % 10)
    assert misremembered_facts(0.0, np.random.default_rng(0)) == {}


def test_buggy_values_with_misremembered_facts(task):
    """At bug rate 1 every misremembered fact gets its wrong result and every wrap is one too far; other lines
    are right, each computed from the (possibly wrong) value above it."""
    facts = misremembered_facts(0.5, np.random.default_rng([0, 3]))
    rng = np.random.default_rng(5)
    wrong_plain = 0
    for ex in list(task.split("train"))[:200]:
        p = task.problem_of(ex)
        values, prev = buggy_values(p, [0] * len(p.ops), rng, 1.0, facts), p.start
        for (op, b), v in zip(p.ops, values):
            exact = (prev + b) % 10 if op == "+" else (prev - b) % 10
            if (prev + b >= 10) if op == "+" else (prev - b < 0):
                assert v == (exact + (1 if op == "+" else -1)) % 10
            elif (prev, op, b) in facts:
                assert v == facts[(prev, op, b)]
                wrong_plain += 1
            else:
                assert v == exact
            prev = v
    assert wrong_plain > 50
    # Without facts the stream of random draws is the one before facts existed (old bootstraps reproduce).
    p = task.problem_of(next(iter(task.split("train"))))
    assert (buggy_values(p, [0] * len(p.ops), np.random.default_rng(1), 0.6)
            == buggy_values(p, [0] * len(p.ops), np.random.default_rng(1), 0.6, {}))


def test_line_accuracy_judges_each_line_from_the_value_it_starts_at():
    texts = ["Step 1: 8 + 3 = 2\nStep 2: 2 - 1 = 1\nThe answer is \\boxed{1}.",  # wrap wrong, then right from 2
             "Step 1: 1 - 3 = 8\nStep 2: 8 + 1 = 0\nnot a step line"]  # wrap right, plain wrong
    assert line_accuracy(texts) == {"wrap": 0.5, "plain": 0.5}
    assert line_accuracy(["Step 1: 2 + 1 = 3"]) == {"wrap": None, "plain": 1.0}


def test_flawed_prefix_cuts_after_the_first_wrong_result_and_classifies_continuations():
    p = Problem(3, (("+", 1), ("+", 2), ("-", 1)))  # 4, 6, 5
    text = "Step 1: 3 + 1 = 4\nStep 2: 4 + 2 = 7\nStep 3: 7 - 1 = 6\nThe answer is \\boxed{6}."
    prefix, consistent = flawed_prefix(text, p)
    assert prefix == "Step 1: 3 + 1 = 4\nStep 2: 4 + 2 = 7\n" and consistent == 6
    assert flawed_prefix("Step 1: 3 - 9 = 4\nStep 2: 4 - 8 = 5", p)[1] == 4  # complement forms are steps too
    assert flawed_prefix(solution_text(p), p) is None  # nothing wrong
    assert flawed_prefix("Step 1: 3 + 1 = 4\nStep 2: 5 + 2 = 8", p) is None  # a wrong input comes first
    assert flawed_prefix("Step 1: 3 + 3 = 5", p) is None  # a wrong operand comes first
    assert after_error_outcome("Step 3: 6 - 1 = 5\nThe answer is \\boxed{5}.", p, consistent) == "repair"
    assert after_error_outcome("Step 3: 7 - 1 = 6\nThe answer is \\boxed{6}.", p, consistent) == "continue"
    assert after_error_outcome("Step 3: 7 - 1 = 2\nThe answer is \\boxed{2}.", p, consistent) == "other"
    assert after_error_outcome("Step 3: 7 - 1 =", p, consistent) == "other"
