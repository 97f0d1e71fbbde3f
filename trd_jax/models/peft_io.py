"""LoRA adapters in PEFT's format: adapter_config.json and adapter_model.safetensors, which `peft`
(PeftModel.from_pretrained on a transformers model), transformers' load_adapter and serving stacks that read
PEFT adapters load onto the base model.

Tensor names are PEFT's saved names (the adapter name "default" stripped):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]

and the same for k, v, o (self_attn) and gate, up, down (mlp). Our A [*in_shape, r] and B [r, *out_shape]
flatten to those in the head-major order hf_io.py uses for the base projections.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from trd_jax.json_files import read_json_object
from trd_jax.models.lora import HF_MODULES, LoRAConfig, add_lora, lora_config, remove_lora, split_lora

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers."
_HF_TARGET = {module.split(".")[-1]: target for target, module in HF_MODULES.items()}  # "q_proj" -> "q"
# adapter_config.json fields that would change the computation and that this loader does not implement, with
# the value that means "not used".
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
                "trainable_token_indices": None, "target_parameters": None}


def _hf_name(layer: int, target: str, matrix: str) -> str:
    return f"{_PREFIX}{layer}.{HF_MODULES[target]}.lora_{matrix.upper()}.weight"


def _adapter_leaves(adapters_state) -> list[tuple[int, str, str, np.ndarray | jax.Array]]:
    """(layer, target, "a" | "b", value) for every adapter matrix of an nnx.State of LoRAParams."""
    out = []
    for path, value in nnx.to_flat_state(adapters_state):
        # ("layers", i, "attn" | "mlp", "<target>_lora", "a" | "b")
        layer, owner, matrix = int(path[1]), path[3], path[4]
        out.append((layer, owner[: -len("_lora")], matrix, value.get_value()))
    return out


def peft_config_dict(cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """PEFT's LoraConfig fields for our adapters (PEFT fills every other field with its default)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
            "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in cfg.targets), "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft_adapter(model: nnx.Module, path: str, *, base_model_name_or_path: str | None = None,
                      dtype: str | None = None) -> str:
    """Writes the adapters of `model` (a Transformer with adapters) into `path` in PEFT's format, in `dtype`
    (default: the adapters' float32). Written to a temporary folder first, then moved in."""
    cfg = lora_config(model)
    if cfg is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters")
    tensors = {}
    for layer, target, matrix, value in _adapter_leaves(split_lora(model)[1]):
        array = np.asarray(jax.device_get(value))
        array = array.astype(jnp.dtype(dtype)) if dtype else array
        rank = array.shape[-1] if matrix == "a" else array.shape[0]
        flat = array.reshape(-1, rank) if matrix == "a" else array.reshape(rank, -1)
        tensors[_hf_name(layer, target, matrix)] = np.ascontiguousarray(flat.T)  # [r, in] / [out, r]
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path, prefix=".tmp-save-") as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(peft_config_dict(cfg, base_model_name_or_path), f, indent=2)
            f.write("\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    return path


def read_peft_config(path: str) -> LoRAConfig:
    """Our LoRAConfig from a PEFT adapter folder's adapter_config.json; errors name the field and the file."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{file}: not found (expected a PEFT adapter folder)")
    hf = read_json_object(file)
    if hf.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {hf.get('peft_type')!r} is not supported (only LORA)")
    for key, neutral in _UNSUPPORTED.items():
        if hf.get(key, neutral) not in (neutral, None, {}, False):
            raise ValueError(f"{file}: {key}={hf[key]!r} is not supported")
    modules = hf.get("target_modules")
    modules = [modules] if isinstance(modules, str) else list(modules or [])
    unknown = [m for m in modules if m not in _HF_TARGET]
    if unknown or not modules:
        raise ValueError(f"{file}: target_modules {modules!r}: expected names from {sorted(_HF_TARGET)}")
    return LoRAConfig(rank=int(hf["r"]), alpha=float(hf["lora_alpha"]), targets=tuple(_HF_TARGET[m] for m in modules),
                      dropout=float(hf.get("lora_dropout", 0.0)), use_rslora=bool(hf.get("use_rslora", False)))


def load_peft_adapter(model: nnx.Module, path: str) -> nnx.Module:
    """Attaches the PEFT adapters in `path` to `model` (a Transformer without adapters), in place, and returns
    it. Every tensor is checked by name and shape; an error names the tensor and the file and leaves `model`
    without adapters, as it was."""
    if lora_config(model) is not None:
        raise ValueError(f"{path}: the model already has LoRA adapters")
    cfg = read_peft_config(path)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{file}: not found")
    add_lora(model, cfg, rngs=nnx.Rngs(0))
    try:
        _fill_adapters(model, file)
    except BaseException:
        remove_lora(model)  # a refused adapter must not stay attached to the caller's model
        raise
    return model


def _fill_adapters(model: nnx.Module, file: str) -> None:
    _, adapters_state, _ = split_lora(model)
    values: dict = {}
    with safe_open(file, framework="numpy") as f:
        names = set(f.keys())
        expected = set()
        for layer, target, matrix, value in _adapter_leaves(adapters_state):
            name = _hf_name(layer, target, matrix)
            expected.add(name)
            shape = tuple(value.shape)
            rank = shape[-1] if matrix == "a" else shape[0]
            hf_shape = (rank, math.prod(shape[:-1])) if matrix == "a" else (math.prod(shape[1:]), rank)
            if name not in names:
                raise ValueError(f"{file}: tensor {name!r} is missing (expected shape {list(hf_shape)})")
            array = f.get_tensor(name)
            if tuple(array.shape) != hf_shape:
                raise ValueError(f"{file}: tensor {name!r} has shape {list(array.shape)}, expected {list(hf_shape)}")
            values.setdefault(layer, {}).setdefault(target, {})[matrix] = array.T.reshape(shape).astype(np.float32)
        unused = sorted(names - expected)
        if unused:
            raise ValueError(f"{file}: tensor {unused[0]!r} does not fit the model ({len(unused)} unused)")
    for key, variable in nnx.to_flat_state(adapters_state):
        layer, target, matrix = int(key[1]), key[3][: -len("_lora")], key[4]
        variable.set_value(jnp.asarray(values[layer][target][matrix]))
    nnx.update(model, adapters_state)
