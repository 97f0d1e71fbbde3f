"""A code task over local files (TACO / MBPP / HumanEval style; trd_jax.data.local_task): the program in a
response runs against the problem's tests in the sandbox (trd_jax.rewards.sandbox): own namespaces, no
network, read-only file system, resource limits. Without namespaces the task refuses to start unless
task.allow_unsandboxed is set."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from trd_jax.errors import ConfigError
from trd_jax.data.local_task import LocalFilesTask
from trd_jax.data.task import Example
from trd_jax.prompts import CODE_ANSWER_INSTRUCTION, strip_answer_instruction
from trd_jax.rewards.code import AssertTests, CodeTests, HumanEvalTests, StdioTests, grade_code_batch
from trd_jax.rewards.sandbox import SandboxConfig, probe_isolation


def tests_of(ex: Example) -> CodeTests:
    """The grader's tests from an example's answer (the builders' tests JSON; its keys say the style)."""
    spec = json.loads(ex.answer)
    if "entry_point" in spec:  # HumanEval: the problem is the function's prompt, which the program continues
        return HumanEvalTests(prompt=strip_answer_instruction(ex.problem), test=spec["test"],
                              entry_point=spec["entry_point"])
    if "asserts" in spec:
        return AssertTests(tests=tuple(spec["asserts"]), setup=spec.get("setup", ""))
    if spec.get("fn_name"):
        raise ValueError(f"example {ex.id!r}: call-based problem (fn_name={spec['fn_name']!r}) is not supported")
    return StdioTests(inputs=tuple(map(str, spec["inputs"])), outputs=tuple(map(str, spec["outputs"])))


class CodeTask(LocalFilesTask):
    kind = "code"
    instruction = CODE_ANSWER_INSTRUCTION
    builders = {"train": "code_problems", "eval": "code_problems"}

    def __init__(self, name: str, files: Mapping[str, str], *, data_dir: str, dataset_name: str, tokenizer_dir: str,
                 sandbox: SandboxConfig, workers: int = 2):
        super().__init__(name, files, data_dir=data_dir, dataset_name=dataset_name, tokenizer_dir=tokenizer_dir)
        self.sandbox = sandbox
        self.workers = workers

    def gradable(self, ex: Example) -> bool:
        try:
            tests_of(ex)
            return True
        except (ValueError, KeyError):
            return False  # e.g. TACO's call-based problems

    def grade_batch(self, responses: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        grades = grade_code_batch(responses, [tests_of(ex) for ex in examples], self.sandbox, max_workers=self.workers)
        rewards = np.array([g.reward for g in grades], np.float32)
        self.count("passed", int(rewards.sum()))
        self.count("failed", int(len(rewards) - rewards.sum()))
        return rewards


def make_code_task(task_cfg, files: Mapping[str, str], data_dir: str, tokenizer: str) -> CodeTask:
    # Programs get the wall time as CPU time too: a busy loop and a sleeping one stop at the same limit.
    fields = {"timeout_s": ("code_timeout_s", task_cfg.code_timeout_s), "cpu_s": ("code_timeout_s",
              task_cfg.code_timeout_s), "memory_mb": ("code_memory_mb", task_cfg.code_memory_mb)}
    try:
        sandbox = SandboxConfig(**{k: v for k, (_, v) in fields.items()}, allow_unsandboxed=task_cfg.allow_unsandboxed)
    except ValueError as e:
        field = str(e).split("=")[0].split(".")[-1]
        raise ConfigError(f"task.{fields.get(field, (field,))[0]}", str(e).partition(": ")[2] or str(e)) from None
    isolated, why = probe_isolation()
    if not isolated and not task_cfg.allow_unsandboxed:
        # Refuse before any training: grading would fail at the first rollout otherwise.
        raise ConfigError("task.allow_unsandboxed", f"no sandbox on this machine ({why}); model-written code would "
                                                    "run with network and file system access. Set it to True only "
                                                    "for code you trust")
    return CodeTask(task_cfg.name, files, data_dir=data_dir, dataset_name=task_cfg.dataset_name,
                    tokenizer_dir=tokenizer, sandbox=sandbox, workers=task_cfg.grade_workers)
