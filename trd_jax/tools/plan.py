"""``python -m trd_jax.tools.plan``: the former name of the memory planner's command line, kept so that existing
commands work; it is ``python -m trd_jax.memory_plan`` (trd_jax/memory_plan/cli.py)."""

import sys

from trd_jax.memory_plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
