"""A small word-level tokenizer for the synthetic tasks, saved as a Hugging Face folder (tokenizer.json
+ tokenizer_config.json with a chat template) so that it loads like any real one.

Pieces are words and single digits, each optionally with one leading space, single punctuation marks
and single whitespace characters; decoding concatenates them. So decode(encode(text)) == text for text
made of known pieces, and encode(decode(ids)) == ids: a decoded rollout re-encodes to the same ids inside
a refine prompt. Unknown pieces become [UNK].
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterable

SPECIALS = ("<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "[UNK]")
PAD, EOS, UNK = "<|pad|>", "<|end|>", "[UNK]"
PATTERN = r" ?\\boxed\{| ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\s"
# One message per turn; the response starts after "<|assistant|>\n" and ends with <|end|> (the EOS).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(PATTERN), behavior="isolated")


def vocabulary(corpus: Iterable[str]) -> list[str]:
    """Special tokens, every printable ASCII character with and without a leading space, digits, and the
    pieces of ``corpus`` in first-seen order."""
    pre = _pre_tokenizer()
    pieces = dict.fromkeys(SPECIALS)
    for c in string.printable.strip():
        pieces.setdefault(c)
        pieces.setdefault(" " + c)
    for c in "\n\t ":
        pieces.setdefault(c)
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            pieces.setdefault(piece)
    return list(pieces)


def save_tokenizer(directory: str, corpus: Iterable[str], *, model_max_length: int = 4096) -> str:
    """Writes the tokenizer folder atomically (a temporary folder renamed into place); returns its path."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {piece: i for i, piece in enumerate(vocabulary(corpus))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "bos_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-tokenizer-")
    try:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
