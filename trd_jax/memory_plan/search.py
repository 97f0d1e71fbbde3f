"""What to change when a plan does not fit.

Every change is a config change. The simple ones come first (each kept only if it lowers the peak): free the
sampler caches as their phases end, bf16, everything over fsdp, one row per device per micro-batch, smaller
loss chunks. Then the combinations of train.remat, blockwise attention and rows per sampler / scoring call are
searched exhaustively (a few hundred plans of arithmetic) for the one that fits with the least throughput
lost: fewest halvings of the rows per call, least recomputation, dense attention where it fits; then the
lowest peak.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from collections.abc import Callable, Iterable

from trd_jax.memory_plan.hardware import Accelerator
from trd_jax.memory_plan.plan import Plan, make_plan
from trd_jax.memory_plan.workload import ModelInfo, PlanOptions, Workload


@dataclasses.dataclass(frozen=True)
class Change:
    """One proposed change: config overrides (dotted keys, as --config.KEY=VALUE takes them)."""

    label: str
    config: tuple[tuple[str, Any], ...] = ()


_ROWS_PER_DEVICE = (64, 32, 16, 8, 4, 2, 1)
_BLOCKWISE = (("student.attention", "blockwise"), ("teacher.attention", "blockwise"))


def config_changes(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int]) -> list[Change]:
    """Config changes that could lower memory, each only where it would change something."""
    out: list[Change] = []
    batch_shards = mesh["data"] * mesh["fsdp"]
    if not work.release_kv_cache:
        out.append(Change("free each sampler cache when its phase ends", (("rollout.release_kv_cache", True),)))
    for side, info in models.items():
        cfg = info.config
        if cfg.dtype != "bfloat16" or cfg.param_dtype != "bfloat16":
            out.append(Change(f"bf16 {side} parameters and compute",
                              ((f"{side}.dtype", "bfloat16"), (f"{side}.param_dtype", "bfloat16"))))
    if mesh["data"] > 1 or mesh["tensor"] > 1:
        out.append(Change("shard everything over fsdp", (("mesh.data", 1), ("mesh.fsdp", math.prod(mesh.values())),
                                                         ("mesh.tensor", 1))))
    most = work.rows // batch_shards  # one row per device per micro-batch
    if work.micro_batches < most and work.rows % most == 0:
        out.append(Change("one row per device per micro-batch", (("train.micro_batches", most),)))
    if work.loss.chunk_size > 256:
        out.append(Change("smaller loss chunks", (("loss.chunk_size", 256),)))
    return out


def apply_change(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int], options: PlanOptions,
                 change: Change) -> tuple[Workload, dict[str, ModelInfo], dict[str, int], PlanOptions]:
    for key, value in change.config:
        section, _, field = key.partition(".")
        if section in ("student", "teacher"):  # OPSD has no teacher model: its keys change nothing
            if section in models:
                info = models[section]
                models = {**models, section: dataclasses.replace(info, config=info.config.replace(**{field: value}))}
        elif key == "rollout.release_kv_cache":
            work = dataclasses.replace(work, release_kv_cache=value)
        elif key == "train.micro_batches":
            work = dataclasses.replace(work, micro_batches=value)
        elif key == "loss.chunk_size":
            work = dataclasses.replace(work, loss=dataclasses.replace(work.loss, chunk_size=value))
        elif key == "train.remat":
            options = dataclasses.replace(options, remat=value)
        elif key == "rollout.max_rows_per_call":
            options = dataclasses.replace(options, sampler_rows=value)
        elif key == "train.max_score_rows":
            options = dataclasses.replace(options, score_rows=value)
        elif section == "mesh":
            mesh = {**mesh, field: value}
        else:
            raise ValueError(f"apply_change: {key} is not modelled")
    return work, models, mesh, options


def _fewer_rows(current: int, shards: int, rows: int) -> list[int]:
    """Rows per call below `current` (0: all rows), a whole number per device."""
    return [r * shards for r in _ROWS_PER_DEVICE if r * shards < rows and (not current or r * shards < current)]


def _search_space(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int],
                  start: PlanOptions) -> Iterable[list[Change]]:
    """Every combination of remat, blockwise attention and rows per sampler / scoring call at least as lean as
    `start`, as the config changes that make it (the first: none)."""
    batch_shards = mesh["data"] * mesh["fsdp"]
    shards = batch_shards if start.kv_cache == "sharded" else 1
    remats = ("none", "dots", "full")[("none", "dots", "full").index(start.remat):]  # by decreasing memory
    dense = any(info.config.attention == "dense" for info in models.values())
    samplers = [start.sampler_rows] + _fewer_rows(start.sampler_rows, shards, work.rows)
    scores = [start.score_rows] + _fewer_rows(start.score_rows, batch_shards, work.rows)
    for remat in remats:
        for blockwise in (False, True) if dense else (False,):
            for sampler in dict.fromkeys(samplers):
                for score in dict.fromkeys(scores):
                    changes = []
                    if blockwise:
                        changes.append(Change("blockwise (flash) attention", _BLOCKWISE))
                    if sampler != start.sampler_rows:
                        changes.append(Change(f"sample {sampler} rows per call",
                                              (("rollout.max_rows_per_call", sampler),)))
                    if score != start.score_rows:
                        changes.append(Change(f"score {score} rows per call", (("train.max_score_rows", score),)))
                    if remat != start.remat:
                        changes.append(Change(f"remat each decoder layer ({remat})", (("train.remat", remat),)))
                    yield changes


def _throughput_cost(work: Workload, mesh: dict[str, int], options: PlanOptions, changes: list[Change],
                     plan: Plan) -> tuple:
    """Throughput lost: one point per halving of the rows a device samples per call, half a point per halving
    of the rows it scores per call, the recomputation of remat (full 1, dots 0.5) and a quarter point for
    blockwise attention where dense would fit (plain-JAX tiles are slower than a fused kernel); ties: the lower
    peak."""
    rows, batch_shards = work.rows, mesh["data"] * mesh["fsdp"]
    ideal = rows / batch_shards
    sampler = (options.sampler_rows or rows) / batch_shards
    score = (options.score_rows or rows) / batch_shards
    recompute = {"none": 0.0, "dots": 0.5, "full": 1.0}[options.remat]
    blockwise = 0.25 if any(c.config == _BLOCKWISE for c in changes) else 0.0
    return (math.log2(ideal / sampler) + 0.5 * math.log2(ideal / score) + recompute + blockwise, plan.peak_bytes)


# What apply_change changes: (workload, models, mesh, options).
Setting = tuple[Workload, dict[str, ModelInfo], dict[str, int], PlanOptions]
PlanOf = Callable[[Setting], Plan]


def _apply_all(st: Setting, changes: Iterable[Change]) -> Setting:
    for change in changes:
        st = apply_change(*st, change)
    return st


def _greedy_config(st: Setting, applied: list[Change], plan_of: PlanOf) -> tuple[Setting, Plan]:
    """config_changes one at a time, the one that lowers the peak most first, until the plan fits or none lowers
    it; each appended to `applied`."""
    plan = plan_of(st)
    while not plan.fits:
        best = None
        for change in config_changes(st[0], st[1], st[2]):
            trial = apply_change(*st, change)
            trial_plan = plan_of(trial)
            lower = trial_plan.peak_bytes < (plan if best is None else best[2]).peak_bytes
            if lower:
                best = (change, trial, trial_plan)
        if best is None:
            break
        change, st, plan = best
        applied.append(change)
    return st, plan


def _least_costly(st: Setting, plan_of: PlanOf) -> tuple[list[Change], Setting]:
    """The combination of _search_space that fits with the least throughput lost (if none fits: the lowest
    peak), and the setting it makes."""
    best = None
    for changes in _search_space(*st):
        trial = _apply_all(st, changes)
        trial_plan = plan_of(trial)
        key = ((0,) + _throughput_cost(trial[0], trial[2], trial[3], changes, trial_plan) if trial_plan.fits
               else (1, trial_plan.peak_bytes))
        if best is None or key < best[0]:
            best = (key, changes, trial)
    return best[1], best[2]


def _drop_unneeded(start: Setting, applied: list[Change], plan_of: PlanOf) -> list[Change]:
    """`applied` without the changes that later ones made unnecessary."""
    for change in list(applied):
        rest = [c for c in applied if c is not change]
        if plan_of(_apply_all(start, rest)).fits:
            applied = rest
    return applied


def _by_impact(start: Setting, applied: list[Change], plan_of: PlanOf) -> tuple[list[tuple[Change, int]], Plan]:
    """The changes in the order that lowers the peak fastest, each with the peak once it and those before it
    apply, and the final plan."""
    st, steps, remaining = start, [], list(applied)
    while remaining:
        trials = [(plan_of(apply_change(*st, c)).peak_bytes, i) for i, c in enumerate(remaining)]
        peak, i = min(trials)
        st = apply_change(*st, remaining[i])
        steps.append((remaining.pop(i), peak))
    return steps, plan_of(st)


def suggest(work: Workload, models: dict[str, ModelInfo], mesh: dict[str, int], accelerator: Accelerator,
            options: PlanOptions) -> tuple[list[tuple[Change, int]], Plan]:
    """Changes that make the plan fit, each with the peak once it and those before it are applied, and the
    final plan (which may still not fit: then the changes that lower the peak most)."""

    def plan_of(st: Setting) -> Plan:
        return make_plan(st[0], st[1], st[2], accelerator, st[3])

    start: Setting = (work, models, mesh, options)
    applied: list[Change] = []
    state, plan = _greedy_config(start, applied, plan_of)
    if not plan.fits:
        changes, state = _least_costly(state, plan_of)
        applied += changes
        state, plan = _greedy_config(state, applied, plan_of)
    if plan.fits:
        applied = _drop_unneeded(start, applied, plan_of)
    return _by_impact(start, applied, plan_of)
