"""A training run's student as a model: evaluation (and later runs) can read a trd_jax workdir as they read
a Hugging Face folder.

A run writes, once at the start, ``workdir/student_model/``: the student's config.json, generation config
and tokenizer files, without weights. With it, the student's parameters at any checkpointed step are
restored from ``workdir/checkpoints/<step>/state`` alone: only the ``train.params`` subtree is read, so
neither the optimizer state nor an OPSD teacher copy is loaded into memory.

A rerun in a workdir that holds a checkpoint resumes: check_resume_config and check_bootstrap_models refuse
one whose training config or bootstrap models differ from those the run started with.

A LoRA run's checkpoints hold the adapters alone (``train.params``): the frozen base is written once, at the
start of the run, into ``workdir/student_model/`` (which then is a complete Hugging Face folder of the base),
with ``lora.json`` naming the adapters' shape. Resuming reads the base from there, and loading the run's
student merges the checkpointed adapters into it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from trd_jax.config import ConfigError, base_config
from trd_jax.metrics import atomic_write_json
from trd_jax.models.hf_io import TOKENIZER_FILES, _write_json, load_hf, save_hf
from trd_jax.models.lora import LoRAConfig, add_lora, merge_lora, split_lora
from trd_jax.models.transformer import ModelConfig, Transformer

MODEL_DIR = "student_model"
CHECKPOINT_DIR = "checkpoints"
LORA_FILE = "lora.json"  # in MODEL_DIR: the run trains adapters on the base weights saved beside it
BOOTSTRAP_RECORD = "bootstrap_models.json"

# Keys a resumed run may change: sections that do not affect the parameters, and the memory settings the
# planner proposes (kernels, remat, row groups, cache release), which change float rounding at most, so that a
# run that ran out of memory resumes with them.
RESUMABLE_CHANGES = ("eval.", "log.", "checkpoint.", "export.", "student.attention", "teacher.attention",
                     "train.remat", "train.max_score_rows", "rollout.max_rows_per_call", "rollout.release_kv_cache",
                     "refine.reuse_states", "rollout.continuous_slots", "rollout.kv_page_size",
                     "rollout.kv_pool_tokens")


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


def write_lora_base(workdir: str, base: Transformer, cfg: LoRAConfig, tokenizer_dir: str | None) -> str:
    """Saves the frozen base of a LoRA run into workdir/student_model (weights, config, tokenizer), then
    lora.json last: its presence means the base is complete."""
    path = os.path.join(workdir, MODEL_DIR)
    clear_lora_base(workdir)
    save_hf(base, path, tokenizer_dir=tokenizer_dir)
    _write_json(os.path.join(path, LORA_FILE), dataclasses.asdict(cfg))
    return path


def clear_lora_base(workdir: str) -> None:
    """Removes a LoRA base left in workdir/student_model by an earlier start (a new run begins)."""
    path = os.path.join(workdir, MODEL_DIR)
    if os.path.isfile(os.path.join(path, LORA_FILE)):
        os.remove(os.path.join(path, LORA_FILE))
    for name in os.listdir(path) if os.path.isdir(path) else ():
        if name.startswith("model") and ".safetensors" in name:
            os.remove(os.path.join(path, name))


def run_lora_config(path: str) -> LoRAConfig | None:
    """The adapters' config of the run at `path` when it trains LoRA on a saved base, else None."""
    file = os.path.join(path, MODEL_DIR, LORA_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        fields = json.load(f)
    return LoRAConfig(**{**fields, "targets": tuple(fields["targets"])})


def load_lora_base(path: str, *, dtype: str = "float32", param_dtype: str | None = None) -> Transformer:
    """The frozen base of the LoRA run at `path` (workdir/student_model), as the run saved it."""
    return load_hf(os.path.join(path, MODEL_DIR), dtype=dtype, param_dtype=param_dtype)


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
    lora = run_lora_config(path)
    if lora is not None:  # the checkpoint holds adapters: merged into the run's base
        model = add_lora(load_lora_base(path, dtype=dtype, param_dtype=param_dtype), lora, rngs=nnx.Rngs(0))
        graphdef, adapters, base = split_lora(model)
        values = _restore_train_params(path, step)
        nnx.replace_by_pure_dict(adapters, jax.tree.map(jnp.asarray, values))
        return merge_lora(nnx.merge(graphdef, adapters, base)), step
    cfg = ModelConfig.from_hf_dir(os.path.join(path, MODEL_DIR), dtype=dtype, param_dtype=param_dtype or dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    values = jax.tree.map(lambda a: jnp.asarray(a, cfg.param_dtype), _restore_train_params(path, step))
    nnx.replace_by_pure_dict(abstract, values)
    return nnx.merge(graphdef, abstract), step


def _restore_train_params(path: str, step: int) -> dict:
    """The checkpoint's train.params as a pure dict of numpy arrays in their saved dtype."""
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
    return _unwrap(restored["train"]["params"])


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _holds_checkpoint(workdir: str) -> bool:
    """Whether the workdir has a checkpoint step folder: a rerun there resumes."""
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


def check_resume_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """A workdir holding a checkpoint resumes only under the same training config (eval, log, checkpoint
    and export settings may change): otherwise the error names the first differing key."""
    saved = os.path.join(workdir, "config.json")
    if not (_holds_checkpoint(workdir) and os.path.isfile(saved)):
        return
    with open(saved) as f:
        old = _flat(ml_collections.ConfigDict(json.load(f)))
    new = _flat(cfg)
    defaults = _flat(base_config())
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_CHANGES) or key == "mode":
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # a key added to the config since the checkpoint, at its default
        if old.get(key) != new.get(key):
            raise ConfigError(key, f"{new.get(key)!r} differs from {old.get(key)!r} in the checkpoint's config "
                                   f"({saved}); resume with the same value, or start in a new workdir")


def check_bootstrap_models(workdir: str, models_sha256: str) -> None:
    """Records the hash of the bootstrap models a run starts from (workdir/bootstrap_models.json); a run
    that resumes must find the same models, not ones rebuilt or shipped since."""
    path = os.path.join(workdir, BOOTSTRAP_RECORD)
    if _holds_checkpoint(workdir) and os.path.isfile(path):
        with open(path) as f:
            started = json.load(f)["models_sha256"]
        if started != models_sha256:
            raise ConfigError("bootstrap", f"the bootstrap models now have sha256 {models_sha256[:16]}…, but this run "
                                           f"started from {started[:16]}… ({path}); resume with the same models, or "
                                           "start in a new workdir")
        return
    if jax.process_index() == 0:
        atomic_write_json(path, {"models_sha256": models_sha256})
