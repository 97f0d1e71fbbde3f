"""``python -m trd_jax.memory_plan --config RECIPE[:SPEC]``: the memory planner's command line (cli.py)."""

import sys

from trd_jax.memory_plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
