"""Convert a Llama-architecture GGUF file (llama.cpp) into a Hugging Face model folder.

Output: config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json (with the chat template). Weights are dequantized with the `gguf` package and
byte-level BPE vocabularies (SmolLM2, GPT-2 style) are rebuilt with `tokenizers`: no torch needed.
Other vocabularies go through transformers' GGUF tokenizer loader, which does import torch.
"""

from __future__ import annotations

import json
import os

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

# llama.cpp per-layer tensor name -> HF Llama name (both without the ".weight" suffix).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    HF stores each head's rows as [first rotary half; second half]; llama.cpp's convert script
    interleaves them (row 2i <- i, row 2i+1 <- i + d/2) for its adjacent-pair RoPE.
    """
    out_dim = w.shape[0]
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def read_llama_gguf(gguf_path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, {HF tensor name: float32 array}) for a Llama GGUF file."""
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # bad magic, truncated file, ...
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from e

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: unsupported GGUF architecture {arch!r} (only 'llama')")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{gguf_path}: unsupported rope scaling {scaling!r}")

    def need(key):
        v = _field(reader, key)
        if v is None:
            raise ValueError(f"{gguf_path}: missing GGUF metadata key {key!r}")
        return v

    hidden = need("llama.embedding_length")
    n_head = need("llama.attention.head_count")
    n_kv = _field(reader, "llama.attention.head_count_kv", n_head)
    head_dim = _field(reader, "llama.attention.key_length", hidden // n_head)
    n_layers = need("llama.block_count")
    vocab = _field(reader, "llama.vocab_size") or len(need("tokenizer.ggml.tokens"))
    inter = need("llama.feed_forward_length")

    src = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in src
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": need("llama.context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "dtype": "float32",
    }

    # gguf name -> (hf name, expected numpy shape (out, in), heads to unpermute or None)
    q_out, kv_out = n_head * head_dim, n_kv * head_dim
    plan = {"token_embd.weight": ("model.embed_tokens.weight", (vocab, hidden), None),
            "output_norm.weight": ("model.norm.weight", (hidden,), None)}
    if not tied:
        plan["output.weight"] = ("lm_head.weight", (vocab, hidden), None)
    for i in range(n_layers):
        shapes = {"attn_q": ((q_out, hidden), n_head), "attn_k": ((kv_out, hidden), n_kv),
                  "attn_v": ((kv_out, hidden), None), "attn_output": ((hidden, q_out), None),
                  "ffn_gate": ((inter, hidden), None), "ffn_up": ((inter, hidden), None),
                  "ffn_down": ((hidden, inter), None), "attn_norm": ((hidden,), None),
                  "ffn_norm": ((hidden,), None)}
        for g, (shape, heads) in shapes.items():
            plan[f"blk.{i}.{g}.weight"] = (f"model.layers.{i}.{_LAYER_NAMES[g]}.weight", shape, heads)

    missing = [n for n in plan if n not in src]
    if missing:
        raise ValueError(f"{gguf_path}: missing tensor(s) {missing[:5]}")
    extra = sorted(set(src) - set(plan))
    if extra:  # e.g. rope_freqs (Llama 3.1 scaling) or biases: refuse rather than drop silently
        raise ValueError(f"{gguf_path}: unsupported tensor(s) {extra[:5]}")

    tensors = {}
    for g, (hf, shape, heads) in plan.items():
        t = src[g]
        # GGUF lists dims fastest-first ([in, out]); numpy/HF order is the reverse.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if w.shape != shape:
            raise ValueError(f"{gguf_path}: tensor {g} has shape {w.shape}, expected {shape}")
        if heads is not None:
            w = unpermute_rotary(w, heads)
        tensors[hf] = np.ascontiguousarray(w)
    return config, tensors


# llama.cpp pre-tokenizer types (tokenizer.ggml.pre) that split off every digit, then apply GPT-2's
# regex (llama-vocab.cpp). transformers' GGUF tokenizer (5.x) drops the digit split for these, so e.g.
# "and  42" would tokenize differently from llama.cpp.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _bpe_tokenizer(reader: GGUFReader, max_len: int):
    """Byte-level BPE tokenizer from GGUF metadata, built with `tokenizers` only (no torch)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    special = {name: tokens[i] for name, key in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                                ("pad_token", "padding")]
               if (i := _field(reader, f"tokenizer.ggml.{key}_token_id")) is not None}
    # transformers builds the post-processor (BOS/EOS insertion) from add_bos_token/add_eos_token.
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len,
                                   add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                                   add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
                                   chat_template=_field(reader, "tokenizer.chat_template"), **special)


def _save_tokenizer(gguf_path: str, out_dir: str, max_len: int) -> None:
    reader = GGUFReader(gguf_path)
    if not _field(reader, "tokenizer.chat_template"):
        raise ValueError(f"{gguf_path}: no tokenizer.chat_template in the GGUF metadata")
    bpe = _field(reader, "tokenizer.ggml.model") == "gpt2"
    if bpe and _field(reader, "tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE | {"gpt2"}:
        tok = _bpe_tokenizer(reader, max_len)
    else:  # e.g. sentencepiece ("llama") vocabularies: transformers' builder (its GGUF reader imports torch)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                            gguf_file=os.path.basename(gguf_path), local_files_only=True)
        tok.model_max_length = max_len
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tok.save_pretrained(out_dir, save_jinja_files=False)
    # Drop load-time kwargs that from_pretrained recorded (they would leak into later loads).
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k in ("is_local", "local_files_only", "name_or_path", "gguf_file", "vocab_file"):
        cfg.pop(k, None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """Write an HF Llama folder (float32) converted from `gguf_path` into `out_dir`; returns out_dir."""
    from safetensors.numpy import save_file

    config, tensors = read_llama_gguf(gguf_path)
    os.makedirs(out_dir, exist_ok=True)

    def dump(name, obj):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)

    dump("config.json", config)
    dump("generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    _save_tokenizer(gguf_path, out_dir, config["max_position_embeddings"])
    # Weights last and atomically: a present model.safetensors means a finished conversion.
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only (0600)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    return out_dir
