"""Model shapes: the built-in models the recipes name, and config.json files on disk."""

from __future__ import annotations

import json
import os
from typing import Any

from trd_jax.models.config import ModelConfig

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
              num_key_value_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960)
# Hugging Face config.json fields of the models the recipes name, read through ModelConfig.from_hf_dict like a
# local folder's (checked against the published config.json files: Qwen3-8B has 8.19B parameters, 6.95B
# without its two embedding matrices).
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192),
}


def builtin_model(name: str, *, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    return ModelConfig.from_hf_dict(BUILTIN_MODELS[name], source=f"built-in {name}", dtype=dtype,
                                    param_dtype=param_dtype)


def model_from_path(path: str, *, dtype: str, param_dtype: str) -> ModelConfig:
    """A local config.json, a Hugging Face folder, or a trd_jax run's workdir (its student_model folder)."""
    if os.path.isfile(path):
        with open(path) as f:
            return ModelConfig.from_hf_dict(json.load(f), source=path, dtype=dtype, param_dtype=param_dtype)
    for folder in (path, os.path.join(path, "student_model")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return ModelConfig.from_hf_dir(folder, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"{path}: no config.json (expected a Hugging Face folder or a config.json file)")
