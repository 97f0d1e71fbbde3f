"""Default CPU recipe: the embedded running-arithmetic task, TRD in the OPD setting (trd_jax.recipes)."""

from trd_jax.recipes import default_config


def get_config():
    return default_config()
