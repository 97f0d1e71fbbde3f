"""A training run's student as a model: evaluation (and later runs) can read a trd_jax workdir as they read
a Hugging Face folder.

A run writes, once at the start, ``workdir/student_model/``: the student's config.json, generation config
and tokenizer files, without weights. With it, the student's parameters at any checkpointed step are
restored from ``workdir/checkpoints/<step>/state`` alone: only the ``train.params`` subtree is read, so
neither the optimizer state nor an OPSD teacher copy is loaded into memory.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from trd_jax.models.hf_io import TOKENIZER_FILES, _write_json
from trd_jax.models.transformer import ModelConfig, Transformer

MODEL_DIR = "student_model"
CHECKPOINT_DIR = "checkpoints"


def write_model_card(workdir: str, cfg: ModelConfig, tokenizer_dir: str | None) -> str:
    """workdir/student_model: the student's architecture and tokenizer (what its checkpoints' params fit)."""
    path = os.path.join(workdir, MODEL_DIR)
    os.makedirs(path, exist_ok=True)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = cfg.param_dtype
    _write_json(os.path.join(path, "config.json"), hf)
    if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(path):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    return path


def is_run_dir(path: str) -> bool:
    """Whether `path` is a trd_jax workdir whose student can be loaded (model card and checkpoints)."""
    return (os.path.isfile(os.path.join(path, MODEL_DIR, "config.json"))
            and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)))


def checkpoint_steps(path: str) -> list[int]:
    """Finalised checkpoint steps of the run at `path` (orbax renames a step into place once complete)."""
    root = os.path.join(path, CHECKPOINT_DIR)
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))


def _unwrap(tree):
    """orbax stores each nnx.Param as {"value": array} and list indices as strings; nnx's pure dict has
    neither."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _unwrap(v) for k, v in tree.items()}
    return tree


def load_run_student(path: str, *, step: int | None = None, dtype: str = "float32",
                     param_dtype: str | None = None) -> tuple[Transformer, int]:
    """(the student of the run at `path` as of checkpoint `step` (default: the latest), that step)."""
    if not is_run_dir(path):
        raise ValueError(f"{path}: not a trd_jax run (needs {MODEL_DIR}/config.json and {CHECKPOINT_DIR}/)")
    steps = checkpoint_steps(path)
    if not steps:
        raise ValueError(f"{path}: no finalised checkpoint in {CHECKPOINT_DIR}/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{path}: no checkpoint at step {step} (have {steps})")
    cfg = ModelConfig.from_hf_dir(os.path.join(path, MODEL_DIR), dtype=dtype, param_dtype=param_dtype or dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    # The checkpoint holds the params in the dtype they were trained in; restore that, then cast.
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(path, CHECKPOINT_DIR, str(step), "state"))
    saved_tree = saved.item_metadata.tree if hasattr(saved, "item_metadata") else saved.tree
    # Restored into host memory (numpy), on every process alike: the caller places the params with its own
    # shardings, so no single device has to hold the whole model.
    target = {"train": {"params": jax.tree.map(lambda meta: np.zeros((), meta.dtype), saved_tree["train"]["params"])}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(path, CHECKPOINT_DIR, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, partial_restore=True, restore_args=restore_args))
    values = jax.tree.map(lambda a: jnp.asarray(a, cfg.param_dtype), _unwrap(restored["train"]["params"]))
    nnx.replace_by_pure_dict(abstract, values)
    return nnx.merge(graphdef, abstract), step
