"""Tests for trd_jax.tokenization on tiny tokenizers built and saved here (offline, no hub)."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trd_jax.tokenization import Tokenizer

# Qwen3-style template, written for these tests: `enable_thinking=False` adds an empty think block.
QWEN3_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
# A template that writes the BOS itself (Llama-3 style), to check chat modes do not add a second.
BOS_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is 2+2? The answer is 4.",
    "Be brief. The quick brown fox jumps over the lazy dog.",
    "user assistant system think",
]


def _save(path, fast: PreTrainedTokenizerFast, generation_config: dict | None = None) -> str:
    fast.save_pretrained(path)
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return str(path)


def _word_level(**special) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<|endoftext|>", "user", ":", "hello", "world"])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **special)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Byte-level BPE, Qwen3 chat template, pad token, no BOS; generation_config eos is a list."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN3_TEMPLATE
    )
    im_end, endoftext = raw.token_to_id("<|im_end|>"), raw.token_to_id("<|endoftext|>")
    # im_end repeats the tokenizer's own EOS: it must appear once.
    return _save(tmp_path_factory.mktemp("qwen"), fast, {"eos_token_id": [im_end, endoftext, im_end]})


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return Tokenizer.from_dir(qwen_dir)


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """WordLevel with BOS, no pad, no chat template, an added token; generation_config eos is an int."""
    fast = _word_level(bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    return Tokenizer.from_dir(_save(tmp_path_factory.mktemp("bos"), fast, {"eos_token_id": 3}))


@pytest.fixture(scope="module")
def bos_chat_tok(tmp_path_factory):
    """WordLevel with BOS and a template that writes it; no generation_config.json."""
    fast = _word_level(bos_token="<s>", eos_token="</s>", chat_template=BOS_TEMPLATE)
    return Tokenizer.from_dir(_save(tmp_path_factory.mktemp("bos_chat"), fast))


# ---- rendering -------------------------------------------------------------------------------


def test_render_plain_is_raw_text(qwen):
    assert qwen.render_prompt("What is 2+2?", "plain") == "What is 2+2?"


def test_render_chat_disables_thinking(qwen):
    assert qwen.render_prompt("What is 2+2?", "chat") == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_render_thinking(qwen):
    assert qwen.render_prompt("What is 2+2?", "thinking") == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_system_message(qwen):
    assert qwen.render_prompt("What is 2+2?", "thinking", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_message_list(qwen):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Be brief."},
    ]
    assert qwen.render_prompt(messages, "chat") == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nBe brief.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert len(messages) == 3  # the caller's list is not modified by system=
    qwen.render_prompt(messages, "chat", system="s")
    assert len(messages) == 3


# ---- prompt / response ids -------------------------------------------------------------------


def test_encode_prompt_chat_ids(qwen):
    start, end = qwen.encode("<|im_start|>"), qwen.encode("<|im_end|>")
    assert len(start) == len(end) == 1  # special tokens in template text become single ids
    # The specials split the text, so the ids are the concatenation of the pieces' ids.
    expected = start + qwen.encode("user\nWhat is 2+2?") + end + qwen.encode("\n") + start + qwen.encode("assistant\n")
    assert qwen.encode_prompt("What is 2+2?", "thinking") == expected
    assert qwen.encode_prompt("What is 2+2?", "chat") == expected + qwen.encode("<think>\n\n</think>\n\n")


def test_encode_prompt_plain_without_bos(qwen):
    assert qwen.bos_id is None
    assert qwen.encode_prompt("What is 2+2?", "plain") == qwen.encode("What is 2+2?")


def test_encode_prompt_plain_adds_bos_once(bos_tok):
    assert bos_tok.bos_id == 1
    assert bos_tok.encode_prompt("hello world", "plain") == [1, 6, 7]
    assert bos_tok.encode_prompt("<s> hello world", "plain") == [1, 6, 7]


def test_encode_prompt_chat_does_not_double_bos(bos_chat_tok):
    assert bos_chat_tok.render_prompt("hello", "chat") == "<s>user: hello\n"
    assert bos_chat_tok.encode_prompt("hello", "chat") == [1, 4, 5, 6]
    assert bos_chat_tok.encode_prompt("hello", "plain") == [1, 6]


def test_encode_response(qwen):
    text = "The answer is 4."
    ids = qwen.encode_response(text)
    assert ids == qwen.encode(text)
    assert qwen.encode_response(text, append_eos=True) == ids + [qwen.encode("<|im_end|>")[0]]
    assert qwen.decode(ids) == text


def test_prompt_and_response_ids_concatenate(qwen):
    response = "own fox"
    r_ids = qwen.encode_response(response, append_eos=True)
    assert r_ids == qwen.encode("own fox") + [qwen.eos_id]
    for prompt, mode in [("What is 2+2?", "chat"), ("What is 2+2?", "thinking"), ("The quick br", "plain")]:
        full = qwen.encode_prompt(prompt, mode) + qwen.encode_response(response, append_eos=True)
        assert full[-len(r_ids) :] == r_ids  # the same response ids whatever the prompt
        assert qwen.decode(full) == qwen.render_prompt(prompt, mode) + response + "<|im_end|>"
    # Why separately: tokenizing prompt + response as one text merges "br" + "own" into "brown",
    # so the response's ids would depend on its prompt.
    joint = qwen.encode("The quick br" + response)
    assert joint != qwen.encode_prompt("The quick br", "plain") + qwen.encode_response(response)
    assert joint[-3:] != r_ids[:-1]


# ---- special ids -----------------------------------------------------------------------------


def test_eos_and_pad_from_list_generation_config(qwen):
    im_end, endoftext = qwen.encode("<|im_end|>")[0], qwen.encode("<|endoftext|>")[0]
    assert qwen.eos_ids == (im_end, endoftext)  # tokenizer EOS first, duplicates dropped
    assert qwen.eos_id == im_end
    assert qwen.pad_id == endoftext  # the pad token, not an EOS


def test_eos_and_pad_from_int_generation_config(bos_tok):
    assert bos_tok.eos_ids == (2, 3)
    assert bos_tok.pad_id == 2  # no pad token: the first EOS


def test_eos_without_generation_config(bos_chat_tok):
    assert bos_chat_tok.eos_ids == (2,)
    assert bos_chat_tok.pad_id == 2


def test_eos_only_from_generation_config(tmp_path):
    tok = Tokenizer.from_dir(_save(tmp_path, _word_level(), {"eos_token_id": [3, 2]}))
    assert (tok.eos_ids, tok.pad_id, tok.bos_id) == ((3, 2), 3, None)


def test_no_eos_anywhere_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no EOS"):
        Tokenizer.from_dir(_save(tmp_path, _word_level(), {"eos_token_id": None}))


def test_bad_generation_config_eos(tmp_path):
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list of ints"):
        Tokenizer.from_dir(_save(tmp_path, _word_level(eos_token="</s>"), {"eos_token_id": "</s>"}))


def test_vocab_size_counts_added_tokens(bos_tok):
    assert bos_tok.hf.vocab_size == 8
    assert bos_tok.vocab_size == 9
    assert bos_tok.encode("<extra>") == [8]


# ---- encode / decode -------------------------------------------------------------------------


def test_decode_round_trip(qwen):
    text = "Héllo wörld 🙂\n\tWhat is 2+2?"
    ids = qwen.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert qwen.decode(ids) == text
    assert qwen.decode(np.asarray(ids, dtype=np.int32)) == text


def test_decode_skip_special_tokens(qwen):
    ids = qwen.encode("<|im_start|>user\nhi<|im_end|>")
    assert qwen.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert qwen.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_encode_add_special_tokens_is_off_by_default(bos_tok):
    assert bos_tok.encode("hello") == [6]


# ---- errors ----------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist") as e:
        Tokenizer.from_dir(missing)
    assert missing in str(e.value)


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer files") as e:
        Tokenizer.from_dir(str(tmp_path))
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_chat_modes_need_a_template(bos_tok, mode):
    with pytest.raises(ValueError, match=f"prompt mode '{mode}' needs a chat template"):
        bos_tok.render_prompt("hello", mode)


def test_unknown_mode(qwen):
    with pytest.raises(ValueError, match="unknown prompt mode 'instruct'; valid modes: plain, chat, thinking"):
        qwen.encode_prompt("hi", "instruct")


def test_messages_in_plain_mode(qwen):
    with pytest.raises(ValueError, match="'plain' takes a str prompt"):
        qwen.render_prompt([{"role": "user", "content": "hi"}], "plain")


def test_system_in_plain_mode(qwen):
    with pytest.raises(ValueError, match="'plain' has no system message"):
        qwen.render_prompt("hi", "plain", system="Be brief.")


def test_system_twice(qwen):
    with pytest.raises(ValueError, match="already contain a system message"):
        qwen.render_prompt([{"role": "system", "content": "a"}, {"role": "user", "content": "hi"}], "chat", system="b")
