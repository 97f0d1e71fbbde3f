"""Host bookkeeping of a step's rows: refine flow, row policies, teacher contexts (fake teacher generations)."""

import numpy as np
import pytest

from trd_jax import trajectories as tj
from trd_jax.data.arithmetic import ArithmeticConfig, ArithmeticTask
from trd_jax.layouts import distill_batch
from trd_jax.refine import RefineConfig
from trd_jax.tokenization import Tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = ArithmeticTask(str(tmp_path_factory.mktemp("arith")), ArithmeticConfig(train_size=8, eval_size=2))
    tok = Tokenizer.from_dir(task.tokenizer_dir)
    examples = list(task.split("train"))[:4]
    prompts = tj.encode_prompts(tok, examples, "chat", 512)
    y_o = [tok.encode_response(f"The answer is {i}", append_eos=True) for i in range(4)]
    rows = tj.StepRows(examples, prompts, y_o, tj.grade(task, tok, y_o, examples), tj.capped(y_o, tok.eos_ids, 64))
    return task, tok, rows


def _copy(rows):
    return tj.StepRows(rows.examples, rows.prompts, [list(r) for r in rows.y_o], rows.y_o_reward, rows.y_o_capped)


def test_refine_keeps_drops_and_counts_rows(setup):
    task, tok, base = setup
    rows = _copy(base)
    cfg = RefineConfig(prompt_budget=512, rewrite_budget=6, on_empty_rewrite="drop", on_capped_rewrite="keep")
    eos = tok.eos_id
    fixed = tok.encode(task.split("train")[0].reference)[:3]
    outputs = [fixed + [eos], [eos], tok.encode("Step 1: 2 + 1 = 3 4 5")[:6], fixed[:1] + [eos]]
    calls = []

    def generate(ids, drafts):
        calls.append(ids)
        assert drafts == base.y_o  # speculative refine's drafts: the sent rows' own y_o
        return outputs

    tj.refine(rows, tok, cfg, generate)
    assert len(calls) == 1 and len(calls[0]) == 4
    # The refine prompt of row i holds y_o of row i, decoded without the EOS.
    for i in range(4):
        assert f"The answer is {i}" in tok.decode(calls[0][i]) and "<|end|>\n<|assistant|>" in tok.decode(calls[0][i])
    assert rows.sources == ["y_r", "dropped", "y_r", "y_r"]
    assert rows.responses == [outputs[0], [], outputs[2], outputs[3]]
    assert rows.verdicts.counts["empty"] == 1 and rows.verdicts.counts["capped"] == 1
    assert rows.verdicts.counts["drop"] == 1 and rows.verdicts.counts["keep"] == 3
    assert rows.y_o == base.y_o  # nothing mutated in place

    vanilla = tj.vanilla_contexts(tok, rows.examples, rows.prompts, mode="opd", task_kind="math", prompt_mode="chat")
    assert vanilla == rows.prompts
    tj.choose_teacher_contexts(rows, vanilla, "refine")
    assert rows.teacher_contexts[0] == list(rows.refine_prompts.ids[0])
    assert rows.teacher_contexts[1] == rows.prompts[1]  # dropped row: vanilla context, empty response
    batch = distill_batch(rows.prompts, rows.responses, rows.teacher_contexts, pad_id=tok.pad_id)
    assert batch.response_mask.sum(axis=1).tolist() == [4, 0, 6, 2]
    tj.choose_teacher_contexts(rows, vanilla, "vanilla")
    assert rows.teacher_contexts == rows.prompts


def test_prompt_over_budget_falls_back_without_calling_the_teacher(setup):
    _, tok, base = setup
    rows = _copy(base)
    cfg = RefineConfig(prompt_budget=20, rewrite_budget=6, on_prompt_over_budget="fallback")
    tj.refine(rows, tok, cfg, lambda ids, drafts: pytest.fail("no row should reach the teacher"))
    assert rows.sources == ["y_o"] * 4 and rows.responses == base.y_o
    assert rows.refine_prompts.counts["fallback"] == 4 and rows.verdicts.counts["prompt_over_budget"] == 4
    vanilla = tj.vanilla_contexts(tok, rows.examples, rows.prompts, mode="opd", task_kind="math", prompt_mode="chat")
    tj.choose_teacher_contexts(rows, vanilla, "refine")
    assert rows.teacher_contexts == rows.prompts


def test_empty_rewrite_error_policy_names_the_row(setup):
    _, tok, base = setup
    cfg = RefineConfig(prompt_budget=512, rewrite_budget=6, on_empty_rewrite="error")
    with pytest.raises(ValueError, match="rewrite row 2: empty"):
        eos = tok.eos_id
        tj.refine(_copy(base), tok, cfg, lambda ids, drafts: [[40, eos], [41, eos], [eos], [42, eos]])


def test_opsd_vanilla_context_shows_the_reference(setup):
    _, tok, rows = setup
    ctx = tj.vanilla_contexts(tok, rows.examples, rows.prompts, mode="opsd", task_kind="math", prompt_mode="chat")
    text = tok.decode(ctx[0])
    assert "**Reference Solution:**" in text and rows.examples[0].reference in text
    assert text.endswith("<|assistant|>\n")


def test_prompt_budget_and_capped_rows(setup):
    task, tok, rows = setup
    with pytest.raises(ValueError, match="exceeds task.max_prompt_tokens=10"):
        tj.encode_prompts(tok, rows.examples, "chat", 10)
    flags = tj.capped([[1, 2, 3], [4, 5, tok.eos_id], [4, tok.eos_id]], tok.eos_ids, 3)
    assert flags.tolist() == [True, False, False]
    assert np.all(rows.y_o_reward == 0.0)


def _graded(rows, rewards):
    out = _copy(rows)
    out.y_o_reward = np.asarray(rewards, np.float32)
    return out


def test_refine_wrong_rows_only_sends_wrong_rollouts(setup):
    _, tok, base = setup
    rows = _graded(base, [1.0, 0.0, 1.0, 0.0])
    eos = tok.eos_id
    calls = []

    def generate(ids, drafts):
        calls.append(ids)
        assert drafts == [base.y_o[1], base.y_o[3]]  # the sent rows' y_o, in their order
        return [[40, eos], [41, eos]]

    tj.refine(rows, tok, RefineConfig(prompt_budget=512, rewrite_budget=6, rows="wrong"), generate)
    # Only rows 1 and 3 (graded wrong) reach the teacher; rows 0 and 2 train on y_o and cost no refine tokens.
    assert len(calls) == 1 and len(calls[0]) == 2
    assert "The answer is 1" in tok.decode(calls[0][0]) and "The answer is 3" in tok.decode(calls[0][1])
    assert rows.refine_prompts.generate_rows == (1, 3) and rows.refine_prompts.counts["skipped"] == 2
    assert rows.verdicts.counts["not_sent"] == 2 and rows.verdicts.counts["keep"] == 2
    assert rows.sources == ["y_o", "y_r", "y_o", "y_r"]
    assert rows.responses == [base.y_o[0], [40, eos], base.y_o[2], [41, eos]]
    vanilla = tj.vanilla_contexts(tok, rows.examples, rows.prompts, mode="opd", task_kind="math", prompt_mode="chat")
    tj.choose_teacher_contexts(rows, vanilla, "refine")
    assert rows.teacher_contexts[0] == rows.prompts[0] and rows.teacher_contexts[2] == rows.prompts[2]
    assert rows.teacher_contexts[1] == list(rows.refine_prompts.ids[1])
    batch = distill_batch(rows.prompts, rows.responses, rows.teacher_contexts, pad_id=tok.pad_id)
    assert batch.response_mask.shape[0] == 4 and batch.response_mask.sum(axis=1).tolist() == [
        len(base.y_o[0]), 2, len(base.y_o[2]), 2]

    # Every rollout correct: the teacher is not called at all.
    rows = _graded(base, [1.0] * 4)
    tj.refine(rows, tok, RefineConfig(prompt_budget=512, rewrite_budget=6, rows="wrong"),
              lambda ids, drafts: pytest.fail("no row should reach the teacher"))
    assert rows.sources == ["y_o"] * 4 and rows.y_r == [] and rows.responses == base.y_o


@pytest.mark.parametrize("policy,sources,counts", [
    ("keep", ["y_r", "y_r", "y_r", "dropped"], (2, 0, 0)),
    ("fallback", ["y_r", "y_o", "y_o", "dropped"], (0, 2, 0)),
    ("drop", ["y_r", "dropped", "dropped", "dropped"], (0, 0, 2)),
])
def test_wrong_rewrites_are_kept_fall_back_or_dropped(setup, policy, sources, counts):
    _, tok, base = setup
    rows = _copy(base)
    eos = tok.eos_id
    outputs = [[40, eos], [41, eos], [42, eos], [eos]]  # the last is empty: dropped by on_empty_rewrite
    tj.refine(rows, tok, RefineConfig(prompt_budget=512, rewrite_budget=6, on_empty_rewrite="drop",
                                      on_wrong_rewrite=policy), lambda ids, drafts: outputs)
    rows.y_r_reward = np.array([1.0, 0.0, 0.0, 0.0], np.float32)  # graded: row 0 right, rows 1-2 wrong
    got = tj.apply_wrong_rewrites(rows, policy)
    assert got == dict(zip(tj.WRONG_REWRITE_COUNTERS, counts))
    assert rows.sources == sources
    expected = {"y_r": outputs, "y_o": base.y_o}
    assert rows.responses == [expected[src][b] if src != "dropped" else [] for b, src in enumerate(sources)]
    vanilla = tj.vanilla_contexts(tok, rows.examples, rows.prompts, mode="opd", task_kind="math", prompt_mode="chat")
    tj.choose_teacher_contexts(rows, vanilla, "refine")
    for b, src in enumerate(sources):  # only rows still on y_r are scored under their refine prompt
        assert rows.teacher_contexts[b] == (list(rows.refine_prompts.ids[b]) if src == "y_r" else rows.prompts[b])
    batch = distill_batch(rows.prompts, rows.responses, rows.teacher_contexts, pad_id=tok.pad_id)
    assert batch.response_mask.shape[0] == 4  # shapes unchanged: a dropped row keeps its place, all-false mask
    assert [bool(m.any()) for m in batch.response_mask] == [src != "dropped" for src in sources]
