"""Run by test_multiprocess.py: one process of mode=generate on a tiny run (tests/helpers/tiny_run.py's config),
one of several jax.distributed processes or a single process with fake CPU devices, as multiprocess_check.py.

    python tests/helpers/multiprocess_generate_check.py WORKDIR TARGETS '{"dotted.key": value, ...}'
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trd_jax.distributed import maybe_initialize

maybe_initialize()

import jax
from tiny_run import tiny_config

from trd_jax.controller import Trainer
from trd_jax.offline.generate import generate_targets


def main(workdir: str, targets: str, overrides: dict) -> None:
    trainer = Trainer(tiny_config(**overrides), workdir)
    generate_targets(trainer, targets, k=8)
    stats = trainer.rollout_sampler.last_continuous_stats  # set when the rollouts went through continuous batching
    print(f"continuous segments: {None if stats is None else stats['segments']}", flush=True)
    print(f"process {jax.process_index()} of {jax.process_count()}: OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
