"""A batch-sharded forward run in row groups, so that its activations scale with the group, not the batch.

Rows are sharded over the batch axes (data, fsdp) in D contiguous blocks of b = B / D rows. Group j takes the
same slice [j * g/D, (j + 1) * g/D) of every device's block, so each device computes, and keeps, only rows of
its own block: the group outputs are written in place (a donated buffer, a local update inside shard_map) and
nothing moves between devices. A device block that the group size does not divide is padded with copies of its
last row whose mask is off; the padding is cut away at the end.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trd_jax.sharding import BATCH_AXES


def batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def group_indices(rows: int, shards: int, group: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Host rows of group j (in the order the group's batch sharding gives them to devices) and whether each
    is a real row (False: padding, a copy of its device block's last row)."""
    block, per_device = rows // shards, group // shards
    local = np.arange(j * per_device, (j + 1) * per_device)
    live = np.tile(local < block, shards)
    index = (np.arange(shards)[:, None] * block + np.minimum(local, block - 1)[None, :]).reshape(-1)
    return index, live


def run_in_groups(fn: Callable[[Any], Any], args, mask_leaf: int, *, rows: int, group: int, mesh: Mesh,
                  place: Callable[[Any], Any] = lambda x: x):
    """fn(place(args_of_group)) for every row group of host arrays `args` ([rows, ...] leaves), assembled into
    [rows, ...] outputs sharded like fn's. The leaf at index `mask_leaf` is a bool mask whose padding rows are
    switched off; `place` puts a group's host arrays on devices (e.g. to global arrays with several processes).
    """
    shards = batch_shards(mesh)
    if rows % shards or group % shards:
        raise ValueError(f"{rows} rows and groups of {group} must both be multiples of the {shards} batch shards")
    block, per_device = rows // shards, group // shards
    num_groups = -(-block // per_device)
    leaves, tree = jax.tree.flatten(args)
    out = None
    for j in range(num_groups):
        index, live = group_indices(rows, shards, group, j)
        part = [np.asarray(x)[index] for x in leaves]
        part[mask_leaf] = part[mask_leaf] & live.reshape((-1,) + (1,) * (part[mask_leaf].ndim - 1))
        scored = fn(place(jax.tree.unflatten(tree, part)))
        if out is None:
            out = _buffer(scored, num_groups * group, mesh)
        out = _local_put(mesh)(out, scored, j * per_device)
    return out if num_groups * per_device == block else _local_first(mesh, block)(out)


def _rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _buffer(like, rows: int, mesh: Mesh):
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype), like)
    shardings = jax.tree.map(lambda x: _rows_sharding(mesh, x.ndim), like)
    return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=shardings)()


@functools.lru_cache(maxsize=None)
def _local_put(mesh: Mesh):
    def put(out, part, offset):
        return jax.tree.map(lambda o, p: jax.lax.dynamic_update_slice_in_dim(o, p, offset, axis=0), out, part)

    def sharded(out, part, offset):
        spec = jax.tree.map(lambda x: P(BATCH_AXES), out)
        return jax.shard_map(put, mesh=mesh, in_specs=(spec, spec, P()), out_specs=spec)(out, part, offset)

    return jax.jit(sharded, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def _local_first(mesh: Mesh, block: int):
    def first(out):
        spec = jax.tree.map(lambda x: P(BATCH_AXES), out)
        return jax.shard_map(lambda o: jax.tree.map(lambda x: x[:block], o), mesh=mesh, in_specs=(spec,),
                             out_specs=spec)(out)

    return jax.jit(first)
