"""OPD's teacher and student must share one tokenizer: the same string for every id and the same mapping from
text to ids. A teacher folder whose tokenizer differs, even at equal vocabulary size, stops the run before
anything trains, with one ConfigError naming both folders and the first difference."""

import json
import os
import shutil

import pytest

from helpers.tiny_run import tiny_config
from trd_jax.controller import Trainer
from trd_jax.data.arithmetic import ArithmeticTask
from trd_jax.errors import ConfigError
from trd_jax.models.hf_io import save_hf
from trd_jax.models.transformer import init_for_tokenizer
from trd_jax.tokenization import Tokenizer, tokenizer_mismatch


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The arithmetic task's tokenizer, a copy of it, and a copy with two ids' strings swapped (same size)."""
    root = tmp_path_factory.mktemp("tok")
    original = ArithmeticTask(str(root / "task")).tokenizer_dir
    same, swapped = str(root / "same"), str(root / "swapped")
    shutil.copytree(original, same)
    shutil.copytree(original, swapped)
    path = os.path.join(swapped, "tokenizer.json")
    spec = json.load(open(path))
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]  # two ordinary tokens
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(spec, open(path, "w"))
    return {"original": original, "same": same, "swapped": swapped, "ids": sorted((vocab[a], vocab[b]))}


def test_mismatch_names_the_first_differing_id(tokenizers):
    original, same, swapped = (Tokenizer.from_dir(tokenizers[k]) for k in ("original", "same", "swapped"))
    assert original.vocab_size == swapped.vocab_size
    assert tokenizer_mismatch(original, same) is None
    message = tokenizer_mismatch(original, swapped)
    assert message.startswith(f"id {tokenizers['ids'][0]} is ") and tokenizers["swapped"] in message


def _teacher(tmp_path, tokenizer_dir) -> str:
    model = init_for_tokenizer(Tokenizer.from_dir(tokenizer_dir), seed=1, hidden_size=32, intermediate_size=64,
                               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    return save_hf(model, str(tmp_path / "teacher"), tokenizer_dir=tokenizer_dir)


def test_opd_refuses_a_teacher_with_another_tokenizer(tmp_path, tokenizers):
    teacher = _teacher(tmp_path, tokenizers["swapped"])
    cfg = tiny_config(**{"teacher.source": "path", "teacher.path": teacher, "train.steps": 1})
    with pytest.raises(ConfigError, match=r"config\.teacher\.path: the teacher's tokenizer .* differs") as e:
        Trainer(cfg, str(tmp_path / "run"))
    assert f"id {tokenizers['ids'][0]} is" in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # stopped before anything trained


def test_opd_accepts_a_teacher_with_the_same_tokenizer(tmp_path, tokenizers):
    teacher = _teacher(tmp_path, tokenizers["same"])
    cfg = tiny_config(**{"teacher.source": "path", "teacher.path": teacher, "train.steps": 1, "eval.initial": False})
    summary = Trainer(cfg, str(tmp_path / "run")).run()
    assert summary["status"] == "completed"
