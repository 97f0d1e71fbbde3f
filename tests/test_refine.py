"""Tests for trd_jax.refine on a tiny byte-level BPE tokenizer with a chat template (offline)."""

import copy
import dataclasses
import json

import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trd_jax.prompts import (
    ATTEMPT,
    CODE_ANSWER_INSTRUCTION,
    INSTRUCTIONS,
    MATH_ANSWER_INSTRUCTION,
    PROBLEM,
    REFERENCE,
    TRUNCATION_NOTICE,
    refine_prompt_text,
    strip_answer_instruction,
    vanilla_teacher_context,
)
from trd_jax.refine import RefineConfig, build_refine_prompts, select_trajectories, validate_rewrites
from trd_jax.sampling import SampleOutput
from trd_jax.tokenization import Tokenizer

TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BOXED_X = "What is 2+2? " + MATH_ANSWER_INSTRUCTION
LONG_ATTEMPT = "ATTEMPTBEGIN " + "step " * 150 + "ATTEMPTEND"
LONG_REF = "REFBEGIN " + "ref " * 150 + "REFEND"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["What is 2+2? The answer is 4.", "step ref user assistant Problem Solution"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=TEMPLATE)
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    ids = [raw.token_to_id("<|im_end|>"), raw.token_to_id("<|endoftext|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return Tokenizer.from_dir(str(path))


def _order(text, *markers):
    pos = [text.index(m) for m in markers]
    return pos == sorted(pos)


# ---- templates ---------------------------------------------------------------------------------


def test_opd_math_template():
    text = refine_prompt_text(BOXED_X, "It is 5.", "SECRET REF", mode="opd", task="math")
    assert _order(text, PROBLEM, ATTEMPT, INSTRUCTIONS) and REFERENCE not in text
    assert "SECRET REF" not in text  # the reference is OPSD's privilege
    assert text.count("\\boxed{}") == 1 and text.endswith(MATH_ANSWER_INSTRUCTION)
    assert f"{PROBLEM}\nWhat is 2+2?\n\n{ATTEMPT}\nIt is 5.\n\n{INSTRUCTIONS}\n1. " in text


def test_opsd_math_template():
    text = refine_prompt_text(BOXED_X, "It is 5.", "2+2 = 4, so \\boxed{4}.", mode="opsd", task="math")
    assert _order(text, PROBLEM, REFERENCE, ATTEMPT, INSTRUCTIONS)
    assert f"{REFERENCE}\n2+2 = 4, so \\boxed{{4}}.\n\n{ATTEMPT}" in text
    assert text.count(MATH_ANSWER_INSTRUCTION) == 1 and text.endswith(MATH_ANSWER_INSTRUCTION)


def test_code_templates():
    opd = refine_prompt_text("Sum a list.", "def f(x): return 0", "REF", mode="opd", task="code")
    assert _order(opd, PROBLEM, ATTEMPT, INSTRUCTIONS) and REFERENCE not in opd and "REF" not in opd
    assert "\\boxed" not in opd and opd.endswith("Reply with only the corrected Python in one ```python block.")
    opsd = refine_prompt_text("Sum a list. " + CODE_ANSWER_INSTRUCTION, "def f(x): return 0",
                              "def f(x):\n    return sum(x)\n", mode="opsd", task="code")
    assert _order(opsd, PROBLEM, REFERENCE, ATTEMPT, INSTRUCTIONS)
    assert f"{REFERENCE}\n```python\ndef f(x):\n    return sum(x)\n```\n\n{ATTEMPT}" in opsd
    assert CODE_ANSWER_INSTRUCTION not in opsd  # stripped from x: the instructions say it once
    fenced = refine_prompt_text("p", "a", "```python\nprint(1)\n```", mode="opsd", task="code")
    assert fenced.count("```python\nprint(1)") == 1  # an already fenced reference is not wrapped twice


@pytest.mark.parametrize("x", [
    "What is 2+2? Please reason step by step, and put your final answer within \\boxed{}.",
    "What is 2+2?\nLet's think step by step and output the final answer within $\\boxed{}$.  \n",
    "What is 2+2?",
])
def test_strip_answer_instruction(x):
    assert strip_answer_instruction(x) == "What is 2+2?"


def test_vanilla_teacher_context(tok):
    assert vanilla_teacher_context(BOXED_X, "REF", mode="opd", task="math") == [{"role": "user", "content": BOXED_X}]
    assert vanilla_teacher_context(BOXED_X, None, mode="opd", task="math", tokenizer=tok) == tok.encode_prompt(
        BOXED_X, "chat")  # OPD: the teacher sees exactly the student's prompt
    [m] = vanilla_teacher_context(BOXED_X, "2+2 = 4.", mode="opsd", task="math")
    assert _order(m["content"], PROBLEM, "What is 2+2?", REFERENCE, "2+2 = 4.", "your own approach")
    assert m["content"].count(MATH_ANSWER_INSTRUCTION) == 1 and m["content"].endswith(MATH_ANSWER_INSTRUCTION)
    [c] = vanilla_teacher_context("Sum.", "return 1", mode="opsd", task="code")
    assert "```python\nreturn 1\n```" in c["content"] and c["content"].endswith(CODE_ANSWER_INSTRUCTION)
    with pytest.raises(ValueError, match="reference"):
        vanilla_teacher_context("x", None, mode="opsd", task="math")
    with pytest.raises(ValueError, match="task="):
        vanilla_teacher_context("x", None, mode="opd", task="poetry")


# ---- refine prompts and budgets ----------------------------------------------------------------


def test_build_renders_chat_template(tok):
    cfg = RefineConfig(mode="opsd")
    p = build_refine_prompts(tok, [BOXED_X, "1+1?"], ["5", "2"], ["4", "2"], cfg)
    assert p.ids[0] == tok.encode_prompt(refine_prompt_text(BOXED_X, "5", "4", mode="opsd", task="math"), "chat")
    assert tok.decode(p.ids[1]).startswith("<|im_start|>user\n") and tok.decode(p.ids[1]).endswith("assistant\n")
    assert p.status == ("ok", "ok") and p.counts == {"ok": 2, "truncated": 0, "dropped": 0, "fallback": 0,
                                                     "skipped": 0}
    assert p.generate_rows == (0, 1) and p.full_lengths == tuple(len(i) for i in p.ids)
    plain = build_refine_prompts(tok, ["1+1?"], ["2"], None, RefineConfig(prompt_mode="plain"))
    assert plain.ids[0] == tok.encode(refine_prompt_text("1+1?", "2", mode="opd", task="math"))


def _budget_between(tok, cfg):
    short, long_ = build_refine_prompts(tok, ["1+1?", "1+1?"], ["2", LONG_ATTEMPT], None, cfg).full_lengths
    return (short + long_) // 2


@pytest.mark.parametrize("policy,status", [("drop", "dropped"), ("fallback", "fallback")])
def test_over_budget_drop_and_fallback(tok, policy, status):
    cfg = RefineConfig(prompt_budget=_budget_between(tok, RefineConfig()), on_prompt_over_budget=policy)
    p = build_refine_prompts(tok, ["1+1?"] * 3, ["2", LONG_ATTEMPT, "2"], None, cfg)
    assert p.status == ("ok", status, "ok") and p.ids[1] is None and p.counts[status] == 1 and p.counts["ok"] == 2
    assert p.generate_rows == (0, 2) and len(p.generate_ids) == 2 and p.full_lengths[1] > cfg.prompt_budget


def test_over_budget_error_names_row_and_lengths(tok):
    cfg = RefineConfig(prompt_budget=_budget_between(tok, RefineConfig()), on_prompt_over_budget="error")
    with pytest.raises(ValueError, match=rf"row 1: \d+ tokens > prompt_budget {cfg.prompt_budget} .*initial solution"):
        build_refine_prompts(tok, ["1+1?"] * 2, ["2", LONG_ATTEMPT], None, cfg)


def test_default_policy_drops_over_budget(tok):
    assert RefineConfig().on_prompt_over_budget == "drop"
    cfg = RefineConfig(prompt_budget=_budget_between(tok, RefineConfig()))
    assert build_refine_prompts(tok, ["1+1?"] * 2, ["2", LONG_ATTEMPT], None, cfg).counts["dropped"] == 1


def test_truncate_trims_attempt_tail_first(tok):
    x = "PROBLEMBEGIN what is 2+2 PROBLEMEND"
    full = build_refine_prompts(tok, [x], [LONG_ATTEMPT], [LONG_REF], RefineConfig(mode="opsd")).full_lengths[0]
    cfg = RefineConfig(mode="opsd", prompt_budget=full - 100, on_prompt_over_budget="truncate")
    p = build_refine_prompts(tok, [x], [LONG_ATTEMPT], [LONG_REF], cfg)
    text = tok.decode(p.ids[0])
    assert p.status == ("truncated",) and p.counts["truncated"] == 1 and p.full_lengths == (full,)
    assert len(p.ids[0]) <= cfg.prompt_budget
    assert f"{PROBLEM}\n{x}\n\n" in text and LONG_REF in text  # problem and reference intact
    assert "ATTEMPTBEGIN step" in text and "ATTEMPTEND" not in text  # the attempt lost its tail
    assert text.count(TRUNCATION_NOTICE) == 1 and f"{TRUNCATION_NOTICE}\n\n{INSTRUCTIONS}" in text


def test_truncate_then_trims_reference_tail(tok):
    x = "PROBLEMBEGIN what is 2+2 PROBLEMEND"
    cfg = RefineConfig(mode="opsd")
    no_attempt = build_refine_prompts(tok, [x], [TRUNCATION_NOTICE], [LONG_REF], cfg).full_lengths[0]
    cfg = RefineConfig(mode="opsd", prompt_budget=no_attempt - 60, on_prompt_over_budget="truncate")
    p = build_refine_prompts(tok, [x], [LONG_ATTEMPT], [LONG_REF], cfg)
    text = tok.decode(p.ids[0])
    assert len(p.ids[0]) <= cfg.prompt_budget and f"{PROBLEM}\n{x}\n\n" in text
    assert "ATTEMPTBEGIN" not in text and f"{ATTEMPT}\n{TRUNCATION_NOTICE}\n\n" in text
    assert "REFBEGIN ref" in text and "REFEND" not in text and text.count(TRUNCATION_NOTICE) == 2


def test_truncate_code_reference_keeps_fence_closed(tok):
    cfg = RefineConfig(mode="opsd", task="code")
    code = "def f():\n" + "    x = 1\n" * 150 + "    return ENDMARK\n"
    no_attempt = build_refine_prompts(tok, ["p"], [TRUNCATION_NOTICE], [code], cfg).full_lengths[0]
    cfg = dataclasses.replace(cfg, prompt_budget=no_attempt - 60, on_prompt_over_budget="truncate")
    text = tok.decode(build_refine_prompts(tok, ["p"], ["a"], [code], cfg).ids[0])
    assert "ENDMARK" not in text and f"{TRUNCATION_NOTICE}\n```\n\n{ATTEMPT}" in text


def test_truncate_cannot_shrink_problem(tok):
    short = build_refine_prompts(tok, ["1+1?"], ["2"], None, RefineConfig()).full_lengths[0]
    cfg = RefineConfig(prompt_budget=short + 20, on_prompt_over_budget="truncate")
    with pytest.raises(ValueError, match="row 1: cannot truncate .* the problem and template alone need"):
        build_refine_prompts(tok, ["1+1?", "1+1? " * 50], ["2", LONG_ATTEMPT], None, cfg)


def test_build_input_errors(tok):
    with pytest.raises(ValueError, match=r"references\[1\]"):
        build_refine_prompts(tok, ["a", "b"], ["c", "d"], ["ref", None], RefineConfig(mode="opsd"))
    with pytest.raises(ValueError, match="attempts: 1 rows, expected 2"):
        build_refine_prompts(tok, ["a", "b"], ["c"], None, RefineConfig())
    with pytest.raises(ValueError, match="references: 1 rows"):
        build_refine_prompts(tok, ["a", "b"], ["c", "d"], ["r"], RefineConfig(mode="opsd"))


# ---- rewrites ----------------------------------------------------------------------------------


def _rows(tok, budget):
    """ok, EOS-only, whitespace-only, capped (budget tokens, no EOS), EOS exactly at the budget."""
    eos, alt = tok.eos_ids
    word = tok.encode("step")
    assert len(word) == 1
    return [word * 3 + [eos], [alt], tok.encode(" \n ") + [eos], word * budget, word * (budget - 1) + [eos]]


def test_validate_defaults_error_on_empty(tok):
    cfg = RefineConfig(rewrite_budget=8)
    with pytest.raises(ValueError, match=r"rewrite row 1: empty .*on_empty_rewrite='error'"):
        validate_rewrites(_rows(tok, 8), tok.eos_ids, cfg)


@pytest.mark.parametrize("empty", ["drop", "fallback"])
@pytest.mark.parametrize("capped", ["keep", "drop", "fallback"])
def test_validate_policies_and_counts(tok, empty, capped):
    cfg = RefineConfig(rewrite_budget=8, on_empty_rewrite=empty, on_capped_rewrite=capped)
    v = validate_rewrites(_rows(tok, 8), tok.eos_ids, cfg, tokenizer=tok)
    assert v.reasons == ("ok", "empty", "empty", "capped", "ok")
    assert v.actions == ("keep", empty, empty, capped, "keep") and v.lengths == (4, 1, len(_rows(tok, 8)[2]), 8, 8)
    expected = {"ok": 2, "empty": 2, "capped": 1, "prompt_over_budget": 0, "not_sent": 0, "keep": 2, "fallback": 0,
                "drop": 0}
    for a in (empty, empty, capped):
        expected[a] += 1
    assert v.counts == expected and sum(v.counts[a] for a in ("keep", "fallback", "drop")) == 5
    assert v.kept.tolist() == [a != "drop" for a in v.actions]


def test_validate_whitespace_needs_tokenizer(tok):
    cfg = RefineConfig(rewrite_budget=8, on_empty_rewrite="drop")
    assert validate_rewrites(_rows(tok, 8), tok.eos_ids, cfg).reasons[2] == "ok"  # not decoded: not empty


def test_validate_capped_error(tok):
    cfg = RefineConfig(rewrite_budget=8, on_empty_rewrite="drop", on_capped_rewrite="error")
    with pytest.raises(ValueError, match=r"rewrite row 3: capped \(8 tokens.*on_capped_rewrite='error'"):
        validate_rewrites(_rows(tok, 8), tok.eos_ids, cfg)


def test_validate_array_inputs_match_lists(tok):
    cfg = RefineConfig(rewrite_budget=8, on_empty_rewrite="drop")
    rows = _rows(tok, 8)
    tokens = np.full((len(rows), 8), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    expected = validate_rewrites(rows, tok.eos_ids, cfg)
    assert validate_rewrites((tokens, lengths), tok.eos_ids, cfg) == expected
    out = SampleOutput(tokens, np.zeros(tokens.shape, np.float32), lengths)
    assert validate_rewrites(out, tok.eos_ids, cfg) == expected


@pytest.mark.parametrize("row,match", [
    ([5] * 9, "9 tokens > rewrite_budget 8"),
    ([5] * 3, "without EOS.*aborted"),
    ([5, "eos", 5, "eos"], "EOS before the end"),
])
def test_validate_inconsistent_rows_raise(tok, row, match):
    row = [tok.eos_id if t == "eos" else t for t in row]
    with pytest.raises(ValueError, match=rf"rewrite row 1: .*{match}"):
        validate_rewrites([[5, tok.eos_id], row], tok.eos_ids, RefineConfig(rewrite_budget=8))


@pytest.mark.parametrize("prompt_policy,action", [("drop", "drop"), ("fallback", "fallback")])
def test_validate_with_prompts_covers_whole_batch(tok, prompt_policy, action):
    cfg = RefineConfig(prompt_budget=_budget_between(tok, RefineConfig()), rewrite_budget=8,
                       on_prompt_over_budget=prompt_policy, on_empty_rewrite="drop")
    p = build_refine_prompts(tok, ["1+1?"] * 3, ["2", LONG_ATTEMPT, "2"], None, cfg)
    eos = tok.eos_id
    v = validate_rewrites([[5, eos], [eos]], tok.eos_ids, cfg, prompts=p)  # rewrites of rows 0 and 2
    assert v.reasons == ("ok", "prompt_over_budget", "empty") and v.actions == ("keep", action, "drop")
    assert v.rewrite_index == (0, -1, 1) and v.counts["prompt_over_budget"] == 1 and v.counts["drop"] == (
        2 if action == "drop" else 1)
    with pytest.raises(ValueError, match="rewrites: 3 rows, expected 2"):
        validate_rewrites([[5, eos]] * 3, tok.eos_ids, cfg, prompts=p)


def test_rows_not_sent_are_skipped_and_train_on_y_o(tok):
    cfg = RefineConfig(rewrite_budget=8, rows="wrong")
    p = build_refine_prompts(tok, ["1+1?"] * 3, ["3", "2", "4"], None, cfg, send=[True, False, True])
    assert p.status == ("ok", "skipped", "ok") and p.ids[1] is None and p.full_lengths[1] == 0
    assert p.generate_rows == (0, 2) and p.counts["skipped"] == 1 and p.counts["ok"] == 2
    eos = tok.eos_id
    y_r = [[5, eos], [6, eos]]
    v = validate_rewrites(y_r, tok.eos_ids, cfg, prompts=p)
    assert v.reasons == ("ok", "not_sent", "ok") and v.actions == ("keep", "fallback", "keep")
    assert v.rewrite_index == (0, -1, 1) and v.counts["not_sent"] == 1 and v.counts["fallback"] == 1
    sel = select_trajectories([[10, eos], [11, eos], [12, eos]], y_r, v)
    assert sel.rows == [[5, eos], [11, eos], [6, eos]] and sel.sources == ("y_r", "y_o", "y_r")
    with pytest.raises(ValueError, match="send: 2 rows, expected 3"):
        build_refine_prompts(tok, ["1+1?"] * 3, ["3", "2", "4"], None, cfg, send=[True, False])


# ---- selection ---------------------------------------------------------------------------------


def test_select_trajectories_sources_and_no_mutation(tok):
    eos = tok.eos_id
    cfg = RefineConfig(rewrite_budget=4, on_empty_rewrite="fallback", on_capped_rewrite="drop")
    y_o = [[10, eos], [11, eos], [12, eos], [13, 13, eos]]
    y_r = [[20, 21, eos], [eos], [22, 22, 22, 22], [23, eos]]  # ok, empty, capped, ok
    before_o, before_r = copy.deepcopy(y_o), copy.deepcopy(y_r)
    v = validate_rewrites(y_r, tok.eos_ids, cfg)
    sel = select_trajectories(y_o, y_r, v)
    rows, sources, kept = sel
    assert rows == [[20, 21, eos], [11, eos], [23, eos]] and sources == ("y_r", "y_o", "y_r")
    assert kept.tolist() == [True, True, False, True] and np.flatnonzero(kept).tolist() == [0, 1, 3]
    rows[0].append(99)
    rows[1].append(99)
    assert y_o == before_o and y_r == before_r  # copies: inputs never change


def test_select_trajectories_with_prompt_fallback_and_arrays(tok):
    eos = tok.eos_id
    cfg = RefineConfig(prompt_budget=_budget_between(tok, RefineConfig()), rewrite_budget=4,
                       on_prompt_over_budget="fallback")
    p = build_refine_prompts(tok, ["1+1?"] * 2, [LONG_ATTEMPT, "2"], None, cfg)
    y_r = (np.array([[30, eos, 0]], np.int32), np.array([2], np.int32))  # the rewrite of row 1 only
    y_o = (np.array([[40, 41, eos], [42, eos, 0]], np.int32), np.array([3, 2]))
    sel = select_trajectories(y_o, y_r, validate_rewrites(y_r, tok.eos_ids, cfg, prompts=p))
    assert sel.rows == [[40, 41, eos], [30, eos]] and sel.sources == ("y_o", "y_r") and sel.kept.all()


def test_select_trajectories_checks_shapes(tok):
    eos = tok.eos_id
    v = validate_rewrites([[11, eos], [12, eos]], tok.eos_ids, RefineConfig(rewrite_budget=4))
    with pytest.raises(ValueError, match="y_o: 1 rows, expected 2"):
        select_trajectories([[11]], [[11, eos], [12, eos]], v)
    with pytest.raises(ValueError, match="y_r: 1 rows, expected 2"):
        select_trajectories([[11], [12]], [[11, eos]], v)
    with pytest.raises(ValueError, match="y_r row 1: 3 tokens, but 2 were validated"):
        select_trajectories([[11], [12]], [[11, eos], [12, 12, eos]], v)


# ---- config ------------------------------------------------------------------------------------


def test_config_defaults():
    cfg = RefineConfig()
    assert (cfg.mode, cfg.task, cfg.prompt_mode) == ("opd", "math", "chat")
    assert (cfg.on_prompt_over_budget, cfg.on_empty_rewrite, cfg.on_capped_rewrite) == ("drop", "error", "keep")
    assert (cfg.rows, cfg.on_wrong_rewrite) == ("all", "keep")  # [code-trd]: every row refined, no filter


@pytest.mark.parametrize("field,value", [
    ("mode", "rl"), ("task", "poetry"), ("prompt_mode", "raw"), ("prompt_budget", 0), ("rewrite_budget", -1),
    ("rewrite_budget", 1.5), ("truncation_margin", -1), ("on_prompt_over_budget", "keep"),
    ("on_empty_rewrite", "keep"), ("on_capped_rewrite", "truncate"), ("rows", "right"),
    ("on_wrong_rewrite", "error"),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=rf"RefineConfig\.{field}="):
        RefineConfig(**{field: value})
