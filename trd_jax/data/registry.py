"""Tasks by name, built from the run config's `task` section."""

from __future__ import annotations

import os

from trd_jax.config import ConfigError, config_error
from trd_jax.data.arithmetic import ArithmeticConfig, ArithmeticTask

TASKS = ("arithmetic",)


def make_task(task_cfg, directory: str):
    """The task named by ``task_cfg.name``; files it generates (e.g. a tokenizer) go under ``directory``."""
    if task_cfg.name != "arithmetic":
        raise ConfigError("task.name", f"{task_cfg.name!r} is not one of {', '.join(TASKS)}")
    try:
        cfg = ArithmeticConfig(min_steps=task_cfg.min_steps, max_steps=task_cfg.max_steps,
                               max_operand=task_cfg.max_operand, train_size=task_cfg.train_size,
                               eval_size=task_cfg.eval_size, seed=task_cfg.data_seed)
    except ValueError as e:
        raise config_error("task", e) from None
    return ArithmeticTask(os.path.join(directory, "arithmetic"), cfg)
