"""Per-device memory plan of a distillation run: what lives on each accelerator during each phase of a step,
and whether the peak fits the accelerator's memory. The command line is trd_jax/tools/plan.py.

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from typing import Any
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from trd_jax.models.config import REMAT, ModelConfig
from trd_jax.models.lora import TARGETS as LORA_TARGETS, LoRAConfig, add_lora, split_lora
from trd_jax.models.transformer import Transformer
from trd_jax.sampling import bucket
from trd_jax.sharding import DEFAULT_RULES, MESH_AXES, MeshConfig, logical_to_spec, shardings_like_params
from trd_jax.steps import FULL_VOCAB_LOSSES, LossConfig, OptimConfig, make_optimizer

GiB = 2**30
_F32 = 4  # bytes of the float32 buffers the model and the loss keep whatever the compute dtype


# ------------------------------------------------------------------------------------------------
# Accelerators and known models


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    label: str
    hbm_bytes: int  # memory per device (one GPU, one TPU chip)
    note: str = ""


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    # GPUs: JAX preallocates 75% of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
    Accelerator("h100-80gb", "NVIDIA H100 80GB", 80 * GiB,
                "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95: JAX preallocates 75% of a GPU by default"),
    Accelerator("h200", "NVIDIA H200", 141 * GiB, "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"),
    Accelerator("a100-80gb", "NVIDIA A100 80GB", 80 * GiB, "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"),
    Accelerator("a100-40gb", "NVIDIA A100 40GB", 40 * GiB, "set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"),
    Accelerator("v4", "TPU v4", 32 * GiB),
    Accelerator("v5p", "TPU v5p", 95 * GiB),
    Accelerator("v5e", "TPU v5e", 16 * GiB),
    Accelerator("v6e", "TPU v6e (Trillium)", 32 * GiB),
)}

# configs/qwen3.py's HARDWARE names -> (accelerator, devices of the mesh).
HARDWARE: dict[str, tuple[str, int]] = {"h100x8": ("h100-80gb", 8), "v5p-8": ("v5p", 4), "v5e-16": ("v5e", 16)}

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
              num_key_value_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960)
# Hugging Face config.json fields of the models the recipes name, read through ModelConfig.from_hf_dict like a
# local folder's (checked against the published config.json files: Qwen3-8B has 8.19B parameters, 6.95B
# without its two embedding matrices).
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192),
}


def builtin_model(name: str, *, dtype: str = "float32", param_dtype: str = "float32") -> ModelConfig:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    return ModelConfig.from_hf_dict(BUILTIN_MODELS[name], source=f"built-in {name}", dtype=dtype,
                                    param_dtype=param_dtype)


def model_from_path(path: str, *, dtype: str, param_dtype: str) -> ModelConfig:
    """A local config.json, a Hugging Face folder, or a trd_jax run's workdir (its student_model folder)."""
    if os.path.isfile(path):
        with open(path) as f:
            return ModelConfig.from_hf_dict(json.load(f), source=path, dtype=dtype, param_dtype=param_dtype)
    for folder in (path, os.path.join(path, "student_model")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return ModelConfig.from_hf_dir(folder, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"{path}: no config.json (expected a Hugging Face folder or a config.json file)")


# ------------------------------------------------------------------------------------------------
# Options: the config settings that decide memory besides the model shapes


KV_CACHE = ("replicated", "sharded")


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """Everything but the workload and the model shapes (whose ModelConfig.attention picks the kernel) that
    decides memory; options_from_settings reads them from a run config."""

    # Rematerialisation of each decoder layer in the update's backward pass: the config's train.remat
    # (ModelConfig.remat, transformer.py). "none": every activation kept. "full": nnx.remat per layer, only the
    # layer input is saved. "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, which saves the
    # projection matmuls' outputs and recomputes attention (plain dots_saveable would also keep the
    # [heads, T, S] score matrices, the very thing remat should drop).
    remat: str = "none"
    # Sampler KV caches: "sharded" splits rows over (data, fsdp) and kv heads over tensor (Sampler, where they
    # divide the rows of a call); "replicated": every device holds every row (Sampler(shard_cache=False)).
    kv_cache: str = "sharded"
    sampler_rows: int = 0  # rollout.max_rows_per_call: rows per sampler call; 0: all of a call's rows at once
    score_rows: int = 0  # train.max_score_rows: rows per scoring forward; 0: all of a step's rows at once
    # The config's lora section (models/lora.py), None: full fine-tuning. Under LoRA the student's base is frozen
    # and shared with OPSD's initial teacher (no copy); gradients, AdamW moments and the EMA exist for the
    # adapters only.
    lora: LoRAConfig | None = None
    headroom: float = 0.10  # fraction of the accelerator kept free for the runtime, fragmentation, code

    def __post_init__(self):
        for name, valid in (("remat", REMAT), ("kv_cache", KV_CACHE)):
            if getattr(self, name) not in valid:
                raise ValueError(f"PlanOptions.{name}={getattr(self, name)!r}: expected one of {valid}")
        if self.sampler_rows < 0 or self.score_rows < 0:
            raise ValueError("PlanOptions.sampler_rows and score_rows must be >= 0")


def options_from_settings(s, **overrides) -> PlanOptions:
    """The PlanOptions a run config (config.Settings) sets; `overrides`: PlanOptions fields."""
    fields = dict(remat=s.remat, sampler_rows=s.max_rows_per_call, score_rows=s.max_score_rows, lora=s.lora)
    return PlanOptions(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------------
# Mesh and exact parameter / optimizer shards


def mesh_sizes(mesh: MeshConfig, devices: int | None) -> dict[str, int]:
    """Axis sizes of the mesh, -1 resolved against `devices` (as sharding.make_mesh does)."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        if devices is None:
            raise ValueError(f"mesh.{free[0]}=-1 takes the remaining devices: give the device count")
        if devices % fixed:
            raise ValueError(f"{devices} devices are not divisible by the fixed mesh axes' product {fixed}")
        sizes[free[0]] = devices // fixed
    elif devices is not None and fixed != devices:
        raise ValueError(f"mesh data*fsdp*tensor = {fixed} but {devices} devices were given")
    return sizes


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def abstract_params(cfg: ModelConfig):
    """(graphdef, nnx.State of ShapeDtypeStructs): the model's parameters without allocating them."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def abstract_param_shardings(state, mesh, rules=DEFAULT_RULES):
    """sharding.param_shardings for an abstract state (it reads shapes from the value's ShapeDtypeStruct,
    because an abstract Variable cannot be indexed)."""

    def one(variable: nnx.Variable) -> NamedSharding:
        shape = variable.get_value().shape
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs placed with these shardings (the largest
    shard where a dimension does not divide evenly)."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != len(shards):
        raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings")
    return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x, s in zip(leaves, shards))


def sharded_bytes(shape: tuple[int, ...], axes: tuple[str | None, ...], sizes: dict[str, int], itemsize: int) -> int:
    """Bytes per device of one array with these logical axes under the default rules."""
    mesh = abstract_mesh(sizes)
    return math.prod(NamedSharding(mesh, logical_to_spec(axes, shape, mesh)).shard_shape(shape)) * itemsize


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """One model's persistent state on one device (and in total), from eval_shape and the sharding rules."""

    num_params: int
    params: int  # per device
    params_total: int
    optimizer: int  # AdamW mu + nu (+ counters) per device; 0 for a frozen model
    optimizer_dtypes: tuple[str, ...]
    layer_params: int  # per device, one decoder layer (what an FSDP all-gather of one layer brings in, /shards)
    layer_params_total: int
    # What gets gradients and optimizer state: every parameter, or under LoRA the adapters alone (float32),
    # which `params` then includes beside the frozen base (`num_params` stays the model's own count).
    trainable_params: int = 0
    trainable: int = 0  # per device


@functools.lru_cache(maxsize=32)
def state_bytes(cfg: ModelConfig, sizes: tuple[tuple[str, int], ...], trainable: bool,
                lora: LoRAConfig | None = None) -> StateBytes:
    mesh = abstract_mesh(dict(sizes))
    _, params, frozen = _abstract_split(cfg, lora if trainable else None)
    shardings = abstract_param_shardings(params, mesh)
    opt_bytes, opt_dtypes = 0, ()
    if trainable:
        # make_optimizer's AdamW: mu and nu take the parameters' dtype (optax's mu_dtype=None), so a bfloat16
        # model has bfloat16 moments; eval_shape tells rather than assuming.
        optimizer = make_optimizer(OptimConfig())
        opt_state = jax.eval_shape(optimizer.init, params)
        opt_bytes = shard_bytes(opt_state, shardings_like_params(opt_state, params, shardings, mesh))
        opt_dtypes = tuple(sorted({jnp.dtype(x.dtype).name for x in jax.tree.leaves(opt_state)}))
    trained = shard_bytes(params, shardings) if trainable else 0
    trained_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params)) if trainable else 0
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params if frozen is None else frozen))
    if frozen is not None:  # all the weights a device holds: the frozen base and the adapters
        params = nnx.merge_state(frozen, params)
        shardings = abstract_param_shardings(params, mesh)
    layer = params["layers"][0]
    return StateBytes(num_params=num_params,
                      params=shard_bytes(params, shardings), params_total=tree_bytes(params),
                      optimizer=opt_bytes, optimizer_dtypes=opt_dtypes,
                      layer_params=shard_bytes(layer, abstract_param_shardings(layer, mesh)),
                      layer_params_total=tree_bytes(layer), trainable_params=trained_params, trainable=trained)


# ------------------------------------------------------------------------------------------------
# Analytical activations
#
# Counting convention: a decoder layer on `tokens` positions (rows x length) and `entries` attention scores
# (rows x heads x T x S). b is the compute dtype's size. Without remat, autodiff keeps per layer:
#   b x tokens x (x, normed x: 2d | q, k, v before and after qk-norm / rope: 2(H + 2K)hd | attention
#                 output: H hd | residual and normed x: 2d | gate, up, silu(gate) * up: 3m)
#   entries x (f32 softmax output + its compute-dtype cast, which the p @ v backward reads): 4 + b
# and the backward of one layer adds its cotangents: b x tokens x (2d + (H + 2K)hd + 2m) and two f32
# score-sized buffers (d probs, d scores). Against XLA:CPU's compiled update step (memory-minimising
# scheduler, tests/test_plan.py) this lands within -7% / +16% on small models for remat none and full, and
# overestimates dots by up to 40% on the smallest ones (conservative); TPU and GPU fuse at least as well.


def _b(cfg: ModelConfig) -> int:
    return jnp.dtype(cfg.dtype).itemsize


def _tile(cfg: ModelConfig, rows: int, queries: int, keys: int) -> int:
    """Score entries of one blockwise tile: rows x heads x block_q x block_k."""
    return rows * cfg.num_heads * min(cfg.attention_block, queries) * min(cfg.attention_block, keys)


def layer_residuals(cfg: ModelConfig, tokens: int, entries: int) -> int:
    """Bytes autodiff keeps for the backward pass of one layer without remat."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    per_token = b * (4 * d + 2 * (h + 2 * k) * hd + h * hd + 3 * m)
    if cfg.attention == "blockwise":  # the custom VJP saves the output (counted above) and a f32 log-sum-exp
        return tokens * (per_token + _F32 * h)
    return tokens * per_token + entries * (_F32 + b)


def layer_saved(cfg: ModelConfig, tokens: int, entries: int, remat: str) -> int:
    """Bytes kept per layer between the forward and the backward pass under a remat policy."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    if remat == "none":
        return layer_residuals(cfg, tokens, entries)
    if remat == "full":  # the layer input only
        return tokens * b * d
    # dots: the input and the outputs of the matmuls without batch dimensions that the backward reads: q, k,
    # v, o_proj (the residual x + attn is recomputed from it), gate and up (down_proj's output only feeds an
    # add, whose backward does not read it)
    return tokens * b * (2 * d + (h + 2 * k) * hd + 2 * m)


def layer_backward(cfg: ModelConfig, tokens: int, entries: int, remat: str, tile: int = 0) -> int:
    """Transient bytes of one layer's backward: cotangents, plus the recomputed residuals under remat. `tile`:
    score entries of one blockwise tile (the backward holds scores, p, dp and ds of one tile, and f32 dq, dk,
    dv accumulators)."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    work = tokens * b * (2 * d + (h + 2 * k) * hd + 2 * m)
    if cfg.attention == "dense":
        work += entries * 2 * _F32
    else:
        work += tile * 4 * _F32 + tokens * _F32 * (h + 2 * k) * hd
    recompute = 0 if remat == "none" else layer_residuals(cfg, tokens, entries) - layer_saved(
        cfg, tokens, entries, remat)
    return work + max(recompute, 0)


def forward_transient(cfg: ModelConfig, rows: int, length: int, keys: int | None = None) -> int:
    """Peak bytes of a forward pass without gradient (score, prefill) over rows x length tokens attending to
    `keys` slots (default length): the widest layer's live set plus the model-level arrays."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    keys = length if keys is None else keys
    tokens = rows * length
    live = tokens * b * (2 * d + 2 * (h + 2 * k) * hd + h * hd)
    if cfg.attention == "blockwise":  # log-sum-exp per query, one tile's scores / probabilities and accumulator
        attn = tokens * _F32 * h + _tile(cfg, rows, length, keys) * 3 * _F32
    else:
        attn = rows * h * length * keys * (2 * _F32 + b)
    mlp = tokens * b * 3 * m
    return live + max(attn, mlp) + _model_level(cfg, rows, length, keys)


def _model_level(cfg: ModelConfig, rows: int, length: int, keys: int) -> int:
    """Embeddings, residual stream, final norm, rope tables and (dense) the boolean mask [rows, T, S]."""
    tokens = rows * length
    mask = rows * length * keys if cfg.attention == "dense" else 0
    return tokens * (3 * cfg.hidden_size * _b(cfg) + cfg.head_dim * _F32) + mask


def loss_buffers(student: ModelConfig, teacher_hidden: int, rows: int, response: int, loss: LossConfig) -> int:
    """The fused loss (losses._fused_terms) on rows x response positions: per chunk two f32 [chunk, vocab tile]
    logits (student, teacher; XLA:CPU measures 1.5 at chunk 1024), the f32 [d, V] head gradient it sums
    into, and the chunked copies of both hidden states and of the hidden gradient."""
    width = student.vocab_size if loss.vocab_chunk is None else min(loss.vocab_chunk, student.vocab_size)
    positions = rows * response
    chunk = min(loss.chunk_size, positions)
    b = _b(student)
    logits = (2 if loss.name in FULL_VOCAB_LOSSES else 1) * chunk * width * _F32 + chunk * width * b
    head_grad = student.hidden_size * student.vocab_size * _F32
    if loss.name == "reverse_kl_topk":  # gathers student head columns from a float32 copy of the head
        head_grad *= 2
    hidden = positions * b * (2 * student.hidden_size + teacher_hidden)
    return logits + head_grad + hidden


def full_logits_bytes(vocab: int, rows: int, response: int) -> int:
    """One unfused f32 [rows, R, V] logits array (an unfused loss holds several: both models' logits and
    their log-softmax)."""
    return rows * response * vocab * _F32


@dataclasses.dataclass(frozen=True)
class UpdateBreakdown:
    """One device's transient bytes of the update step for one micro-batch (on top of its arguments)."""

    saved: int  # all layers' saved activations
    layer_backward: int  # one layer's backward working set
    model_level: int
    loss: int  # fused loss working set (chunk buffers, head gradient, hidden chunks)
    gradients: int  # the accumulator carried across micro-batches + this micro-batch's gradient
    optimizer: int  # AdamW's temporaries after the micro-batch scan
    gathered: int  # FSDP / tensor all-gathers: two layers' weights and the student and teacher heads

    @property
    def activations(self) -> int:
        """Peak of the backward pass: saved activations, gradients, then the larger of the loss's working set
        (the loss runs after the forward pass) and one layer's backward."""
        return self.saved + self.model_level + self.gradients + self.gathered + max(self.loss, self.layer_backward)

    @property
    def total(self) -> int:
        return max(self.activations, self.gradients + self.optimizer)


def update_activations(student: ModelConfig, *, rows: int, context: int, response: int, loss: LossConfig,
                       teacher_hidden: int, params_bytes: int, remat: str = "none",
                       gathered: int = 0) -> UpdateBreakdown:
    """Analytical transient memory of steps.update for one micro-batch of `rows` rows on one device, each
    context + response tokens; `params_bytes`: the student's parameters per device."""
    length = context + response
    tokens, entries = rows * length, rows * student.num_heads * length * length
    return UpdateBreakdown(
        saved=student.num_layers * layer_saved(student, tokens, entries, remat),
        layer_backward=layer_backward(student, tokens, entries, remat, _tile(student, rows, length, length)),
        model_level=_model_level(student, rows, length, length),
        loss=loss_buffers(student, teacher_hidden, rows, response, loss),
        gradients=2 * params_bytes,
        # clipping scales, adam's new moments and the update before they alias into the donated state
        optimizer=2 * params_bytes,
        gathered=gathered)


def kv_cache_bytes(cfg: ModelConfig, rows: int, length: int, *, kv_shards: int = 1) -> int:
    """init_cache: per layer k and v [rows, kv_heads, length, head_dim] in the compute dtype."""
    heads = cfg.num_kv_heads // kv_shards if cfg.num_kv_heads % kv_shards == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * rows * heads * length * cfg.head_dim * _b(cfg)


def decode_transient(cfg: ModelConfig, rows: int, lm_head_per_device: int) -> int:
    """Per decode step: f32 logits and select_tokens' vocabulary-wide temporaries (tempered logits, weights,
    ordered keys, filter masks: about six [rows, V] buffers), plus the lm_head the loop carries."""
    return 6 * rows * cfg.vocab_size * _F32 + lm_head_per_device


# ------------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    items: tuple[Item, ...]

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    config: ModelConfig
    source: str  # where the shape came from: a path, a built-in name, the config's random shape


@dataclasses.dataclass(frozen=True)
class Workload:
    """The run's shape: everything of the config that decides memory."""

    mode: str  # opd | opsd
    trajectory: str  # y_r | y_o
    teacher_context: str
    opsd_teacher: str  # initial | live | ema
    rows: int  # rows per step: batch_size * n
    batch_size: int
    n: int
    micro_batches: int
    prompt: int  # bucketed prompt width (sampler and student layout)
    max_new: int  # bucketed rollout budget
    refine_prompt: int  # bucketed refine-prompt budget
    rewrite: int  # bucketed rewrite budget
    response: int  # bucketed response width of the distill layouts
    teacher_ctx: int  # bucketed teacher context width
    eval_rows: int  # rows of one eval sampler call
    eval_n: int  # samples per eval prompt (the prefill repeats each prompt's cache n times)
    eval_prompt: int
    eval_new: int
    eval_teacher: bool  # the teacher is evaluated once before training, on the refine sampler
    teacher_eval_ctx: int  # bucketed vanilla context of the teacher's evaluation
    release_kv_cache: bool
    diagnostics: bool
    loss: LossConfig
    notes: tuple[str, ...] = ()


def workload_from_settings(s) -> Workload:
    """From config.Settings (the validated config). Widths are the worst case the budgets allow, bucketed the
    way the sampler and layouts.distill_batch bucket them."""
    notes = []
    prompt = bucket(s.max_prompt_tokens, 16)
    max_new = bucket(s.rollout_max_new, 8)
    refine_prompt = bucket(s.refine.prompt_budget, 16)
    rewrite = bucket(s.refine.rewrite_budget, 8)
    fallback = "fallback" in (s.refine.on_prompt_over_budget, s.refine.on_empty_rewrite, s.refine.on_capped_rewrite)
    if s.trajectory == "y_r":
        response = bucket(max(s.refine.rewrite_budget, s.rollout_max_new if fallback else 0), 8)
    else:
        response = max_new
    if s.teacher_context == "refine" and s.trajectory == "y_r":
        teacher_ctx = refine_prompt
    elif s.mode == "opd":
        teacher_ctx = prompt
    else:
        teacher_ctx = refine_prompt
        notes.append("OPSD's vanilla teacher context x + y* has no budget of its own: bounded by "
                     "refine.prompt_budget")
    rows = s.batch_size * s.rollout_n
    eval_rows = bucket(s.batch_size) * s.eval_n  # evaluate() samples batch_size prompts per call
    return Workload(mode=s.mode, trajectory=s.trajectory, teacher_context=s.teacher_context,
                    opsd_teacher=s.opsd_teacher, rows=rows, batch_size=s.batch_size, n=s.rollout_n,
                    micro_batches=s.micro_batches, prompt=prompt, max_new=max_new, refine_prompt=refine_prompt,
                    rewrite=rewrite, response=response, teacher_ctx=teacher_ctx, eval_rows=eval_rows,
                    eval_n=s.eval_n,
                    eval_prompt=prompt, eval_new=bucket(s.eval_max_new, 8),
                    eval_teacher=s.eval_teacher,
                    teacher_eval_ctx=prompt if s.mode == "opd" else refine_prompt,
                    release_kv_cache=s.release_kv_cache, diagnostics=s.diagnostics, loss=s.loss, notes=tuple(notes))


@dataclasses.dataclass(frozen=True)
class Plan:
    workload: Workload
    models: dict[str, ModelInfo]
    mesh: dict[str, int]
    accelerator: Accelerator
    options: PlanOptions
    student_state: StateBytes
    teacher_state: StateBytes | None
    persistent: tuple[Item, ...]
    phases: tuple[Phase, ...]
    update: UpdateBreakdown
    micro_rows_per_device: int
    warnings: tuple[str, ...]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def persistent_bytes(self) -> int:
        return sum(i.bytes for i in self.persistent)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_bytes(self) -> int:
        return self.persistent_bytes + self.peak_phase.bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.accelerator.hbm_bytes * (1.0 - self.options.headroom))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes and not self.errors

    @property
    def errors(self) -> tuple[str, ...]:
        return tuple(w for w in self.warnings if w.startswith("error:"))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def make_plan(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int], accelerator: Accelerator,
              options: PlanOptions = PlanOptions()) -> Plan:
    """Per-device bytes of every phase of a step (see the module docstring)."""
    student = models["student"].config
    teacher = models["teacher"].config if "teacher" in models else student
    sizes = tuple(sorted(mesh.items()))
    batch_shards = mesh["data"] * mesh["fsdp"]
    param_shards = mesh["fsdp"] * mesh["tensor"]
    warnings: list[str] = []

    s_state = state_bytes(student, sizes, True, options.lora)
    t_state = state_bytes(teacher, sizes, False) if work.mode == "opd" else None

    # ---- persistent
    moments = f"AdamW mu + nu in {'/'.join(d for d in s_state.optimizer_dtypes if d != 'int32')}"
    if options.lora is None:
        persistent = [Item("student parameters", s_state.params, f"{s_state.num_params:,} x {student.param_dtype}"),
                      Item("optimizer state", s_state.optimizer, f"{moments} (make_optimizer: the parameters' dtype)")]
    else:
        r = options.lora
        persistent = [Item("student base parameters (frozen)", s_state.params - s_state.trainable,
                           f"{s_state.num_params:,} x {student.param_dtype}"),
                      Item("LoRA adapters", s_state.trainable, f"{s_state.trainable_params:,} x float32, r={r.rank} "
                                                               f"on {','.join(r.targets)}"),
                      Item("optimizer state", s_state.optimizer, f"{moments}, adapters only")]
    if work.mode == "opsd" and work.opsd_teacher == "ema":
        if options.lora is None:
            ema = s_state.params * _F32 // jnp.dtype(student.param_dtype).itemsize
        else:
            ema = s_state.trainable
        persistent.append(Item("EMA of the parameters", ema, "float32 (init_state), sharded like the parameters"
                               + (" (adapters only)" if options.lora else "")))
    if work.mode == "opd":
        persistent.append(Item("teacher parameters", t_state.params,
                               f"{t_state.num_params:,} x {teacher.param_dtype}"))
    elif work.opsd_teacher == "initial":
        # Under LoRA the teacher is the student's frozen base with the adapters off: the same buffers.
        copy = 0 if options.lora else s_state.params
        persistent.append(Item("OPSD frozen initial copy", copy, "none: the student's frozen base, adapters off"
                               if options.lora else "init_state copies the parameters; 0 with LoRA (lora.enabled)"))
    if work.mode == "opd" or work.opsd_teacher == "initial":
        # controller.fixed_head = the jitted lm_head_weight(): the transposed embedding when tied, and a copy of
        # lm_head otherwise (jit returns a new buffer even when the output is its input), sharded like it.
        tied = teacher.tie_word_embeddings
        head = sharded_bytes((teacher.hidden_size, teacher.vocab_size), ("embed", "vocab"), mesh, _b(teacher))
        persistent.append(Item("teacher lm_head (fixed_head)", head,
                               "transposed tied embedding" if tied else "a copy of lm_head"))

    # ---- sampler caches
    kv_rows_div = batch_shards if options.kv_cache == "sharded" else 1
    kv_heads_div = mesh["tensor"] if options.kv_cache == "sharded" else 1

    def call_rows(rows: int) -> int:
        per_call = min(rows, options.sampler_rows) if options.sampler_rows else rows
        if options.kv_cache == "sharded" and per_call % batch_shards:
            per_call = _ceil_div(per_call, batch_shards) * batch_shards  # padded to the batch shards
        return per_call

    def cache(cfg: ModelConfig, rows: int, length: int) -> int:
        return kv_cache_bytes(cfg, _ceil_div(call_rows(rows), kv_rows_div), length, kv_shards=kv_heads_div)

    def sampler_transient(cfg: ModelConfig, rows: int, prompt: int, n: int) -> list[Item]:
        """prefill: one forward over the prompts (and, unless it writes the full cache directly, a prompt-sized
        cache of its own); decode: vocab buffers."""
        per_device_rows = _ceil_div(call_rows(rows), kv_rows_div)
        prompt_rows = max(1, per_device_rows // n)
        head = sharded_bytes((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), mesh, _b(cfg))
        direct = n == 1 and cfg.attention == "blockwise"  # sampling.prefill writes into the full cache
        prompt_cache = 0 if direct else kv_cache_bytes(cfg, prompt_rows, prompt, kv_shards=kv_heads_div)
        prefill = prompt_cache + forward_transient(cfg, prompt_rows, prompt)
        label = "prefill (one forward)" if direct else "prefill (prompt cache + one forward)"
        return [Item(label, prefill, f"{prompt_rows} prompts x {prompt} tokens"),
                Item("decode temporaries", decode_transient(cfg, per_device_rows, head))]

    rollout_cache = cache(student, work.rows, work.prompt + work.max_new)
    refine_cache = cache(teacher, work.rows, work.refine_prompt + work.rewrite) if work.trajectory == "y_r" else 0
    eval_cache = cache(student, work.eval_rows, work.eval_prompt + work.eval_new)
    teacher_eval_cache = cache(teacher, work.eval_rows, work.teacher_eval_ctx + work.eval_new)
    cache_note = ("replicated: every device holds every row" if options.kv_cache == "replicated"
                  else f"rows over {batch_shards} (data, fsdp) shards")
    rows_note = f"{call_rows(work.rows)} rows per call"

    # Which caches are still held in each phase (controller.train_step / evaluate). Evaluations free their
    # caches when they end; rollout.release_kv_cache frees the rollout cache after rollout and the refine cache
    # after refine, and without it both stay allocated between steps.
    keep_between_steps = not work.release_kv_cache

    phases = []
    rollout = [Item("rollout KV cache (student)", rollout_cache,
                    f"{rows_note} x ({work.prompt} + {work.max_new}), {cache_note}")]
    rollout += sampler_transient(student, work.rows, work.prompt, work.n)
    if keep_between_steps and refine_cache:
        rollout.append(Item("refine KV cache (held from the last step)", refine_cache))
    phases.append(Phase("rollout", tuple(rollout)))

    if work.trajectory == "y_r":
        refine = [Item("refine KV cache (teacher)", refine_cache,
                       f"{rows_note} x ({work.refine_prompt} + {work.rewrite}), {cache_note}")]
        refine += sampler_transient(teacher, work.rows, work.refine_prompt, 1)
        if keep_between_steps:
            refine.append(Item("rollout KV cache (held: release_kv_cache=False)", rollout_cache))
        phases.append(Phase("refine", tuple(refine)))

    held_after = []
    if keep_between_steps:
        held_after = [Item("rollout KV cache (kept: release_kv_cache=False)", rollout_cache)]
        if refine_cache:
            held_after.append(Item("refine KV cache (kept: release_kv_cache=False)", refine_cache))

    # ---- score: the teacher forward over all rows (or score_rows at a time)
    t_gather = (2 * (t_state or s_state).layer_params_total // max(1, mesh["tensor"]) if param_shards > 1 else 0)
    s_gather = 2 * s_state.layer_params_total // max(1, mesh["tensor"]) if param_shards > 1 else 0
    score_rows_total = min(work.rows, options.score_rows) if options.score_rows else work.rows
    score_rows = _ceil_div(score_rows_total, batch_shards)
    rows_dev = _ceil_div(work.rows, batch_shards)
    scored = rows_dev * work.response * (teacher.hidden_size * _b(teacher) + _F32)
    score_loss = LossConfig(name="k3", chunk_size=work.loss.chunk_size, vocab_chunk=work.loss.vocab_chunk)
    t_head_full = teacher.hidden_size * teacher.vocab_size * _b(teacher) if param_shards > 1 else 0
    score = [Item("teacher forward (no gradient)",
                  forward_transient(teacher, score_rows, work.teacher_ctx + work.response),
                  f"{score_rows} rows x ({work.teacher_ctx} + {work.response}) per device"),
             Item("token log-probs (fused, one chunk)", loss_buffers(teacher, 0, score_rows, work.response,
                                                                     score_loss) - teacher.hidden_size *
                  teacher.vocab_size * _F32),  # forward only: no head gradient
             Item("gathered weights (2 layers + lm_head)", t_gather + t_head_full),
             Item("ScoreOutput (hidden + logp, all rows)", scored, f"[rows, {work.response}, "
                                                                    f"{teacher.hidden_size}] {teacher.dtype}")]
    if score_rows < rows_dev:  # a group's output until row_groups writes it into the ScoreOutput
        score.append(Item("one group's output", scored * score_rows // rows_dev,
                          f"train.max_score_rows={options.score_rows}"))
    phases.append(Phase("score", tuple(score + held_after)))

    if work.diagnostics:
        # _diagnostics: the student scored on all rows, and for TRD the teacher again on y_o's vanilla layout.
        vanilla_ctx = work.prompt if work.mode == "opd" else work.teacher_ctx
        student_fwd = forward_transient(student, score_rows, work.prompt + work.response)
        teacher_fwd = (forward_transient(teacher, score_rows, vanilla_ctx + work.max_new)
                       if work.trajectory == "y_r" else 0)
        diag = [Item("diagnostics forwards (student; teacher on y_o)", max(student_fwd, teacher_fwd),
                     "log.diagnostics"),
                Item("ScoreOutputs (trained batch + y_o batch)", 2 * scored),
                Item("gathered weights (2 layers + lm_head)", t_gather + t_head_full)]
        phases.append(Phase("diagnostics", tuple(diag + held_after)))

    # ---- update: one micro-batch
    micro_rows = work.rows // work.micro_batches
    if work.rows % work.micro_batches:
        warnings.append(f"error: train.micro_batches={work.micro_batches} does not divide {work.rows} rows")
    if micro_rows % batch_shards:
        warnings.append(f"error: a micro-batch of {micro_rows} rows does not split over the {batch_shards} "
                        "(data, fsdp) devices (to_micro_batches would fail): lower train.micro_batches")
    micro_dev = max(1, _ceil_div(micro_rows, batch_shards))
    s_head_full = student.hidden_size * student.vocab_size * _b(student) if param_shards > 1 else 0
    # Gradients and AdamW temporaries exist for the trainable parameters (LoRA: the adapters). The activations
    # are the full model's (XLA:CPU measures LoRA's at 0.6-1.1x full fine-tuning's: conservative).
    update = update_activations(student, rows=micro_dev, context=work.prompt, response=work.response,
                                loss=work.loss, teacher_hidden=teacher.hidden_size, params_bytes=s_state.trainable,
                                remat=options.remat,
                                gathered=s_gather + s_head_full + t_head_full)
    batch_arrays = rows_dev * ((work.prompt + work.response) * (4 + 4 + 1) + work.response * (4 + 1 + 4))
    upd = [Item("update transients (one micro-batch)", update.total,
                f"{micro_dev} rows x ({work.prompt} + {work.response}) per device, remat {options.remat}"),
           Item("ScoreOutput (held from score)", scored),
           Item("batch arrays (tokens, positions, masks, targets)", batch_arrays)]
    phases.append(Phase("update", tuple(upd + held_after)))

    # ---- evaluation (between steps): the student's eval sampler; its cache is freed when it ends
    ev = [Item("eval KV cache (student)", eval_cache, f"{call_rows(work.eval_rows)} rows per call x "
                                                      f"({work.eval_prompt} + {work.eval_new}), {cache_note}")]
    ev += sampler_transient(student, work.eval_rows, work.eval_prompt, work.eval_n)
    ev += held_after
    phases.append(Phase("eval", tuple(ev)))
    if work.eval_teacher:  # once, before training: the refine sampler on the vanilla contexts
        phases.append(Phase("teacher eval", tuple(
            [Item("teacher eval KV cache", teacher_eval_cache, f"{call_rows(work.eval_rows)} rows per call x "
                                                              f"({work.teacher_eval_ctx} + {work.eval_new})")]
            + sampler_transient(teacher, work.eval_rows, work.teacher_eval_ctx, work.eval_n))))

    return Plan(workload=work, models=models, mesh=mesh, accelerator=accelerator, options=options,
                student_state=s_state, teacher_state=t_state, persistent=tuple(persistent), phases=tuple(phases),
                update=update, micro_rows_per_device=micro_dev, warnings=tuple(warnings))


# ------------------------------------------------------------------------------------------------
# What to change when it does not fit
#
# Every change is a config change. The simple ones come first (each kept only if it lowers the peak): free the
# sampler caches as their phases end, bf16, everything over fsdp, one row per device per micro-batch, smaller
# loss chunks. Then the combinations of train.remat, blockwise attention and rows per sampler / scoring call are
# searched exhaustively (a few hundred plans of arithmetic) for the one that fits with the least throughput
# lost: fewest halvings of the rows per call, least recomputation, dense attention where it fits; then the
# lowest peak.


@dataclasses.dataclass(frozen=True)
class Change:
    """One proposed change: config overrides (dotted keys, as --config.KEY=VALUE takes them)."""

    label: str
    config: tuple[tuple[str, Any], ...] = ()


_ROWS_PER_DEVICE = (64, 32, 16, 8, 4, 2, 1)
_BLOCKWISE = (("student.attention", "blockwise"), ("teacher.attention", "blockwise"))


def config_changes(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int]) -> list[Change]:
    """Config changes that could lower memory, each only where it would change something."""
    out: list[Change] = []
    batch_shards = mesh["data"] * mesh["fsdp"]
    if not work.release_kv_cache:
        out.append(Change("free each sampler cache when its phase ends", (("rollout.release_kv_cache", True),)))
    for side, info in models.items():
        cfg = info.config
        if cfg.dtype != "bfloat16" or cfg.param_dtype != "bfloat16":
            out.append(Change(f"bf16 {side} parameters and compute",
                              ((f"{side}.dtype", "bfloat16"), (f"{side}.param_dtype", "bfloat16"))))
    if mesh["data"] > 1 or mesh["tensor"] > 1:
        out.append(Change("shard everything over fsdp", (("mesh.data", 1), ("mesh.fsdp", math.prod(mesh.values())),
                                                         ("mesh.tensor", 1))))
    most = work.rows // batch_shards  # one row per device per micro-batch
    if work.micro_batches < most and work.rows % most == 0:
        out.append(Change("one row per device per micro-batch", (("train.micro_batches", most),)))
    if work.loss.chunk_size > 256:
        out.append(Change("smaller loss chunks", (("loss.chunk_size", 256),)))
    return out


def apply_change(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int], options: PlanOptions,
                 change: Change) -> tuple[Workload, dict[str, ModelInfo], dict[str, int], PlanOptions]:
    for key, value in change.config:
        section, _, field = key.partition(".")
        if section in ("student", "teacher"):  # OPSD has no teacher model: its keys change nothing
            if section in models:
                info = models[section]
                models = {**models, section: dataclasses.replace(info, config=info.config.replace(**{field: value}))}
        elif key == "rollout.release_kv_cache":
            work = dataclasses.replace(work, release_kv_cache=value)
        elif key == "train.micro_batches":
            work = dataclasses.replace(work, micro_batches=value)
        elif key == "loss.chunk_size":
            work = dataclasses.replace(work, loss=dataclasses.replace(work.loss, chunk_size=value))
        elif key == "train.remat":
            options = dataclasses.replace(options, remat=value)
        elif key == "rollout.max_rows_per_call":
            options = dataclasses.replace(options, sampler_rows=value)
        elif key == "train.max_score_rows":
            options = dataclasses.replace(options, score_rows=value)
        elif section == "mesh":
            mesh = {**mesh, field: value}
        else:
            raise ValueError(f"apply_change: {key} is not modelled")
    return work, models, mesh, options


def _fewer_rows(current: int, shards: int, rows: int) -> list[int]:
    """Rows per call below `current` (0: all rows), a whole number per device."""
    return [r * shards for r in _ROWS_PER_DEVICE if r * shards < rows and (not current or r * shards < current)]


def _search_space(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int],
                  start: PlanOptions) -> Iterable[list[Change]]:
    """Every combination of remat, blockwise attention and rows per sampler / scoring call at least as lean as
    `start`, as the config changes that make it (the first: none)."""
    batch_shards = mesh["data"] * mesh["fsdp"]
    shards = batch_shards if start.kv_cache == "sharded" else 1
    remats = ("none", "dots", "full")[("none", "dots", "full").index(start.remat):]  # by decreasing memory
    dense = any(info.config.attention == "dense" for info in models.values())
    samplers = [start.sampler_rows] + _fewer_rows(start.sampler_rows, shards, work.rows)
    scores = [start.score_rows] + _fewer_rows(start.score_rows, batch_shards, work.rows)
    for remat in remats:
        for blockwise in (False, True) if dense else (False,):
            for sampler in dict.fromkeys(samplers):
                for score in dict.fromkeys(scores):
                    changes = []
                    if blockwise:
                        changes.append(Change("blockwise (flash) attention", _BLOCKWISE))
                    if sampler != start.sampler_rows:
                        changes.append(Change(f"sample {sampler} rows per call",
                                              (("rollout.max_rows_per_call", sampler),)))
                    if score != start.score_rows:
                        changes.append(Change(f"score {score} rows per call", (("train.max_score_rows", score),)))
                    if remat != start.remat:
                        changes.append(Change(f"remat each decoder layer ({remat})", (("train.remat", remat),)))
                    yield changes


def _throughput_cost(work: Workload, mesh: dict[str, int], options: PlanOptions, changes: list[Change],
                     plan: Plan) -> tuple:
    """Throughput lost: one point per halving of the rows a device samples per call, half a point per halving
    of the rows it scores per call, the recomputation of remat (full 1, dots 0.5) and a quarter point for
    blockwise attention where dense would fit (plain-JAX tiles are slower than a fused kernel); ties: the lower
    peak."""
    rows, batch_shards = work.rows, mesh["data"] * mesh["fsdp"]
    ideal = rows / batch_shards
    sampler = (options.sampler_rows or rows) / batch_shards
    score = (options.score_rows or rows) / batch_shards
    recompute = {"none": 0.0, "dots": 0.5, "full": 1.0}[options.remat]
    blockwise = 0.25 if any(c.config == _BLOCKWISE for c in changes) else 0.0
    return (math.log2(ideal / sampler) + 0.5 * math.log2(ideal / score) + recompute + blockwise, plan.peak_bytes)


def suggest(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int], accelerator: Accelerator,
            options: PlanOptions) -> tuple[list[tuple[Change, int]], Plan]:
    """Changes that make the plan fit, each with the peak once it and those before it are applied, and the
    final plan (which may still not fit: then the changes that lower the peak most)."""

    def plan_of(st) -> Plan:
        return make_plan(st[0], st[1], st[2], accelerator, st[3])

    def greedy_config(st, applied):
        plan = plan_of(st)
        while not plan.fits:
            best = None
            for change in config_changes(st[0], st[1], st[2]):
                trial = apply_change(*st, change)
                trial_plan = plan_of(trial)
                lower = trial_plan.peak_bytes < (plan if best is None else best[2]).peak_bytes
                if lower:
                    best = (change, trial, trial_plan)
            if best is None:
                break
            change, st, plan = best
            applied.append(change)
        return st, plan

    applied: list[Change] = []
    state, plan = greedy_config((work, models, mesh, options), applied)
    if not plan.fits:
        best = None
        for changes in _search_space(state[0], state[1], state[2], state[3]):
            trial = state
            for change in changes:
                trial = apply_change(*trial, change)
            trial_plan = plan_of(trial)
            key = ((0,) + _throughput_cost(trial[0], trial[2], trial[3], changes, trial_plan) if trial_plan.fits
                   else (1, trial_plan.peak_bytes))
            if best is None or key < best[0]:
                best = (key, changes, trial)
        applied += best[1]
        state, plan = greedy_config(best[2], applied)
    if plan.fits:  # drop changes that later ones made unnecessary
        for change in list(applied):
            rest = [c for c in applied if c is not change]
            st = (work, models, mesh, options)
            for c in rest:
                st = apply_change(*st, c)
            if plan_of(st).fits:
                applied = rest
    # Listed in the order that lowers the peak fastest, each with the peak once it and those before it apply.
    st, steps, remaining = (work, models, mesh, options), [], list(applied)
    while remaining:
        trials = [(plan_of(apply_change(*st, c)).peak_bytes, i) for i, c in enumerate(remaining)]
        peak, i = min(trials)
        st = apply_change(*st, remaining[i])
        steps.append((remaining.pop(i), peak))
    return steps, plan_of(st)


# ------------------------------------------------------------------------------------------------
# Validation: the update step compiled for a small model


def compiled_update_temp(student: ModelConfig, *, rows: int, context: int, response: int, loss: LossConfig,
                         teacher_hidden: int, remat: str | None = None, micro_batches: int = 2,
                         lora: LoRAConfig | None = None) -> dict[str, int]:
    """XLA's memory_analysis of steps.update compiled (not run) on the default backend for abstract inputs:
    `micro_batches` micro-batches of `rows` rows. Two micro-batches by default: with one, XLA inlines the
    scan and its CPU scheduler then ignores rematerialisation. `remat`: the model's ModelConfig.remat
    (transformer.py), None keeping student.remat.

    Run it under XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false (``measure_in_subprocess``):
    XLA:CPU's default scheduler favours concurrency and places recomputation beside the forward pass, so
    remat would not lower the peak at all; TPU and GPU schedulers are memory-aware. `lora`: the state holds
    adapters and the frozen base is an argument of its own (counted in `argument`, reported as `frozen`)."""
    from trd_jax.steps import Sequences, init_state, update

    student = student if remat is None else student.replace(remat=remat)
    graphdef, params, frozen = _abstract_split(student, lora)
    optimizer = make_optimizer(OptimConfig())
    state = jax.eval_shape(functools.partial(init_state, optimizer=optimizer), params)
    spec, length, dt = jax.ShapeDtypeStruct, context + response, jnp.dtype(student.dtype)
    m = micro_batches
    seq = Sequences(spec((m, rows, length), jnp.int32), spec((m, rows, length), jnp.int32),
                    spec((m, rows, length), jnp.bool_))
    args = (state, seq, spec((m, rows, response), jnp.int32), spec((m, rows, response), jnp.bool_),
            spec((m, rows, response, teacher_hidden), dt), spec((teacher_hidden, student.vocab_size), dt),
            spec((m, rows, response), jnp.float32))
    step = functools.partial(update, graphdef=graphdef, optimizer=optimizer, cfg=loss, context_width=context)

    def fn(state, seq, targets, mask, hidden, head, logp, frozen):
        return step(state, seq=seq, targets=targets, mask=mask, teacher_hidden=hidden, teacher_head=head,
                    teacher_logp=logp, old_logp=None, frozen=frozen)

    stats = jax.jit(fn, donate_argnums=(0,)).lower(*args, frozen).compile().memory_analysis()
    return dict(temp=int(stats.temp_size_in_bytes), argument=int(stats.argument_size_in_bytes),
                output=int(stats.output_size_in_bytes), alias=int(stats.alias_size_in_bytes),
                state=tree_bytes(state), frozen=tree_bytes(frozen))


def _abstract_split(cfg: ModelConfig, lora: LoRAConfig | None):
    """(graphdef, trainable params, frozen params or None) of the model, abstract (nothing allocated)."""
    if lora is None:
        graphdef, params = abstract_params(cfg)
        return graphdef, params, None
    return split_lora(nnx.eval_shape(lambda: add_lora(Transformer(cfg, rngs=nnx.Rngs(0)), lora,
                                                      rngs=nnx.Rngs(1))))


MEASURE_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def measure_in_subprocess(cases: Iterable[dict[str, Any]], timeout: float = 600.0) -> list[dict[str, int]]:
    """compiled_update_temp for each case ({"model": ModelConfig fields, "rows", "context", "response",
    "chunk_size", "teacher_hidden", and optionally "remat", else the model's own remat field}) in one fresh
    CPU process with MEASURE_FLAGS (XLA reads its flags once per process)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + MEASURE_FLAGS).strip())
    out = subprocess.run([sys.executable, "-m", "trd_jax.memory_plan"], input=json.dumps(list(cases)), env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_main() -> None:
    results = []
    for case in json.loads(sys.stdin.read()):
        cfg = ModelConfig(**case["model"])
        lora = case.get("lora")
        results.append(compiled_update_temp(cfg, rows=case["rows"], context=case["context"],
                                            response=case["response"],
                                            loss=LossConfig(chunk_size=case.get("chunk_size", 512)),
                                            teacher_hidden=case["teacher_hidden"], remat=case.get("remat"),
                                            micro_batches=case.get("micro_batches", 2),
                                            lora=None if lora is None else LoRAConfig(**{
                                                **lora, "targets": tuple(lora.get("targets", LORA_TARGETS))})))
    print(json.dumps(results))


def analytical_update_temp(student: ModelConfig, *, rows: int, context: int, response: int, chunk_size: int,
                           teacher_hidden: int, remat: str) -> int:
    """The planner's estimate of what compiled_update_temp measures on one device (no FSDP gathers)."""
    params = tree_bytes(abstract_params(student)[1])
    return update_activations(student, rows=rows, context=context, response=response,
                              loss=LossConfig(chunk_size=chunk_size), teacher_hidden=teacher_hidden,
                              params_bytes=params, remat=remat).total


if __name__ == "__main__":
    _measure_main()
