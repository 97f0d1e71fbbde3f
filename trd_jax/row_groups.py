"""A batch-sharded forward run in row groups, so that its activations scale with the group, not the batch.

Rows are sharded over the batch axes (data, fsdp) in D contiguous blocks of b = B / D rows. Group j takes the
same slice [j * g/D, (j + 1) * g/D) of every device's block, so each device computes, and keeps, only rows of
its own block: the group outputs are written in place (a donated buffer, a local update inside shard_map) and
nothing moves between devices. Where g/D does not divide b, the last group's slice moves back to end at b: it
recomputes a few rows of the group before and writes the same values again, so no padding and no copy.
"""

from __future__ import annotations

import functools
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trd_jax.errors import ConfigError
from trd_jax.sharding import BATCH_AXES


def batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def check_group(group: int, mesh: Mesh) -> None:
    """train.max_score_rows (0: no groups) splits evenly over the mesh's batch shards, or the run stops here."""
    if group % batch_shards(mesh):
        raise ConfigError("train.max_score_rows",
                          f"{group} is not a multiple of the mesh's {batch_shards(mesh)} batch shards (data x fsdp)")


def group_start(block: int, per_device: int, j: int) -> int:
    """First row, within each device's block, of group j: the last group ends at the block's end."""
    return min(j * per_device, block - per_device)


def group_indices(rows: int, shards: int, group: int, j: int) -> np.ndarray:
    """Host rows of group j, in the order the group's batch sharding gives them to devices."""
    block, per_device = rows // shards, group // shards
    local = group_start(block, per_device, j) + np.arange(per_device)
    return (np.arange(shards)[:, None] * block + local[None, :]).reshape(-1)


def run_in_groups(fn: Callable[[Any], Any], args, *, rows: int, group: int, mesh: Mesh,
                  place: Callable[[Any], Any] = lambda x: x):
    """fn(place(args_of_group)) for every row group of host arrays `args` ([rows, ...] leaves), assembled into
    [rows, ...] outputs sharded like fn's; `place` puts a group's host arrays on devices (e.g. to global arrays
    with several processes). fn must treat rows independently (a forward pass does)."""
    shards = batch_shards(mesh)
    if rows % shards or group % shards or group > rows:
        raise ValueError(f"{rows} rows and groups of {group} (at most the rows) must both be multiples of the "
                         f"{shards} batch shards")
    block, per_device = rows // shards, group // shards
    leaves, tree = jax.tree.flatten(args)
    out = None
    for j in range(-(-block // per_device)):
        index = group_indices(rows, shards, group, j)
        scored = fn(place(jax.tree.unflatten(tree, [np.asarray(x)[index] for x in leaves])))
        if out is None:
            out = _buffer(scored, rows, mesh)
        out = _local_put(mesh)(out, scored, group_start(block, per_device, j))
    return out


def _rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _buffer(like, rows: int, mesh: Mesh):
    """Zeros of `like`'s leaves with `rows` rows, made on the devices already sharded over the rows."""
    return jax.tree.map(lambda x: jnp.zeros((rows, *x.shape[1:]), x.dtype, device=_rows_sharding(mesh, x.ndim)),
                        like)


@functools.cache
def _local_put(mesh: Mesh):
    def put(out, part, offset):
        return jax.tree.map(lambda o, p: jax.lax.dynamic_update_slice_in_dim(o, p, offset, axis=0), out, part)

    def sharded(out, part, offset):
        spec = jax.tree.map(lambda x: P(BATCH_AXES), out)
        return jax.shard_map(put, mesh=mesh, in_specs=(spec, spec, P()), out_specs=spec)(out, part, offset)

    return jax.jit(sharded, donate_argnums=0)
