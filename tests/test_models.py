"""Model import/export and forward numerics against transformers (torch, CPU) as the reference."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from trd_jax.api import load_model, save_model
from trd_jax.models.config import ModelConfig
from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.models.transformer import Transformer, causal_lm_positions, rope_inv_freq

from conftest import TINY_HF_CONFIGS, make_tiny_hf_model

NAMES = list(TINY_HF_CONFIGS)
TOL = 1e-4


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids)[None] if np.ndim(ids) == 1 else np.asarray(ids))).logits.numpy()


def params_of(model) -> dict:
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def rand_ids(seed, shape, high=200):
    return np.random.default_rng(seed).integers(0, high, shape)


# ---------------------------------------------------------------- forward numerics


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, tiny_lms, tiny_torch_models):
    ids = rand_ids(0, (2, 64))
    ours, ref = tiny_lms[name].logits(ids), hf_logits(tiny_torch_models[name], ids)
    assert ours.shape == ref.shape == (2, 64, tiny_lms[name].cfg.vocab_size)
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_right_padded_rows_match_unpadded(name, tiny_lms, tiny_torch_models):
    lengths = [50, 7, 33]
    ids = rand_ids(1, (3, 50))
    for i, n in enumerate(lengths):
        ids[i, n:] = 0  # right padding: causal attention never looks at it
    ours = tiny_lms[name].logits(ids)
    for i, n in enumerate(lengths):
        ref = hf_logits(tiny_torch_models[name], ids[i, :n])[0]
        assert np.abs(ours[i, :n] - ref).max() <= TOL, (i, n)


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_via_model_call(name, tiny_lms, tiny_torch_models):
    """Transformer.__call__ with left padding (as the sampler's prefill uses it)."""
    lengths, t = [40, 13, 1], 40
    ids = rand_ids(2, (3, t))
    mask = np.arange(t)[None, :] >= (t - np.array(lengths))[:, None]
    tokens = np.where(mask, ids, 7)  # pad token id 7: must not matter
    positions = causal_lm_positions(jnp.asarray(mask))
    np.testing.assert_array_equal(positions[1, -13:], np.arange(13))
    model = tiny_lms[name].model
    hidden, cache = model(jnp.asarray(tokens), positions, jnp.asarray(mask))
    ours = np.asarray(model.logits(hidden))
    assert cache is None
    for i, n in enumerate(lengths):
        ref = hf_logits(tiny_torch_models[name], tokens[i, t - n:])[0]
        assert np.abs(ours[i, t - n:] - ref).max() <= TOL, (i, n)


def test_rope_inv_freq_matches_transformers(tiny_lms, tiny_torch_models):
    for name in NAMES:
        ref = tiny_torch_models[name].model.rotary_emb.inv_freq.numpy()
        np.testing.assert_allclose(rope_inv_freq(tiny_lms[name].cfg), ref, rtol=1e-6, err_msg=name)
    cfg = tiny_lms["llama"].cfg
    assert cfg.rope_llama3_scaling == (8.0, 1.0, 4.0, 64) and cfg.rope_theta == 500000.0


def test_llama3_scaling_matters(tiny_lms, tiny_hf_models, tmp_path):
    """Guards the llama comparison above: without the scaling the logits at 64 tokens differ clearly."""
    folder = shutil.copytree(tiny_hf_models["llama"], tmp_path / "noscale")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    plain = load_model(str(folder))
    assert plain.cfg.rope_llama3_scaling is None
    ids = rand_ids(0, (2, 64))
    assert np.abs(plain.logits(ids) - tiny_lms["llama"].logits(ids)).max() > 1e-2


def test_padded_vocabulary(tiny_lms, tiny_torch_models):
    """vocab_size (300) beyond the ids fed (< 200): logits keep all vocab_size columns."""
    lm = tiny_lms["qwen2"]
    ids = rand_ids(3, (1, 20), high=200)
    out = lm.logits(ids)
    assert out.shape == (1, 20, 300)
    assert np.abs(out - hf_logits(tiny_torch_models["qwen2"], ids)).max() <= TOL


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("name", NAMES)
def test_export_roundtrip(name, tiny_lms, tiny_torch_models, tmp_path):
    lm = tiny_lms[name]
    save_model(lm, str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = rand_ids(4, (2, 48))
    assert np.abs(hf_logits(back, ids) - lm.logits(ids)).max() <= TOL
    assert_same_params(load_model(str(tmp_path)).model, lm.model)
    assert load_model(str(tmp_path)).cfg == lm.cfg
    # The structural switches survive in transformers' view of the exported config.
    orig, new = tiny_torch_models[name], back
    assert new.config.tie_word_embeddings == orig.config.tie_word_embeddings
    assert (new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()) == lm.cfg.tie_word_embeddings
    attn = new.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == lm.cfg.qkv_bias == (name == "qwen2")
    assert hasattr(attn, "q_norm") == lm.cfg.qk_norm == (name == "qwen3")
    assert attn.head_dim == orig.model.layers[0].self_attn.head_dim == lm.cfg.head_dim
    np.testing.assert_array_equal(new.model.rotary_emb.inv_freq.numpy(), orig.model.rotary_emb.inv_freq.numpy())
    if name == "llama":
        rope = new.config.rope_parameters
        assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("llama3", 8.0, 64)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_attention_bias_true(name, tmp_path):
    """attention_bias=true gives Llama and Qwen3 biases on q, k, v *and* o_proj in transformers: the
    loader must either reproduce the model or refuse it, never drop o_proj.bias with a warning."""
    ref = make_tiny_hf_model(name, attention_bias=True)
    assert ref.model.layers[0].self_attn.o_proj.bias is not None
    ref.save_pretrained(str(tmp_path / "src"))
    try:
        lm = load_model(str(tmp_path / "src"))
    except ValueError as e:  # refusing is fine if it says why and where
        assert "attention_bias" in str(e) and "config.json" in str(e), e
        return
    ids = rand_ids(7, (1, 24))
    diff = float(np.abs(lm.logits(ids) - hf_logits(ref, ids)).max())
    assert diff <= TOL, f"loaded without o_proj.bias? max |logits diff| = {diff:.3f}"
    save_model(lm, str(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert back.config.attention_bias and np.abs(hf_logits(back, ids) - hf_logits(ref, ids)).max() <= TOL


def test_config_dict_roundtrip(tiny_lms):
    for lm in tiny_lms.values():
        assert ModelConfig.from_hf_dict(lm.cfg.to_hf_dict()) == lm.cfg


# ---------------------------------------------------------------- bf16 files


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bf16"))
    make_tiny_hf_model("qwen3").to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_bf16_checkpoint_loads_exactly(bf16_folder):
    model = load_hf(bf16_folder)  # float32 parameters from bfloat16 files
    ref = {k: v.float().numpy() for k, v in
           AutoModelForCausalLM.from_pretrained(bf16_folder, dtype=torch.bfloat16).state_dict().items()}
    p = params_of(model)
    assert all(v.dtype == np.float32 for v in p.values())
    np.testing.assert_array_equal(p["embed"], ref["model.embed_tokens.weight"])
    np.testing.assert_array_equal(p["layers/1/attn/k_norm/weight"], ref["model.layers.1.self_attn.k_norm.weight"])
    q = ref["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(p["layers/0/attn/q_proj"], q.T.reshape(64, 4, 24))
    np.testing.assert_array_equal(p["layers/0/mlp/down_proj"], ref["model.layers.0.mlp.down_proj.weight"].T)


def test_bf16_compute_close_to_f32(bf16_folder):
    f32, bf16 = load_model(bf16_folder), load_model(bf16_folder, dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in params_of(bf16.model).values())
    ids = rand_ids(5, (2, 32))
    a, b = f32.logits(ids), bf16.logits(ids)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    err = np.abs(a - b).max()
    assert 0 < err < 0.1 * np.abs(a).max(), err  # bf16 rounding, but nothing structural


# ---------------------------------------------------------------- sharded checkpoints


def test_load_transformers_sharded(tiny_torch_models, tiny_lms, tmp_path):
    tiny_torch_models["qwen2"].save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_same_params(load_hf(str(tmp_path)), tiny_lms["qwen2"].model)


def test_save_sharded_loads_in_transformers(tiny_lms, tmp_path):
    lm = tiny_lms["llama"]
    save_hf(lm.model, str(tmp_path), max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).is_file() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = rand_ids(6, (1, 40))
    assert np.abs(hf_logits(back, ids) - lm.logits(ids)).max() <= TOL
    assert_same_params(load_hf(str(tmp_path)), lm.model)
    # Re-saving unsharded into the same folder removes the stale shards and index.
    save_hf(lm.model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert_same_params(load_hf(str(tmp_path)), lm.model)


# ---------------------------------------------------------------- errors


@pytest.fixture
def broken(tiny_hf_models, tmp_path):
    """A writable copy of the tiny llama folder."""
    return shutil.copytree(tiny_hf_models["llama"], tmp_path / "m")


def test_error_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel"):
        load_model(str(broken))


def test_error_missing_field(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["intermediate_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*intermediate_size"):
        load_model(str(broken))


def test_error_missing_tensor(broken):
    file = str(broken / "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match=rf"{broken}.*model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_model(str(broken))


def test_error_misshaped_tensor(broken):
    file = str(broken / "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.layers\.0\.self_attn\.k_proj\.weight"
                                         r".*\[64, 64\].*\[32, 64\]"):
        load_model(str(broken))


def test_error_missing_folder_and_config(broken, tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))
    os.remove(broken / "config.json")
    with pytest.raises(ValueError, match=rf"{broken / 'config.json'}.*not found"):
        load_model(str(broken))


def test_error_sliding_window(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*sliding"):
        load_model(str(broken))


# ---------------------------------------------------------------- logical axis names


def test_logical_axis_names():
    axes = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"}
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, qkv_bias=True, qk_norm=True)
    for tie in (True, False):  # abstract (shapes only): the metadata is all we look at
        model = nnx.eval_shape(lambda: Transformer(cfg.replace(tie_word_embeddings=tie), rngs=nnx.Rngs(0)))
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        assert len(flat) == 3 + 2 * 14 - tie  # embed, final norm, [lm_head]; 14 per layer
        for path, var in flat:
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var.get_value().ndim and set(names) <= axes, (path, names)
        assert sum(int(np.prod(v.get_value().shape)) for _, v in flat) == model.cfg.num_params


def test_mistral_export_has_no_sliding_window():
    """transformers' MistralConfig defaults to a 4096 sliding window; the export must switch it off."""
    import transformers

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, architecture="MistralForCausalLM")
    hf = cfg.to_hf_dict()
    assert hf["sliding_window"] is None
    assert transformers.MistralConfig(**hf).sliding_window is None
