"""Host <-> device transfers that stay correct with several JAX processes (jax.distributed).

The controller runs the same host-side program on every process, over the same global batch (the data
order and every PRNG key are functions of the config's seed alone). Device computations run on global
jax.Arrays over the global mesh, so:

  - a host (numpy) value that goes into a jitted step is made a global array with to_global(): every
    process holds the whole value and contributes the shards its own devices own;
  - a device value that the host reads is fetched with to_host(): a value that is not fully addressable
    from this process is all-gathered first (a collective: every process must make the same call).

With one process every helper is the identity or a plain np.asarray / device_put, so that single-process
runs are unchanged bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def multi_process() -> bool:
    return jax.process_count() > 1


def to_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global jax.Array with `sharding` from a host value that is the same on every process (numpy, or a
    fully addressable jax.Array). A typed PRNG key goes through its key data. A global array is resharded."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(to_global(jax.random.key_data(x), sharding), impl=impl)
        if not x.is_fully_addressable:
            return x if x.sharding == sharding else jax.device_put(x, sharding)
    if not multi_process():
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated_like(params) -> NamedSharding | None:
    """A fully replicated sharding over the mesh that `params` (a pytree of arrays) is placed on, or None
    when its first leaf carries no NamedSharding (arrays on one device)."""
    leaves = jax.tree.leaves(params)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None


def to_host(x: Any) -> np.ndarray:
    """np.asarray(x), all-gathering first a jax.Array that this process cannot read whole (a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_tree(tree):
    """to_host() over every array leaf of a pytree (None leaves stay None)."""
    return jax.tree.map(lambda x: to_host(x) if isinstance(x, jax.Array) else x, tree)


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process0_first(name: str, fn):
    """fn() on process 0, then (after a barrier) on the others: for steps that write files that the other
    processes then reuse (a dataset, a tokenizer, bootstrapped models). One process: fn()."""
    if not multi_process():
        return fn()
    result = fn() if jax.process_index() == 0 else None
    sync(name)
    return result if jax.process_index() == 0 else fn()


def process0_decides(value):
    """Process 0's value of a small host array or scalar (a decision read from a shared file system), on every
    process: processes that decide on their own, each from its view of the files, could skip different work
    and pair mismatched collectives. One process: the value itself."""
    if not multi_process():
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
