"""Run by test_multiprocess.py: one process of a tiny training run (tests/helpers/tiny_run.py's config) in WORKDIR,
either one of several jax.distributed processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
or a single process with fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N).

    python tests/helpers/multiprocess_check.py WORKDIR '{"dotted.key": value, ...}'

After training it restores the latest checkpoint (every process, each reading its own shards) and checks
that the restored parameters equal the live ones; process 0 then writes WORKDIR/final_params.npz (the
student's parameters, gathered) and WORKDIR/check.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trd_jax.distributed import maybe_initialize

maybe_initialize()

import jax
import numpy as np
from tiny_run import tiny_config

from trd_jax import multihost
from trd_jax.checkpointing import Checkpointer
from trd_jax.controller import Trainer


def main(workdir: str, overrides: dict) -> None:
    trainer = Trainer(tiny_config(**overrides), workdir)
    summary = trainer.run()
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.state.params)]
    params = [np.asarray(x) for x in jax.tree.leaves(multihost.host_tree(trainer.state.params))]

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=3, async_save=False)
    try:
        tree, meta = ckpt.restore(abstract_state=trainer._checkpoint_tree())
    finally:
        ckpt.close()
    restored = [np.asarray(x) for x in jax.tree.leaves(multihost.host_tree(tree["train"].params))]
    assert len(restored) == len(params)
    for path, a, b in zip(paths, params, restored):
        np.testing.assert_array_equal(a, b, err_msg=f"restored checkpoint differs at {path}")
    key_now = multihost.to_host(jax.random.key_data(trainer.train_key))
    np.testing.assert_array_equal(multihost.to_host(tree["rng"]), key_now)

    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, "final_params.npz"), **dict(zip(paths, params)))
        with open(os.path.join(workdir, "check.json"), "w") as f:
            json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                       "mesh": dict(trainer.mesh.shape), "restored_step": meta["step"],
                       "status": summary["status"], "steps": summary["steps"]}, f)
    print(f"process {jax.process_index()} of {jax.process_count()}: OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
