"""Tokenizer wrapper for prompts and responses, loaded offline from a local Hugging Face folder.

Prompts and responses are tokenized separately and concatenated as ids: ``encode_prompt(p) +
encode_response(r)``. A response's ids therefore never depend on its prompt (no BPE merge across
the boundary), so a student and a teacher that share a tokenizer but render different prompts
score exactly the same response ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

from trd_jax.json_files import read_json_object

if TYPE_CHECKING:  # transformers is imported on first load: importing this module stays cheap
    from transformers import PreTrainedTokenizerBase

PromptMode = Literal["plain", "chat", "thinking"]
PROMPT_MODES: tuple[str, ...] = get_args(PromptMode)

Message = dict[str, str]

# Any one of these marks a folder as holding a tokenizer. Checked up front because AutoTokenizer
# on an empty folder fails with an error about sentencepiece/tiktoken that does not name the path.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def eos_from_generation_config(path: str) -> list[int]:
    """The ``eos_token_id`` (int, list of ints, or absent/null) of ``path/generation_config.json``."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return []
    eos = read_json_object(file).get("eos_token_id")
    if eos is None:
        return []
    ids = [eos] if isinstance(eos, int) else list(eos)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{file}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids


class Tokenizer:
    """A Hugging Face tokenizer plus the EOS/pad/BOS ids and prompt rendering rollouts need.

    Build it with :meth:`from_dir`. All ids are plain Python ints; sequences are 1-D ``list[int]``.
    """

    def __init__(self, hf: PreTrainedTokenizerBase, *, extra_eos_ids: Sequence[int] = (), path: str = "?"):
        self.hf = hf
        self.path = path
        eos = ([hf.eos_token_id] if hf.eos_token_id is not None else []) + [int(i) for i in extra_eos_ids]
        # dict.fromkeys: de-duplicate, keeping first-seen order (the tokenizer's own EOS first).
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        if not self.eos_ids:
            raise ValueError(f"tokenizer at {path!r} defines no EOS token (tokenizer or generation_config.json)")
        self.bos_id: int | None = hf.bos_token_id
        self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """Load from a local folder (never the hub); EOS ids also come from its generation_config.json."""
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer folder {path!r} does not exist")
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise ValueError(f"no tokenizer files in {path!r} (looked for {', '.join(TOKENIZER_FILES)})")
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e
        return cls(hf, extra_eos_ids=eos_from_generation_config(path), path=path)

    def id_table(self) -> list[str]:
        """The string of every id, added tokens included (index = id; "" for an id the tokenizer leaves unused)."""
        table = [""] * self.vocab_size
        for token, i in self.hf.get_vocab().items():
            if 0 <= i < len(table):
                table[i] = token
        return table

    def mapping_identity(self) -> dict:
        """Everything that decides how text maps to ids and back, beyond the id table: the special ids and the
        fast backend's normalizer, pre-tokenizer, model (merges included) and decoder (tokenizer.json)."""
        backend = {}
        if getattr(self.hf, "backend_tokenizer", None) is not None:
            spec = json.loads(self.hf.backend_tokenizer.to_str())
            backend = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "decoder")}
        return {"eos_ids": list(self.eos_ids), "bos_id": self.bos_id, "pad_id": self.pad_id,
                "special_ids": sorted(self.hf.all_special_ids), "backend": backend}

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)``, not HF's base ``vocab_size``)."""
        return len(self.hf)

    @property
    def eos_id(self) -> int:
        """The EOS appended to responses: the tokenizer's own EOS, else generation_config's first."""
        return self.eos_ids[0]

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """``text`` -> ids ``[n]``; special tokens written in the text are parsed as such."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """ids ``[n]`` (list, or 1-D numpy/JAX array) -> text."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_prompt(self, prompt: str | list[Message], mode: PromptMode, *, system: str | None = None) -> str:
        """The prompt as the model sees it, ending where the response starts.

        - ``plain``: ``prompt`` itself (must be a str; ``system`` is not allowed).
        - ``chat``: the chat template with the generation prompt and ``enable_thinking=False``
          (Qwen3 then emits an empty think block; templates without the switch ignore it).
        - ``thinking``: the chat template with ``enable_thinking=True``.

        A str prompt becomes one user message; ``system`` becomes a leading system message.
        """
        if mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {mode!r}; valid modes: {', '.join(PROMPT_MODES)}")
        if mode == "plain":
            if not isinstance(prompt, str):
                raise ValueError("prompt mode 'plain' takes a str prompt, not a list of messages")
            if system is not None:
                raise ValueError("prompt mode 'plain' has no system message; use 'chat' or 'thinking'")
            return prompt
        if not self.has_chat_template:
            raise ValueError(f"prompt mode {mode!r} needs a chat template, but the tokenizer at {self.path!r} has none")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            if any(m.get("role") == "system" for m in messages):
                raise ValueError("system= given but the messages already contain a system message")
            messages.insert(0, {"role": "system", "content": system})
        # tokenize=False: transformers 5 otherwise returns a BatchEncoding (return_dict defaults to True).
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=mode == "thinking"
        )
        assert isinstance(text, str), type(text)
        return text

    def encode_prompt(self, prompt: str | list[Message], mode: PromptMode, *, system: str | None = None) -> list[int]:
        """Ids ``[n]`` of :meth:`render_prompt`.

        Plain mode starts with the BOS when the tokenizer has one. It is prepended by hand: many
        tokenizers define a BOS their post-processor never adds, and ``add_special_tokens=True``
        could also append an EOS. Chat modes take special tokens only from the template text, so a
        template that writes the BOS itself does not get a second one.
        """
        ids = self.encode(self.render_prompt(prompt, mode, system=system))
        if mode == "plain" and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def encode_response(self, text: str, *, append_eos: bool = False) -> list[int]:
        """Ids ``[n]`` (``[n + 1]`` with ``append_eos``) of a response, tokenized on its own."""
        ids = self.encode(text)
        return ids + [self.eos_id] if append_eos else ids


def tokenizer_mismatch(a: Tokenizer, b: Tokenizer) -> str | None:
    """None when `a` and `b` map text to the same ids and ids to the same strings; otherwise what differs
    first, in words (the first differing id and its strings, else the differing special ids or backend part)."""
    ta, tb = a.id_table(), b.id_table()
    for i in range(min(len(ta), len(tb))):
        if ta[i] != tb[i]:
            return f"id {i} is {ta[i]!r} in {a.path} but {tb[i]!r} in {b.path}"
    if len(ta) != len(tb):
        return f"{a.path} has {len(ta)} ids, {b.path} {len(tb)}"
    ia, ib = a.mapping_identity(), b.mapping_identity()
    for key in ("eos_ids", "bos_id", "pad_id", "special_ids"):
        if ia[key] != ib[key]:
            return f"{key} {ia[key]} in {a.path} but {ib[key]} in {b.path}"
    for key, value in ia["backend"].items():
        if value != ib["backend"].get(key):
            return f"the tokenizer.json {key} differs between {a.path} and {b.path}"
    return None
