"""Mesh axis sizes and the exact per-device shards of parameters and optimizer state: shapes from
``nnx.eval_shape`` / ``jax.eval_shape``, shards from the logical-axis rules on an ``AbstractMesh``."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from trd_jax.models.config import ModelConfig
from trd_jax.models.lora import LoRAConfig, add_lora, split_lora
from trd_jax.models.transformer import Transformer
from trd_jax.sharding import DEFAULT_RULES, MESH_AXES, MeshConfig, logical_to_spec, shardings_like_params
from trd_jax.steps import OptimConfig, make_optimizer

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


def _abstract_split(cfg: ModelConfig, lora: LoRAConfig | None):
    """(graphdef, trainable params, frozen params or None) of the model, abstract (nothing allocated)."""
    if lora is None:
        graphdef, params = abstract_params(cfg)
        return graphdef, params, None
    return split_lora(nnx.eval_shape(lambda: add_lora(Transformer(cfg, rngs=nnx.Rngs(0)), lora,
                                                      rngs=nnx.Rngs(1))))
