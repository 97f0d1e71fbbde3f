"""Device mesh and logical-axis sharding rules for student and teacher parameters and batches.

Parameters carry logical axis names (trd_jax.models.transformer); rules map each name to a mesh axis
(or None: replicated). A dimension that a mesh axis does not divide stays replicated rather than
failing, so that one rule set serves every model size (e.g. 2 kv heads on a tensor axis of 4).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. FSDP shards the embedding dimension of every matrix; tensor parallelism
# splits heads, kv heads, the MLP width and the vocabulary.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("lora_rank", None),  # LoRA adapters: the rank axis is small; A and B shard along their base matrix's axes
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 takes the devices left over (at most one axis may be -1)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> P:
    """PartitionSpec for a parameter with these logical axes; each mesh axis is used at most once and
    only where it divides the dimension."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        axis = table.get(name) if name is not None else None
        if axis is not None and (axis in used or dim % mesh.shape[axis]):
            axis = None
        if axis is not None:
            used.add(axis)
        spec.append(axis)
    return P(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    """A pytree of NamedSharding matching `state` (a state of Params with `out_sharding` metadata)."""

    def one(variable):
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable[...].ndim
        return NamedSharding(mesh, logical_to_spec(axes, variable[...].shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shardings_like_params(tree, params, param_sharding_tree, mesh: Mesh):
    """Shardings for a pytree whose sub-trees mirror `params` (an optax state: Adam's mu and nu):
    those sub-trees get the parameters' shardings, every other leaf (step counts) is replicated."""
    params_def = jax.tree.structure(params)

    def mirrors(x):
        return x is not tree and jax.tree.structure(x) == params_def

    leaves, treedef = jax.tree.flatten(tree, is_leaf=mirrors)
    out = [param_sharding_tree if mirrors(leaf) else replicated(mesh) for leaf in leaves]
    return jax.tree.unflatten(treedef, out)
