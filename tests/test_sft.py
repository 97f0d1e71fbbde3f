"""SFT (the bootstrap's trainer) and the bootstrap's data mixtures."""

import jax
import numpy as np
import pytest
from flax import nnx

from trd_jax.data.arithmetic import ArithmeticConfig, ArithmeticTask, line_forms, step_errors
from trd_jax.bootstrap import sft_sets
from trd_jax.config import BootstrapConfig
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer, causal_lm_positions
from trd_jax.sft import SFTSet, _batch, sft_loss, train_sft
from trd_jax.rewards.answers import last_boxed
from trd_jax.tokenization import Tokenizer

CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16)


@pytest.mark.slow
def test_sft_loss_matches_a_numpy_reference():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    contexts = [list(rng.integers(1, 40, n)) for n in (3, 7, 5)]
    responses = [list(rng.integers(1, 40, n)) for n in (4, 1, 6)]
    s = SFTSet("x", contexts, responses)
    batch = _batch(s, np.arange(3), (8, 8))
    loss = float(sft_loss(params, graphdef, *batch, context_width=8))
    # Reference: each row alone, unpadded, full logits, log-softmax in numpy, next-token NLL of the response.
    nll = []
    for ctx, resp in zip(contexts, responses):
        ids = np.array([ctx + resp])
        mask = np.ones_like(ids, bool)
        hidden, _ = model(ids, causal_lm_positions(mask), mask)
        logits = np.asarray(model.logits(hidden), np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll += [-logp[len(ctx) - 1 + r, tok] for r, tok in enumerate(resp)]
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)


def test_train_sft_learns_a_mapping():
    rng = np.random.default_rng(1)
    contexts = [[int(a), 3] for a in rng.integers(5, 15, 64)]
    responses = [[c[0] + 10, 2] for c in contexts]  # respond with the context's first token + 10, then "EOS"
    sets = [SFTSet("shift", contexts, responses)]
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    before = float(sft_loss(nnx.split(model)[1], nnx.split(model)[0], *map(jax.numpy.asarray,
                                                                           _batch(sets[0], np.arange(64), (16, 8))),
                            context_width=16))
    logs = []
    trained = train_sft(model, sets, steps=120, batch_tokens=512, learning_rate=1e-2, seed=0, warmup_steps=10,
                        on_log=lambda step, m: logs.append(m["sft_loss/shift"]), log_every=40)
    g, p = nnx.split(trained)
    after = float(sft_loss(p, g, *map(jax.numpy.asarray, _batch(sets[0], np.arange(64), (16, 8))), context_width=16))
    assert after < 0.1 < before and len(logs) == 3 and logs[-1] < logs[0]
    with pytest.raises(ValueError, match="SFT set 'bad'"):
        SFTSet("bad", [[1]], [])


def test_bootstrap_mixtures(tmp_path):
    task = ArithmeticTask(str(tmp_path), ArithmeticConfig(train_size=400, eval_size=4, min_steps=6, max_steps=10))
    tok = Tokenizer.from_dir(task.tokenizer_dir)
    cfg = BootstrapConfig(student_bug_rate=0.6, repair_fraction=0.5, teacher_alt_form_rate=0.3,
                          student_alt_form_rate=0.2)
    teacher = sft_sets(task, tok, "teacher", cfg)
    assert [s.name for s in teacher] == ["solve", "refine_opd", "after_error"]
    train = list(task.split("train"))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    # Solving: correct solutions, some lines in the complement form (alternative derivations).
    solve = [decode(r) for r in teacher[0].responses]
    assert all(task.grade(t, ex) == 1.0 for t, ex in zip(solve, train))
    alt = np.mean([np.mean(line_forms(t, task.problem_of(ex))) for t, ex in zip(solve, train)])
    assert 0.25 < alt < 0.35
    assert all(r[-1] == tok.eos_id for s in teacher for r in s.responses)
    # Rewriting: always correct, each line in the form the attempt wrote it.
    for ctx, r, ex in zip(teacher[1].contexts, teacher[1].responses, train):
        attempt = tok.decode(ctx).split("**Your Initial Solution:**")[1]
        assert task.grade(decode(r), ex) == 1.0
        attempt_forms = line_forms(attempt, task.problem_of(ex))
        assert line_forms(decode(r), task.problem_of(ex)) == attempt_forms
    # After an error in context: about half repair (right answer), half continue (wrong answer).
    after = teacher[2]
    repaired = [last_boxed(decode(r)) == ex.answer for r, ex in zip(after.responses, train)]
    assert 0.4 < np.mean(repaired) < 0.6
    refine_text = tok.decode(teacher[1].contexts[0])
    assert "**Your Initial Solution:**" in refine_text and "**Reference Solution:**" not in refine_text
    student = {s.name: s for s in sft_sets(task, tok, "student", cfg)}
    assert set(student) == {"solve_noisy", "vanilla_opsd", "refine_opsd"}
    texts = [decode(r) for r in student["solve_noisy"].responses]
    errors = [step_errors(t, task.problem_of(ex)) for t, ex in zip(texts, train)]
    assert 0.6 < np.mean([bool(e) for e in errors]) < 0.9  # most solutions carry a wrap error
    assert np.mean([len(e) > 1 for e in errors]) > 0.2  # more than one is common
    assert all(task.grade(t, ex) == 1.0 for t, ex, e in zip(texts, train, errors) if not e)
    assert all(task.grade(t, ex) == 0.0 for t, ex, e in zip(texts, train, errors) if len(e) == 1)
    assert "**Reference Solution:**" in tok.decode(student["vanilla_opsd"].contexts[0])
    assert train[0].reference in tok.decode(student["refine_opsd"].contexts[0])
    assert all(task.grade(decode(r), ex) == 1.0 for r, ex in zip(student["refine_opsd"].responses, train))


def test_bootstrap_student_misremembers_its_seed_facts(tmp_path):
    """The student's noisy solutions get a plain line wrong only where its seed's misremembered fact says, with
    that fact's wrong result; the teacher's rewrite training sees such attempts too."""
    from trd_jax.bootstrap import student_facts
    from trd_jax.data.arithmetic import parse_steps

    task = ArithmeticTask(str(tmp_path), ArithmeticConfig(train_size=300, eval_size=4))
    tok = Tokenizer.from_dir(task.tokenizer_dir)
    cfg = BootstrapConfig(student_bug_rate=1.0, student_wrong_fact_rate=0.5, seed=3)
    facts = student_facts(cfg)
    assert facts and student_facts(BootstrapConfig()) is None
    noisy = sft_sets(task, tok, "student", cfg)[0]
    wrong_plain = 0
    for r in noisy.responses:
        for _, a, op, b, c in parse_steps(tok.decode(r, skip_special_tokens=True)):
            exact = (a + b) % 10 if op == "+" else (a - b) % 10
            wraps = a + b >= 10 if op == "+" else a - b < 0
            if not wraps:
                assert c == facts.get((a, op, b), exact)
                wrong_plain += c != exact
    assert wrong_plain > 100
    refine = sft_sets(task, tok, "teacher", cfg)[1]
    attempts = [tok.decode(ctx).split("**Your Initial Solution:**")[1] for ctx in refine.contexts]
    assert sum(f"{a} {op} {b} = {v}" in t for t in attempts for (a, op, b), v in facts.items()) > 20
