"""Validation: the update step compiled for a small model, measured with XLA's ``memory_analysis`` (in a fresh
CPU process: ``measure_in_subprocess``), and the planner's estimate of the same."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from trd_jax.memory_plan.formulas import update_activations
from trd_jax.memory_plan.shards import _abstract_split, abstract_params, tree_bytes
from trd_jax.models.config import ModelConfig
from trd_jax.models.lora import TARGETS as LORA_TARGETS, LoRAConfig
from trd_jax.losses import LossConfig
from trd_jax.steps import OptimConfig, make_optimizer

def compiled_update_temp(student: ModelConfig, *, rows: int, context: int, response: int, loss: LossConfig,
                         teacher_hidden: int, remat: str | None = None, micro_batches: int = 2,
                         lora: LoRAConfig | None = None) -> dict[str, int]:
    """XLA's memory_analysis of steps.update compiled (not run) on the default backend for abstract inputs:
    `micro_batches` micro-batches of `rows` rows. Two micro-batches by default: with one, XLA inlines the
    scan and its CPU scheduler then ignores rematerialisation. `remat`: the model's ModelConfig.remat
    (transformer.py), None keeping student.remat.

    Run it under XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false (``measure_in_subprocess``):
    XLA:CPU's default scheduler favours concurrency and places recomputation beside the forward pass, so
    remat would not lower the peak at all; TPU and GPU schedulers are memory-aware. `lora`: the state holds
    adapters and the frozen base is an argument of its own (counted in `argument`, reported as `frozen`)."""
    from trd_jax.layouts import Layout
    from trd_jax.steps import TeacherSignal, UpdateBatch, init_state, update

    student = student if remat is None else student.replace(remat=remat)
    graphdef, params, frozen = _abstract_split(student, lora)
    optimizer = make_optimizer(OptimConfig())
    state = jax.eval_shape(functools.partial(init_state, optimizer=optimizer), params)
    spec, length, dt = jax.ShapeDtypeStruct, context + response, jnp.dtype(student.dtype)
    m = micro_batches
    seq = Layout(spec((m, rows, length), jnp.int32), spec((m, rows, length), jnp.int32),
                 spec((m, rows, length), jnp.bool_), context)
    args = (state, seq, spec((m, rows, response), jnp.int32), spec((m, rows, response), jnp.bool_),
            spec((m, rows, response, teacher_hidden), dt), spec((teacher_hidden, student.vocab_size), dt),
            spec((m, rows, response), jnp.float32))
    step = functools.partial(update, graphdef=graphdef, optimizer=optimizer, cfg=loss)

    def fn(state, seq, targets, mask, hidden, head, logp, frozen):
        return step(state, UpdateBatch(seq, targets, mask), TeacherSignal(hidden, head, logp), frozen)

    stats = jax.jit(fn, donate_argnums=(0,)).lower(*args, frozen).compile().memory_analysis()
    return dict(temp=int(stats.temp_size_in_bytes), argument=int(stats.argument_size_in_bytes),
                output=int(stats.output_size_in_bytes), alias=int(stats.alias_size_in_bytes),
                state=tree_bytes(state), frozen=tree_bytes(frozen))


MEASURE_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def measure_in_subprocess(cases: Iterable[dict[str, Any]], timeout: float = 600.0) -> list[dict[str, int]]:
    """compiled_update_temp for each case ({"model": ModelConfig fields, "rows", "context", "response",
    "chunk_size", "teacher_hidden", and optionally "remat", else the model's own remat field}) in one fresh
    CPU process with MEASURE_FLAGS (XLA reads its flags once per process)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + MEASURE_FLAGS).strip())
    out = subprocess.run([sys.executable, "-m", "trd_jax.memory_plan.measure_worker"], input=json.dumps(list(cases)),
                         env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_main() -> None:
    results = []
    for case in json.loads(sys.stdin.read()):
        cfg = ModelConfig(**case["model"])
        lora = case.get("lora")
        results.append(compiled_update_temp(cfg, rows=case["rows"], context=case["context"],
                                            response=case["response"],
                                            loss=LossConfig(chunk_size=case.get("chunk_size", 512)),
                                            teacher_hidden=case["teacher_hidden"], remat=case.get("remat"),
                                            micro_batches=case.get("micro_batches", 2),
                                            lora=None if lora is None else LoRAConfig(**{
                                                **lora, "targets": tuple(lora.get("targets", LORA_TARGETS))})))
    print(json.dumps(results))


def analytical_update_temp(student: ModelConfig, *, rows: int, context: int, response: int, chunk_size: int,
                           teacher_hidden: int, remat: str) -> int:
    """The planner's estimate of what compiled_update_temp measures on one device (no FSDP gathers)."""
    params = tree_bytes(abstract_params(student)[1])
    return update_activations(student, rows=rows, context=context, response=response,
                              loss=LossConfig(chunk_size=chunk_size), teacher_hidden=teacher_hidden,
                              params_bytes=params, remat=remat).total
