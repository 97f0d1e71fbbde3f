"""Run by tests/test_row_groups.py in a process with 4 CPU devices: run_in_groups on a 4-way batch-sharded
mesh equals one call over all rows and keeps the rows' sharding, also where the group size does not divide a
device's block (the last group then moves back over rows already done)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from trd_jax import row_groups  # noqa: E402
from trd_jax.sharding import MeshConfig, batch_sharding, make_mesh  # noqa: E402


def main():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    rows = 12
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, (rows, 5)).astype(np.int32)
    mask = rng.random((rows, 5)) > 0.3

    @jax.jit
    def fn(args):
        tokens, mask = args
        return (jnp.cumsum(tokens * mask, axis=1).astype(jnp.float32), jnp.sum(mask, axis=1))

    def place(args):
        return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), args)

    want = fn(place((tokens, mask)))
    for group in (4, 8, 12):  # 3 groups; 2 groups, the last moved back (block 3, 2 per device); 1 group
        got = row_groups.run_in_groups(fn, (tokens, mask), rows=rows, group=group, mesh=mesh, place=place)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
            assert g.sharding.is_equivalent_to(batch_sharding(mesh, g.ndim), g.ndim), (group, g.sharding)
    # groups of 8 over blocks of 3: local rows 0, 1 then 1, 2 of every device's block
    assert row_groups.group_indices(rows, 4, 8, 0).tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    assert row_groups.group_indices(rows, 4, 8, 1).tolist() == [1, 2, 4, 5, 7, 8, 10, 11]
    for group in (6, 16):
        try:
            row_groups.run_in_groups(fn, (tokens, mask), rows=rows, group=group, mesh=mesh, place=place)
        except ValueError as e:
            assert "multiples of the 4 batch shards" in str(e)
        else:
            raise AssertionError(f"a group of {group} rows over 4 shards was accepted")
    print("row groups ok")


if __name__ == "__main__":
    main()
