import os

# Everything runs offline: no model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from trd_jax.tools.smollm2 import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct converted to an HF float32 folder, once per session."""
    from trd_jax.models.gguf_import import convert_gguf_to_hf

    return convert_gguf_to_hf(smollm2_gguf, str(tmp_path_factory.mktemp("smollm2")))
