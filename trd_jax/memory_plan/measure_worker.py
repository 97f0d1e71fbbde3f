"""``python -m trd_jax.memory_plan.measure_worker``: the measuring subprocess of measure.measure_in_subprocess (cases
as JSON on stdin, results as JSON on stdout), in a process of its own because XLA reads its flags once."""

from trd_jax.memory_plan.measure import _measure_main

if __name__ == "__main__":
    _measure_main()
