"""Per-device memory plan of a distillation run: what lives on each accelerator during each phase of a step,
and whether the peak fits the accelerator's memory. The command line is trd_jax/memory_plan/cli.py.

Nothing is allocated. Parameter and optimizer shapes come from ``nnx.eval_shape`` / ``jax.eval_shape`` of the
real model and optimizer, and their per-device shards from the real logical-axis rules
(sharding.logical_to_spec) on an ``AbstractMesh`` of the configured size, so a CPU with one device plans an
8-device mesh. Activations, KV caches and the fused loss are analytical formulas of the model shape
(``update_activations``, ``forward_transient``, ``kv_cache_bytes``); ``compiled_update_temp`` measures the
jitted update step of a small model with XLA's ``memory_analysis`` so that tests check the formulas.

What a step holds, in the controller's order (trd_jax/controller.py):

    persistent  student params + AdamW mu, nu + (EMA) + teacher params (OPD) or OPSD's frozen initial copy
    rollout     the student sampler's KV cache [rows, kv_heads, prompt + max_new, head_dim] per layer (rows of
                one call: rollout.max_rows_per_call), and the prefill's transients
    refine      the teacher sampler's cache [rows, kv_heads, refine prompt + rewrite budget, head_dim] per
                layer; the rollout cache is still held unless rollout.release_kv_cache freed it after rollout
    score       the teacher forward over train.max_score_rows rows at a time (no gradient) -> hidden
                [rows, R, d_teacher] of all rows, held until the update
    update      one micro-batch's activations, gradients, the fused loss's chunk buffers, AdamW temporaries

Every memory option is a config key, and ``suggest`` proposes config changes only: the attention kernel of each
model (student/teacher.attention: dense or blockwise), train.remat, rows per sampler call
(rollout.max_rows_per_call) and per scoring call (train.max_score_rows), freeing each sampler's cache as its
phase ends (rollout.release_kv_cache), bf16, the mesh and micro-batches. ``PlanOptions`` carries the ones that
are not model shapes.

Modules: hardware (accelerators), models (built-in and on-disk model shapes), workload (the run's shape and the
plan options from a config), shards (exact parameter / optimizer shards), formulas (analytical activations, KV
caches, loss), plan (make_plan), search (suggest), measure (the compiled update step, in a subprocess).
"""

from trd_jax.memory_plan.formulas import (UpdateBreakdown, decode_transient, forward_transient, full_logits_bytes,
                                          kv_cache_bytes, layer_backward, layer_residuals, layer_saved, loss_buffers,
                                          update_activations)
from trd_jax.memory_plan.hardware import ACCELERATORS, HARDWARE, Accelerator, GiB
from trd_jax.memory_plan.measure import (MEASURE_FLAGS, analytical_update_temp, compiled_update_temp,
                                         measure_in_subprocess)
from trd_jax.memory_plan.models import BUILTIN_MODELS, builtin_model, model_from_path
from trd_jax.memory_plan.plan import Item, Phase, Plan, make_plan
from trd_jax.memory_plan.search import Change, apply_change, config_changes, suggest
from trd_jax.memory_plan.shards import (StateBytes, abstract_mesh, abstract_param_shardings, abstract_params,
                                        mesh_sizes, shard_bytes, sharded_bytes, state_bytes, tree_bytes)
from trd_jax.memory_plan.workload import (KV_CACHE, ModelInfo, PlanOptions, Workload, options_from_settings,
                                          workload_from_settings)
from trd_jax.models.config import REMAT, ModelConfig  # trd_jax/memory_plan/cli.py reads them from here

__all__ = [
    "ACCELERATORS", "BUILTIN_MODELS", "HARDWARE", "KV_CACHE", "MEASURE_FLAGS", "REMAT", "Accelerator", "Change",
    "GiB", "Item", "ModelConfig", "ModelInfo", "Phase", "Plan", "PlanOptions", "StateBytes", "UpdateBreakdown",
    "Workload", "abstract_mesh", "abstract_param_shardings", "abstract_params", "analytical_update_temp",
    "apply_change", "builtin_model", "compiled_update_temp", "config_changes", "decode_transient",
    "forward_transient", "full_logits_bytes", "kv_cache_bytes", "layer_backward", "layer_residuals", "layer_saved",
    "loss_buffers", "make_plan", "measure_in_subprocess", "mesh_sizes", "model_from_path", "options_from_settings",
    "shard_bytes", "sharded_bytes", "state_bytes", "suggest", "tree_bytes", "update_activations",
    "workload_from_settings",
]
