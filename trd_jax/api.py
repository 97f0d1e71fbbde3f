"""Small public facade: load a local Hugging Face model, get logits, generate, save.

    from trd_jax.api import load_model, generate, save_model
    lm = load_model("path/to/hf_folder")                 # float32 (or dtype="bfloat16")
    logits = lm.logits(np.array([[1, 2, 3]]))           # f32[1, 3, vocab] numpy
    new_ids = generate(lm, [[1, 2, 3], [4, 5]], max_new_tokens=16)
    save_model(lm, "path/to/out")                       # loads in transformers
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.models.transformer import Transformer, causal_lm_positions
from trd_jax.sampling import Sampler, SamplingConfig
from trd_jax.shapes import bucket
from trd_jax.tokenization import eos_from_generation_config


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, params, ids, mask):
    model: Transformer = nnx.merge(graphdef, params)
    hidden, _ = model(ids, causal_lm_positions(mask), mask)
    return model.logits(hidden)


def _generation_eos_ids(path: str | None, model_eos) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what transformers' generate stops on), else config.json."""
    eos = eos_from_generation_config(path) if path else []
    if not eos and model_eos is not None:
        eos = list(model_eos) if isinstance(model_eos, (list, tuple)) else [model_eos]
    return tuple(int(e) for e in eos)


class LM:
    """A loaded model: the NNX module, its split (graphdef, params) for jitted code, and a sampler."""

    def __init__(self, model: Transformer, path: str | None = None):
        self.model = model
        self.cfg = model.cfg
        self.path = path
        self.graphdef, self.params = nnx.split(model)
        self.eos_ids = _generation_eos_ids(path, model.cfg.eos_token_id)
        pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (self.eos_ids or (0,))[0]
        self.sampler = Sampler(self.graphdef, eos_ids=self.eos_ids, pad_id=pad)

    def logits(self, ids) -> np.ndarray:
        """ids int[B, T] (numpy or nested lists) -> f32[B, T, vocab] numpy. Calls are padded to bucketed
        shapes (right padding, which causal attention never sees) so that new sizes rarely recompile."""
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids: expected integer token ids, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"ids: expected int[B, T], got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"ids: token ids must be in [0, {self.cfg.vocab_size}), got [{ids.min()}, {ids.max()}]")
        b, t = ids.shape
        padded = np.zeros((bucket(b), bucket(t, 16)), np.int32)
        padded[:b, :t] = ids
        mask = np.zeros(padded.shape, bool)
        mask[:b, :t] = True
        return np.asarray(_logits(self.graphdef, self.params, jnp.asarray(padded), jnp.asarray(mask)))[:b, :t]


def load_model(path: str, dtype: str = "float32") -> LM:
    """Loads a local Hugging Face folder (config.json + safetensors). dtype: "float32" or "bfloat16"
    (parameters and compute)."""
    return LM(load_hf(path, dtype=dtype), path)


def generate(lm: LM, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | Sequence[int] | None = None
             ) -> list[list[int]]:
    """Per prompt (lists of different lengths), the new token ids, up to and including the first EOS.

    temperature 0 is greedy. eos_id: the stop token(s); None uses the model's own (generation_config.json,
    else config.json). Deterministic for a given seed.
    """
    eos = None if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    out = lm.sampler(lm.params, [list(map(int, p)) for p in prompt_ids], max_new_tokens,
                     sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p),
                     key=jax.random.key(seed), eos_ids=eos)
    return [out.tokens[i, :n].tolist() for i, n in enumerate(out.lengths)]


def save_model(lm: LM, path: str, dtype: str | None = None) -> str:
    """Writes a Hugging Face folder (config, safetensors, and the tokenizer files of the source folder)."""
    return save_hf(lm.model, path, dtype=dtype, tokenizer_dir=lm.path)
