"""Model hyperparameters for the Llama / Qwen2 / Qwen3 decoder family, and their mapping to and from
Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from trd_jax.json_files import read_json_object

# Architectures the single decoder in transformer.py covers, with the switches that tell them apart.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": dict(model_type="llama", qkv_bias=False, qk_norm=False),
    "MistralForCausalLM": dict(model_type="mistral", qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(model_type="qwen2", qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(model_type="qwen3", qkv_bias=False, qk_norm=True),
}

DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each decoder layer in a forward without a KV cache (the training / scoring forward), for
# the backward pass: "none" keeps every activation autodiff needs; "full" keeps only each layer's input and
# recomputes the layer; "dots" also keeps the outputs of the weight matmuls
# (jax.checkpoint_policies.dots_with_no_batch_dims_saveable) and recomputes the rest, attention scores included.
REMAT = ("none", "full", "dots")
# Attention kernel of every forward over more than one query (training, scoring, prefill; decode's single query
# is always dense): "dense" materialises f32 scores [B, heads, T, S]; "blockwise" is flash attention in plain JAX
# (models/attention.py), O(T) memory per head, in tiles of attention_block queries x attention_block keys; "fused"
# is jax.nn.dot_product_attention (cuDNN flash attention on a GPU in bf16 / fp16) for the forwards without a cache
# (update, scoring) and blockwise elsewhere (prefill; where the backend has no fused kernel).
ATTENTION = ("dense", "blockwise", "fused")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a decoder-only transformer (hashable: used as a jit static)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or None.
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    max_position_embeddings: int = 4096
    architecture: str = "LlamaForCausalLM"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # How the model is run, not what it is: never written to nor read from config.json. A jit static like the
    # other fields, so changing it compiles anew.
    remat: str = "none"  # one of REMAT
    attention: str = "dense"  # one of ATTENTION
    attention_block: int = 512  # blockwise: queries and keys per tile

    @property
    def blockwise_prefill(self) -> bool:
        """Whether a forward over several queries into a KV cache (prefill) runs blockwise attention."""
        return self.attention in ("blockwise", "fused")

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: expected one of {DTYPES}")
        if self.remat not in REMAT:
            raise ValueError(f"ModelConfig.remat={self.remat!r}: expected one of {REMAT}")
        if self.attention not in ATTENTION:
            raise ValueError(f"ModelConfig.attention={self.attention!r}: expected one of {ATTENTION}")
        if self.attention_block < 1:
            raise ValueError(f"ModelConfig.attention_block={self.attention_block} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, h, k, hd, m = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = d * hd * (h + 2 * k) + h * hd * d + (hd * (h + 2 * k) if self.qkv_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * d * m + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
        """Reads a transformers config dict; raises ValueError naming the field and `source`. `overrides`: other
        fields (dtype, param_dtype, remat, attention), which a config.json never sets."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type = {v["model_type"]: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(hf.get("model_type"))
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        flags = SUPPORTED_ARCHITECTURES[arch]

        def need(key):
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r}")
            return hf[key]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        if hf.get("sliding_window") and hf.get("use_sliding_window", arch == "MistralForCausalLM"):
            raise ValueError(f"{source}: sliding-window attention (sliding_window={hf['sliding_window']}) "
                             "is not supported")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or None
        llama3 = None
        if rope:
            rope_type = rope.get("rope_type", rope.get("type"))
            if rope_type == "llama3":
                llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                          int(rope["original_max_position_embeddings"]))
            elif rope_type not in (None, "default"):
                raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                                 "(supported: default, llama3)")
        theta = hf.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        eos = hf.get("eos_token_id")
        kw = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rope_llama3_scaling=llama3,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=flags["qkv_bias"],
            qk_norm=flags["qk_norm"],
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        if flags["model_type"] in ("llama", "qwen3") and hf.get("attention_bias"):
            # transformers then also adds an o_proj bias, which this decoder does not have
            raise ValueError(f"{source}: attention_bias=true is not supported for {arch}")
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_dir(cls, path: str, **overrides) -> ModelConfig:
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ValueError(f"{file}: not found (expected a Hugging Face model folder)")
        return cls.from_hf_dict(read_json_object(file), source=file, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        model_type = SUPPORTED_ARCHITECTURES[self.architecture]["model_type"]
        out: dict[str, Any] = dict(
            architectures=[self.architecture],
            model_type=model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            torch_dtype=self.param_dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if model_type in ("llama", "qwen3"):
            out["attention_bias"] = False
        if model_type == "llama":
            out["mlp_bias"] = False
        if model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        out["sliding_window"] = None  # transformers' Mistral would otherwise default to a 4096 window
        if self.rope_llama3_scaling is not None:
            f, lo, hi, orig = self.rope_llama3_scaling
            out["rope_scaling"] = dict(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                                       original_max_position_embeddings=orig)
        return out
