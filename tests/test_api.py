"""The public facade trd_jax.api: LM.logits, generate, save_model."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from trd_jax.api import generate, load_model, save_model
from trd_jax.models import hf_io


def test_logits_shapes(tiny_lms):
    lm = tiny_lms["qwen2"]
    for shape in [(1, 1), (3, 5), (5, 19), (2, 33)]:
        out = lm.logits(np.ones(shape, np.int64))
        assert out.shape == shape + (300,) and out.dtype == np.float32
    assert lm.logits([[1, 2, 3]]).shape == (1, 3, 300)  # nested lists too


def test_logits_bucket_padding_is_invisible(tiny_lms):
    """B=5, T=19 run padded to (6, 24); the same rows and positions at exact bucket sizes (4, 16) and
    inside a call that fills the whole (6, 24) bucket with other tokens give the same values."""
    lm = tiny_lms["llama"]
    ids = np.random.default_rng(0).integers(0, 256, (6, 24))
    odd = lm.logits(ids[:5, :19])
    np.testing.assert_allclose(odd[:4, :16], lm.logits(ids[:4, :16]), atol=1e-5)
    np.testing.assert_allclose(odd, lm.logits(ids)[:5, :19], atol=1e-5)
    assert np.abs(odd[1] - odd[0]).max() > 1e-2  # rows differ: the comparison is not vacuous


@pytest.mark.parametrize("ids", [[[0, 256]], [[-1, 3]], [1, 2, 3], [[[1, 2]]], 5])
def test_logits_bad_ids(tiny_lms, ids):
    with pytest.raises(ValueError, match="ids"):
        tiny_lms["llama"].logits(ids)


def test_generate_returns_int_lists(tiny_lms):
    lm = tiny_lms["llama"]  # EOS 2 from generation_config.json; pad defaults to it
    assert lm.eos_ids == (2,) and lm.sampler.pad_id == 2 and tiny_lms["qwen3"].eos_ids == ()
    prompts = [[1, 2, 3], list(range(10, 30)), [7]]
    out = generate(lm, prompts, 7, eos_id=())
    assert isinstance(out, list) and [len(x) for x in out] == [7, 7, 7]
    assert all(type(t) is int and 0 <= t < 256 for row in out for t in row)
    sampled = generate(lm, prompts, 5, temperature=1.0, top_k=10, top_p=0.9, seed=3, eos_id=[1, 2])
    assert len(sampled) == 3
    for row in sampled:
        assert 1 <= len(row) <= 5 and all(type(t) is int for t in row)
        assert not set(row[:-1]) & {1, 2} and (len(row) == 5 or row[-1] in (1, 2))


def test_eos_from_generation_config(tiny_hf_models, tmp_path):
    """generation_config.json's EOS (what transformers' generate stops on) wins over config.json's."""
    folder = shutil.copytree(tiny_hf_models["llama"], tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert load_model(str(folder)).eos_ids == (5, 7)
    os.remove(folder / "generation_config.json")
    assert load_model(str(folder)).eos_ids == (2,)  # config.json's


@pytest.fixture
def with_tokenizer(tiny_hf_models, tmp_path):
    """A copy of the tiny qwen3 folder with a small word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = shutil.copytree(tiny_hf_models["qwen3"], tmp_path / "src")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)} | {"<unk>": 255}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}))
    return folder


def test_save_model_copies_tokenizer(with_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    lm = load_model(str(with_tokenizer))
    assert save_model(lm, str(out)) == str(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (with_tokenizer / f).read_bytes(), f
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]  # no temp folder left
    assert AutoTokenizer.from_pretrained(str(out))("w5 w17").input_ids == [5, 17]
    np.testing.assert_array_equal(load_model(str(out)).logits([[5, 17]]), lm.logits([[5, 17]]))


def test_save_model_without_tokenizer_and_bf16(tiny_lms, tmp_path):
    save_model(tiny_lms["mistral"], str(tmp_path), dtype="bfloat16")
    assert not (tmp_path / "tokenizer.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    back = load_model(str(tmp_path))
    a, b = back.logits([[3, 4, 5]]), tiny_lms["mistral"].logits([[3, 4, 5]])
    assert 0 < np.abs(a - b).max() < 0.05


def test_failed_save_keeps_old_folder(tiny_lms, tmp_path, monkeypatch):
    lm = tiny_lms["qwen3"]
    save_model(lm, str(tmp_path))
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_lms["llama"], str(tmp_path))
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # untouched, no temp folder
