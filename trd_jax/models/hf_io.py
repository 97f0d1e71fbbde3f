"""Hugging Face checkpoint import and export (safetensors, no torch).

Import reads a local folder (config.json plus model.safetensors, or a sharded
model.safetensors.index.json) into a `Transformer`; export writes a folder that `transformers` loads.
Every tensor is checked by name and shape; an error names the tensor and the file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from trd_jax.json_files import read_json_object
from trd_jax.models.config import ModelConfig
from trd_jax.models.lora import lora_config
from trd_jax.models.transformer import Transformer

# Files copied alongside the weights on export when the source folder had them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


class _Mapping:
    """One parameter: its path in our state, its HF tensor name and shape, and the two layouts' maps."""

    def __init__(self, path, hf_name, hf_shape, to_ours: Callable, to_hf: Callable):
        self.path, self.hf_name, self.hf_shape = path, hf_name, tuple(hf_shape)
        self.to_ours, self.to_hf = to_ours, to_hf


def _mappings(cfg: ModelConfig) -> Iterator[_Mapping]:
    d, h, k, hd, m, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.vocab_size)
    same = (lambda w: w, lambda w: w)
    transposed = (lambda w: w.T, lambda w: w.T)

    def in_proj(heads):  # HF [heads*hd, d] <-> ours [d, heads, hd]
        return (lambda w: w.T.reshape(d, heads, hd), lambda w: w.reshape(d, heads * hd).T)

    def bias(heads):  # HF [heads*hd] <-> ours [heads, hd]
        return (lambda w: w.reshape(heads, hd), lambda w: w.reshape(heads * hd))

    out_proj = (lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T)

    yield _Mapping(("embed",), "model.embed_tokens.weight", (v, d), *same)
    for i in range(cfg.num_layers):
        pre, at = f"model.layers.{i}.", ("layers", i, "attn")
        yield _Mapping(("layers", i, "input_norm", "weight"), pre + "input_layernorm.weight", (d,), *same)
        yield _Mapping(at + ("q_proj",), pre + "self_attn.q_proj.weight", (h * hd, d), *in_proj(h))
        yield _Mapping(at + ("k_proj",), pre + "self_attn.k_proj.weight", (k * hd, d), *in_proj(k))
        yield _Mapping(at + ("v_proj",), pre + "self_attn.v_proj.weight", (k * hd, d), *in_proj(k))
        yield _Mapping(at + ("o_proj",), pre + "self_attn.o_proj.weight", (d, h * hd), *out_proj)
        if cfg.qkv_bias:
            yield _Mapping(at + ("q_bias",), pre + "self_attn.q_proj.bias", (h * hd,), *bias(h))
            yield _Mapping(at + ("k_bias",), pre + "self_attn.k_proj.bias", (k * hd,), *bias(k))
            yield _Mapping(at + ("v_bias",), pre + "self_attn.v_proj.bias", (k * hd,), *bias(k))
        if cfg.qk_norm:
            yield _Mapping(at + ("q_norm", "weight"), pre + "self_attn.q_norm.weight", (hd,), *same)
            yield _Mapping(at + ("k_norm", "weight"), pre + "self_attn.k_norm.weight", (hd,), *same)
        yield _Mapping(("layers", i, "post_attn_norm", "weight"), pre + "post_attention_layernorm.weight",
                       (d,), *same)
        yield _Mapping(("layers", i, "mlp", "gate_proj"), pre + "mlp.gate_proj.weight", (m, d), *transposed)
        yield _Mapping(("layers", i, "mlp", "up_proj"), pre + "mlp.up_proj.weight", (m, d), *transposed)
        yield _Mapping(("layers", i, "mlp", "down_proj"), pre + "mlp.down_proj.weight", (d, m), *transposed)
    yield _Mapping(("final_norm", "weight"), "model.norm.weight", (d,), *same)
    if not cfg.tie_word_embeddings:
        yield _Mapping(("lm_head",), "lm_head.weight", (v, d), *transposed)


# Tensors that some checkpoints carry and the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _tensor_index(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the sharded index or from the files themselves."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        weight_map = read_json_object(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_file}: no 'weight_map' object")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         "(only safetensors checkpoints are supported)")
    index = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                index[name] = file
    return index


@contextlib.contextmanager
def _open_safetensors(file: str):
    """safe_open, with a truncated or corrupt file reported as a ValueError naming it."""
    try:
        with safe_open(file, framework="numpy") as handle:
            yield handle
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_hf_tensors(path: str, cfg: ModelConfig) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (our parameter path, numpy array in our layout) for every parameter, checked."""
    index = _tensor_index(path)
    mappings = list(_mappings(cfg))
    wanted = {mp.hf_name for mp in mappings}
    unused = sorted(n for n in index if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)
                    and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unused:  # a tensor the decoder would ignore means it would compute another model
        raise ValueError(f"{index[unused[0]]}: tensor {unused[0]!r} is not used by {cfg.architecture} "
                         f"as configured ({len(unused)} unused tensors: {unused[:5]})")
    by_file: dict[str, list[_Mapping]] = {}
    for mp in mappings:
        if mp.hf_name not in index:
            raise ValueError(f"{path}: tensor {mp.hf_name!r} is missing (expected shape {list(mp.hf_shape)})")
        by_file.setdefault(index[mp.hf_name], []).append(mp)
    for file, group in by_file.items():
        if not os.path.isfile(file):
            raise ValueError(f"{file}: listed in the index but not found")
        with _open_safetensors(file) as f:
            names = set(f.keys())
            for mp in group:
                if mp.hf_name not in names:
                    raise ValueError(f"{file}: tensor {mp.hf_name!r} is listed in the index but not in the file")
                shape = tuple(f.get_slice(mp.hf_name).get_shape())
                if shape != mp.hf_shape:
                    raise ValueError(f"{file}: tensor {mp.hf_name!r} has shape {list(shape)}, "
                                     f"expected {list(mp.hf_shape)} from config.json")
                yield mp.path, mp.to_ours(f.get_tensor(mp.hf_name))


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf(path: str, *, dtype: str = "float32", param_dtype: str | None = None,
            place: Callable[[tuple, np.ndarray], jax.Array] | None = None) -> Transformer:
    """Loads a local Hugging Face folder into a Transformer.

    dtype: compute dtype; param_dtype: storage dtype (default: dtype). `place(path, array)` puts each
    parameter on devices (default: jnp.asarray on the default device); sharded loading passes one
    that builds global arrays.
    """
    if not os.path.isdir(path):
        raise ValueError(f"{path}: model folder not found")
    cfg = ModelConfig.from_hf_dir(path, dtype=dtype, param_dtype=param_dtype or dtype)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pdt = jnp.dtype(cfg.param_dtype)
    place = place or (lambda _, a: jnp.asarray(a))
    values: dict = {}
    for p, array in read_hf_tensors(path, cfg):
        _set_path(values, p, place(p, np.asarray(array).astype(pdt)))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def hf_tensors(model: Transformer, dtype: str | None = None) -> dict[str, np.ndarray]:
    """HF tensor name -> numpy array (contiguous, in `dtype` or the parameter dtype)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for mp in _mappings(model.cfg):
        value = pure
        for key in mp.path:
            value = value[key]
        array = np.asarray(jax.device_get(value))
        if dtype is not None:
            array = array.astype(jnp.dtype(dtype))
        out[mp.hf_name] = np.ascontiguousarray(mp.to_hf(array))
    return out


def save_hf(model: Transformer, path: str, *, dtype: str | None = None, tokenizer_dir: str | None = None,
            max_shard_bytes: int = 4 << 30) -> str:
    """Writes config.json, generation_config.json and model.safetensors (sharded with an index above
    max_shard_bytes) into `path`; tokenizer files are copied from `tokenizer_dir` when given.

    Files are written into a temporary folder first and moved in only once all are complete, so a failure
    while writing leaves whatever `path` held before intact; stale shards of an earlier save are removed
    last.
    """
    if lora_config(model) is not None:  # the adapters would be silently left out
        raise ValueError("save_hf: the model has LoRA adapters; save lora.merge_lora(model), or the adapters alone "
                         "with peft_io.save_peft_adapter")
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    os.makedirs(path, exist_ok=True)
    tensors = hf_tensors(model, dtype)
    with tempfile.TemporaryDirectory(dir=path, prefix=".tmp-save-") as tmp:
        hf_config = cfg.to_hf_dict()
        hf_config["torch_dtype"] = dtype
        hf_config["dtype"] = dtype
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, name)):
                    shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
            gen = {k: v for k, v in (("bos_token_id", hf_config["bos_token_id"]),
                                     ("eos_token_id", hf_config["eos_token_id"]),
                                     ("pad_token_id", hf_config["pad_token_id"])) if v is not None}
            _write_json(os.path.join(tmp, "generation_config.json"), gen)
        shards, current, size = [], {}, 0
        for name, array in tensors.items():
            if current and size + array.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = array
            size += array.nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            total = sum(a.nbytes for a in tensors.values())
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        new_names = set(os.listdir(tmp))
        for name in new_names:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        # Only then remove stale weights of an earlier save with another sharding (they would confuse loaders).
        for old in glob.glob(os.path.join(path, "model*.safetensors*")):
            if os.path.basename(old) not in new_names:
                os.remove(old)
    return path


def _write_json(file: str, obj) -> None:
    """Atomically (a temporary file, then os.replace): another process reading it sees the old or new file whole."""
    text = json.dumps(obj, indent=2) + "\n"
    tmp = f"{file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, file)
