"""Tasks by name, built from the run config's `task` section."""

from __future__ import annotations

import os

from trd_jax import multihost
from trd_jax.errors import ConfigError, config_error
from trd_jax.data.arithmetic import ArithmeticConfig, ArithmeticTask

TASKS = ("arithmetic", "math", "mini_math", "code")


def make_task(task_cfg, directory: str, *, student_dir: str = ""):
    """The task named by ``task_cfg.name``; files it generates or builds go under ``directory`` (or
    task.data_dir). ``student_dir``: the student's model folder, the tokenizer of real-data tasks unless
    task.tokenizer names another."""
    name = task_cfg.name
    if name not in TASKS:
        raise ConfigError("task.name", f"{name!r} is not one of {', '.join(TASKS)}")
    if name == "arithmetic":
        try:
            cfg = ArithmeticConfig(min_steps=task_cfg.min_steps, max_steps=task_cfg.max_steps,
                                   max_operand=task_cfg.max_operand, train_size=task_cfg.train_size,
                                   eval_size=task_cfg.eval_size, seed=task_cfg.data_seed)
        except ValueError as e:
            raise config_error("task", e) from None
        return ArithmeticTask(os.path.join(directory, "arithmetic"), cfg)

    tokenizer = task_cfg.tokenizer or student_dir
    if not tokenizer or not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        raise ConfigError("task.tokenizer", f"no tokenizer.json in {tokenizer!r} (give task.tokenizer, or a "
                                            "student folder that has one)")
    data_dir = task_cfg.data_dir or os.path.join(directory, "tfds")
    files = {"train": task_cfg.train_files, "eval": task_cfg.eval_files}
    if name == "mini_math":
        from trd_jax.data.mini_math import MiniMathTask, write

        files = write(os.path.join(directory, "mini_math"), train=task_cfg.train_size, eval=task_cfg.eval_size,
                      seed=task_cfg.data_seed, shots=task_cfg.shots, max_operand=task_cfg.mini_math_max_operand)
        return MiniMathTask(name, files, shots=task_cfg.shots, max_operand=task_cfg.mini_math_max_operand,
                            data_dir=data_dir, dataset_name=task_cfg.dataset_name,
                            tokenizer_dir=tokenizer, timeout_s=task_cfg.grade_timeout_s,
                            workers=task_cfg.grade_workers)
    if name == "code":
        from trd_jax.data.code_task import make_code_task

        return make_code_task(task_cfg, files, data_dir, tokenizer)
    from trd_jax.data.math_task import MathTask

    return MathTask(name, files, data_dir=data_dir, dataset_name=task_cfg.dataset_name, tokenizer_dir=tokenizer,
                    timeout_s=task_cfg.grade_timeout_s, workers=task_cfg.grade_workers)


def make_task_once(task_cfg, directory: str, *, student_dir: str = ""):
    """make_task; with several processes, process 0 builds the task's files first and the others then reuse
    them (they would otherwise write the same dataset folders at once)."""
    return multihost.process0_first("task-files-built", lambda: make_task(task_cfg, directory, student_dir=student_dir))
