"""LoRA adapters in PEFT's format against `peft` on top of transformers (torch, CPU): our exported adapters load
with PeftModel.from_pretrained and give our logits; adapters PEFT made load into our model and give PEFT's."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from trd_jax.models import lora
from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.models.peft_io import load_peft_adapter, read_peft_config, save_peft_adapter

peft = pytest.importorskip("peft")

TOL = 1e-4
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours_logits(model, ids) -> np.ndarray:
    ids = jnp.asarray(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden, _ = model(ids, positions, jnp.ones(ids.shape, bool))
    return np.asarray(model.logits(hidden))


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


def randomized(model, seed: int):
    """`model` with every adapter matrix random (B = 0 would make any export look right)."""
    graphdef, adapters, base = lora.split_lora(model)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy), base)


IDS = np.random.default_rng(0).integers(0, 200, (2, 24))


@pytest.mark.parametrize("name, cfg", [
    ("qwen3", lora.LoRAConfig(rank=4, alpha=8.0)),  # q/k norm, head_dim != hidden / heads, tied
    ("qwen2", lora.LoRAConfig(rank=3, alpha=5.0, targets=("q", "v", "down"), use_rslora=True)),  # biases, untied
    ("llama", lora.LoRAConfig(rank=8, alpha=16.0, dropout=0.1)),  # dropout is off outside the update
])
@pytest.mark.slow
def test_exported_adapters_load_in_peft_with_our_logits(name, cfg, tiny_hf_models, tmp_path):
    model = randomized(lora.add_lora(load_hf(tiny_hf_models[name]), cfg, rngs=nnx.Rngs(1)), seed=2)
    out = save_peft_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=tiny_hf_models[name])

    written = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM" and written["r"] == cfg.rank
    assert written["lora_alpha"] == cfg.alpha and written["use_rslora"] == cfg.use_rslora
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "np") as f:
        names = set(f.keys())
        a_q = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
        if "q" in cfg.targets:
            assert f.get_tensor(a_q).shape == (cfg.rank, 64)
    assert len(names) == 2 * 2 * len(cfg.targets)  # A and B, 2 layers

    base = AutoModelForCausalLM.from_pretrained(tiny_hf_models[name], dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(
        HF_NAMES[lora.TARGETS.index(t)] for t in cfg.targets)
    ours, theirs = ours_logits(model, IDS), torch_logits(peft_model, IDS)
    assert np.abs(ours - theirs).max() <= TOL
    with peft_model.disable_adapter():  # ... and not because the adapters do nothing
        assert np.abs(torch_logits(peft_model, IDS) - ours).max() > 100 * TOL


def test_merged_export_matches_peft_merge_and_unload(tiny_hf_models, tmp_path):
    model = randomized(lora.add_lora(load_hf(tiny_hf_models["llama"]), lora.LoRAConfig(rank=4, alpha=8.0),
                                     rngs=nnx.Rngs(3)), seed=4)
    save_peft_adapter(model, str(tmp_path / "adapter"))
    save_hf(lora.merge_lora(model), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_models["llama"], dtype=torch.float32)
    peft_merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    assert np.abs(torch_logits(merged, IDS) - torch_logits(peft_merged, IDS)).max() <= TOL
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_hf(model, str(tmp_path / "unmerged"))  # would silently drop the adapters


def test_peft_made_adapters_load_into_our_model(tiny_hf_models, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_models["qwen3"], dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a nonzero adapter
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    cfg = read_peft_config(str(tmp_path / "theirs"))
    assert cfg.targets == ("q", "o", "up", "down") and cfg.scale == 3.0
    ours = load_peft_adapter(load_hf(tiny_hf_models["qwen3"]), str(tmp_path / "theirs"))
    assert np.abs(ours_logits(ours, IDS) - torch_logits(peft_model, IDS)).max() <= TOL


def test_a_refused_adapter_leaves_the_model_as_it_was(tiny_hf_models, tmp_path):
    """An adapter with a mis-shaped tensor is refused, naming the tensor, and leaves no adapter behind: the
    correct adapter then loads into the same model and gives the logits of a fresh load."""
    model = lora.add_lora(load_hf(tiny_hf_models["qwen3"]), lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v")),
                          rngs=nnx.Rngs(0))
    save_peft_adapter(randomized(model, 1), str(tmp_path / "good"))
    (tmp_path / "bad").mkdir()
    for name in os.listdir(tmp_path / "good"):
        (tmp_path / "bad" / name).write_bytes((tmp_path / "good" / name).read_bytes())
    cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))  # tensors are rank 4
    target = load_hf(tiny_hf_models["qwen3"])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor .* has shape"):
        load_peft_adapter(target, str(tmp_path / "bad"))
    assert lora.lora_config(target) is None
    loaded = load_peft_adapter(target, str(tmp_path / "good"))
    fresh = load_peft_adapter(load_hf(tiny_hf_models["qwen3"]), str(tmp_path / "good"))
    np.testing.assert_array_equal(ours_logits(loaded, IDS), ours_logits(fresh, IDS))


def test_unsupported_peft_configs_are_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        read_peft_config(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens"]}))
    with pytest.raises(ValueError, match="target_modules"):
        read_peft_config(str(tmp_path))
