"""Multi-process start: jax.distributed.initialize when the environment describes several processes."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def multi_process_environment() -> bool:
    """True under an explicit coordinator (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES > 1), a SLURM job
    with several tasks, or a multi-host Cloud TPU slice (several TPU_WORKER_HOSTNAMES)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize() -> bool:
    """Initialises JAX's multi-controller runtime when the environment asks for it; returns whether it did.
    Explicit variables win (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); otherwise JAX
    detects SLURM and Cloud TPU itself."""
    if not multi_process_environment():
        return False
    env = os.environ
    if jax.config.jax_cpu_collectives_implementation is None:
        # Cross-process collectives of CPU devices (tests, CPU clusters); they only affect the CPU backend.
        # gloo is JAX's default; a choice already made (e.g. "mpi", by flag or JAX_CPU_COLLECTIVES_IMPLEMENTATION)
        # is kept.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")))
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d devices", jax.process_index(), jax.process_count(),
             jax.device_count())
    return True
