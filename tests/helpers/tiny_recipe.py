"""tiny_config() as a recipe file for `python -m trd_jax.main --config` (PYTHONPATH must hold tests/)."""

from helpers.tiny_run import tiny_config


def get_config():
    return tiny_config()
