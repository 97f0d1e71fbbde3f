"""Memory planner: per-device bytes of a run's parameters, optimizer state, teacher, KV caches and update
activations, the peak phase, and whether it fits an accelerator (the computation is the trd_jax.memory_plan package).

    python -m trd_jax.memory_plan --config configs/qwen3.py:opd,1.7b,trd,v5p-8 [--config.x=y ...]
        [--accelerator h100-80gb|h200|a100-80gb|a100-40gb|v4|v5p|v5e|v6e] [--devices N]
        [--model-config student=PATH_OR_NAME,teacher=PATH_OR_NAME] [--vocab N]
        [--remat none|full|dots] [--attention dense|blockwise] [--kv-cache replicated|sharded]
        [--headroom 0.1] [--validate] [--no-suggest] [--bytes]

Models: --model-config (a built-in name: qwen3-1.7b, qwen3-4b, qwen3-8b, smollm2-135m; a Hugging Face folder or
a config.json), else student.path / teacher.path when they hold a config.json, else the models a recipe names
(configs/qwen3.py: its STUDENT and the Qwen3-8B teacher), else the config's random shape. The accelerator and
the device count default to the recipe's HARDWARE (configs/qwen3.py: h100x8, v5p-8, v5e-16).

Every memory option is read from the config (train.remat, student/teacher.attention, rollout.max_rows_per_call,
train.max_score_rows, rollout.release_kv_cache, ...; change them with --config.KEY=VALUE as for a run).
--remat and --attention are shorthands (--attention sets both models). --kv-cache replicated plans a sampler
that does not shard its cache (Sampler(shard_cache=False)). When the plan does not fit, the config changes that make
it fit are listed. Exit status: 0 fits, 1 does not fit, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
from typing import Any
from collections.abc import Sequence

from trd_jax import memory_plan as mp
from trd_jax.models.config import ATTENTION

USAGE_ERROR, DOES_NOT_FIT = 2, 1
UNSET = "<not set: the planner reads no files>"  # stands in for a recipe's empty paths when resolving it


class PlanError(ValueError):
    """A problem with the command line or the config, printed as one line."""


# ------------------------------------------------------------------------------------------------
# Config loading (the recipe file as trd_jax.main loads it, without absl's global flags)


def load_config(config_arg: str):
    """(ConfigDict, path, spec, module) from "path/to/recipe.py[:spec]": get_config(spec) as ml_collections'
    config_flags calls it."""
    path, sep, spec = config_arg.partition(":")
    if not os.path.isfile(path):
        raise PlanError(f"--config {config_arg}: {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"_plan_recipe_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        cfg = module.get_config(spec) if sep else module.get_config()
    except ValueError as e:
        raise PlanError(str(e)) from None
    return cfg, path, spec, module


def _parse_value(text: str, current: Any) -> Any:
    """A command-line value typed like the field it replaces (JSON otherwise: numbers, booleans, null)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{text!r} is not a bool")
        return text.lower() in ("true", "1")
    if isinstance(current, str):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def apply_cli_overrides(cfg, args: Sequence[str]) -> None:
    """--config.section.field=value (or the value as the next argument), as trd_jax.main accepts them."""
    items = list(args)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--config."):
            raise PlanError(f"unknown argument {arg!r}")
        key, sep, text = arg[len("--config."):].partition("=")
        if not sep:
            if not items:
                raise PlanError(f"{arg}: missing value")
            text = items.pop(0)
        node = cfg
        *path, last = key.split(".")
        try:
            for part in path:
                node = node[part]
            current = node[last]
        except (KeyError, AttributeError, TypeError):
            raise PlanError(f"config.{key}: unknown key") from None
        try:
            node[last] = _parse_value(text, current)
        except (ValueError, TypeError) as e:
            raise PlanError(f"config.{key}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Models


def recipe_defaults(module, config_path: str, spec: str) -> dict[str, str]:
    """Built-in models and hardware a recipe names: configs/qwen3.py's STUDENT (its teacher is Qwen3-8B) and
    HARDWARE. Only recipes whose models live outside the config get an entry."""
    if os.path.basename(config_path) == "qwen3.py" and hasattr(module, "parse"):
        _, student, _, hardware = module.parse(spec)
        return {"student": f"qwen3-{student}", "teacher": "qwen3-8b", "hardware": hardware}
    return {}


def parse_model_args(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        side, sep, value = item.partition("=")
        if not sep or side not in ("student", "teacher"):
            raise PlanError(f"--model-config {text!r}: expected student=NAME_OR_PATH,teacher=NAME_OR_PATH")
        out[side] = value
    return out


def resolve_models(cfg, settings, defaults: dict[str, str], given: dict[str, str],
                   vocab: int | None) -> tuple[dict[str, mp.ModelInfo], list[str]]:
    """The student's (and OPD's teacher's) shape in the config's dtypes, and notes on assumptions made."""
    notes: list[str] = []
    sides = ["student"] + (["teacher"] if settings.distill.mode == "opd" else [])
    models = {}
    for side in sides:
        src = getattr(settings, side)
        dtypes = dict(dtype=src.dtype, param_dtype=src.param_dtype)
        try:
            if side in given:
                name = given[side]
                if name in mp.BUILTIN_MODELS:
                    models[side] = mp.ModelInfo(mp.builtin_model(name, **dtypes), f"built-in {name}")
                else:
                    models[side] = mp.ModelInfo(mp.model_from_path(name, **dtypes), name)
            elif src.source == "path" and src.path != UNSET and os.path.exists(src.path):
                models[side] = mp.ModelInfo(mp.model_from_path(src.path, **dtypes), src.path)
            elif side in defaults:
                models[side] = mp.ModelInfo(mp.builtin_model(defaults[side], **dtypes), f"built-in {defaults[side]}"
                                            + (f" ({side}.path {src.path!r} not found)" if src.path != UNSET
                                               else ""))
            elif src.source == "smollm2":
                models[side] = mp.ModelInfo(mp.builtin_model("smollm2-135m", **dtypes), "built-in smollm2-135m")
            elif src.source == "random" or cfg.bootstrap.enabled:
                shape = dict(cfg.bootstrap[f"{side}_model"]) if cfg.bootstrap.enabled else dict(src.shape)
                if vocab is None:
                    notes.append(f"{side}: a random model's vocabulary comes from the task's tokenizer; "
                                 "assumed 1024 (give --vocab)")
                config = mp.ModelConfig(vocab_size=vocab or 1024, **{**shape, **dtypes})
                models[side] = mp.ModelInfo(config, "bootstrap shape" if cfg.bootstrap.enabled else "random shape")
            else:
                raise PlanError(f"{side}.path {src.path!r} holds no config.json: give --model-config "
                                f"{side}=NAME_OR_PATH (built-in: {', '.join(mp.BUILTIN_MODELS)})")
        except ValueError as e:
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"{side}: {e}") from None
        config = models[side].config.replace(attention=src.attention, attention_block=src.attention_block)
        models[side] = dataclasses.replace(models[side], config=config)
    return models, notes


# ------------------------------------------------------------------------------------------------
# Report


def gib(n: int) -> str:
    return f"{n / mp.GiB:,.2f}"


def _row(name: str, n: int, note: str = "", indent: int = 2, exact: bool = False) -> str:
    value = f"{n:>18,d}" if exact else f"{gib(n):>12}"
    return f"{' ' * indent}{name:<52}{value}  {note}".rstrip()


def describe_model(side: str, info: mp.ModelInfo, state: mp.StateBytes) -> str:
    c = info.config
    return (f"{side:<8} {c.architecture} d={c.hidden_size} layers={c.num_layers} heads={c.num_heads}/{c.num_kv_heads}"
            f"x{c.head_dim} mlp={c.intermediate_size} vocab={c.vocab_size}"
            f"{' tied' if c.tie_word_embeddings else ''}: {state.num_params:,} params, {c.param_dtype} params / "
            f"{c.dtype} compute [{info.source}]")


def format_plan(plan: mp.Plan, title: str, *, exact: bool = False) -> str:
    """The plan as a table per device; `exact`: bytes instead of GiB."""
    row = functools.partial(_row, exact=exact)
    w, o, acc = plan.workload, plan.options, plan.accelerator
    lines = [f"Memory plan: {title}",
             f"device   {acc.label}: {gib(acc.hbm_bytes)} GiB; {o.headroom:.0%} headroom -> {gib(plan.usable_bytes)} "
             f"GiB usable" + (f" ({acc.note})" if acc.note else ""),
             (f"mesh     data={plan.mesh['data']} fsdp={plan.mesh['fsdp']} tensor={plan.mesh['tensor']}: "
              f"{plan.devices} devices")]
    lines.append(describe_model("student", plan.models["student"], plan.student_state))
    if plan.teacher_state is not None:
        lines.append(describe_model("teacher", plan.models["teacher"], plan.teacher_state))
    elif w.offline_k:
        lines.append(f"teacher  none: stored top-k targets (offline.dir, k={w.offline_k})")
    else:
        lines.append(f"teacher  the student itself (OPSD, {w.opsd_teacher} weights)")
    lines.append(f"step     {w.rows} rows ({w.batch_size} prompts x n={w.n}), {w.micro_batches} micro-batches of "
                 f"{w.rows // w.micro_batches} rows = {plan.micro_rows_per_device} per device")
    widths = f"widths   rollout {w.prompt} + {w.max_new}"
    if w.trajectory == "y_r":
        widths += f", refine {w.refine_prompt} + {w.rewrite}"
    widths += (f", student layout {w.prompt} + {w.response}, teacher layout {w.teacher_ctx} + {w.response}, "
               f"eval {w.eval_rows} rows x ({w.eval_prompt} + {w.eval_new})")
    lines.append(widths)
    lines.append(f"remat    {o.remat} (train.remat) in the update's backward pass")
    st = plan.student_state
    lines.append(f"lora     r={o.lora.rank} alpha={o.lora.alpha:g} on {','.join(o.lora.targets)}: "
                 f"{st.trainable_params:,} "
                 f"trainable parameters ({st.trainable_params / st.num_params:.2%} of the model), the base frozen"
                 if o.lora else "lora     off: full fine-tuning (lora.enabled)")
    kernels = "/".join(plan.models[side].config.attention for side in plan.models)
    lines.append(f"options  attention {kernels} ({'/'.join(plan.models)}), KV cache {o.kv_cache}, sampler rows/call "
                 f"{o.sampler_rows or 'all'}, score rows/call {o.score_rows or 'all'}, sampler caches "
                 f"{'freed as their phase ends' if w.release_kv_cache else 'kept between steps'}")
    for note in w.notes:
        lines.append(f"note     {note}")
    lines += ["", f"{'per device':<54}{'bytes' if exact else 'GiB':>{18 if exact else 12}}", "persistent (every phase)"]
    lines += [row(i.name, i.bytes, i.note) for i in plan.persistent]
    lines.append(row("total", plan.persistent_bytes, indent=4))
    peak = plan.peak_phase
    for phase in plan.phases:
        lines.append(f"{phase.name}{'  <- peak' if phase is peak else ''}")
        lines += [row(i.name, i.bytes, i.note) for i in phase.items if i.bytes]
        lines.append(row("phase + persistent", phase.bytes + plan.persistent_bytes, indent=4))
    u = plan.update
    s, dev_rows = plan.models["student"].config, plan.micro_rows_per_device
    logits = mp.full_logits_bytes(s.vocab_size, dev_rows, w.response)
    width = s.vocab_size if w.loss.vocab_chunk is None else w.loss.vocab_chunk
    lines += ["", (f"update step, one micro-batch ({dev_rows} rows x {w.prompt + w.response} tokens per device, "
                   f"remat {o.remat}, attention {s.attention})"),
              row(f"saved activations ({s.num_layers} layers)", u.saved),
              row("one layer's backward (cotangents + recompute)", u.layer_backward),
              row("embeddings, rope tables, mask, final hidden", u.model_level),
              row(f"fused loss: {w.loss.chunk_size} x {width} f32 chunks + head grad", u.loss,
                   f"unfused: one f32 [{dev_rows}, {w.response}, {s.vocab_size}] = {gib(logits)} GiB, x3+"),
              row("gradients (accumulator + micro-batch)", u.gradients),
              row("FSDP all-gathers (2 layers + heads)", u.gathered),
              row("AdamW temporaries (after the scan)", u.optimizer),
              row("peak: saved + grads + gathers + max(loss, layer bwd)", u.total, indent=4)]
    lines.append("")
    for warning in plan.warnings:
        lines.append(warning)
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    margin = plan.usable_bytes - plan.peak_bytes
    lines.append(f"peak     {peak.name}: {gib(plan.peak_bytes)} GiB of {gib(plan.usable_bytes)} GiB usable -> {verdict}"
                 + (f" ({gib(margin)} GiB to spare, {gib(acc.hbm_bytes - plan.peak_bytes)} GiB below the HBM)"
                    if plan.fits else f" (over by {gib(-margin)} GiB)"))
    return "\n".join(lines)


def format_suggestions(applied: list[tuple[mp.Change, int]], final: mp.Plan) -> str:
    if not applied:
        return "to fit   no modelled change makes it fit (fewer rows per step or shorter budgets, or more devices)"
    lines = ["to fit   these config changes, with the least throughput lost; listed by impact"]
    for i, (change, peak) in enumerate(applied, 1):
        how = " ".join(f"--config.{k}={v}" for k, v in change.config)
        lines.append(f"  {i}. {change.label}: {how}  -> peak {gib(peak)} GiB")
    status = "fits" if final.fits else "still does not fit"
    lines.append(f"  => peak {final.peak_phase.name} {gib(final.peak_bytes)} GiB of {gib(final.usable_bytes)} GiB "
                 f"usable: {status}")
    return "\n".join(lines)


def format_validation(plan: mp.Plan) -> str:
    """The update step of a small model shaped like the student (same family switches), compiled on this
    machine's CPU, against the analytical estimate."""
    s = plan.models["student"].config
    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=16, qk_norm=s.qk_norm, qkv_bias=s.qkv_bias, tie_word_embeddings=s.tie_word_embeddings)
    case = dict(model=small, rows=2, context=16, response=240, chunk_size=32, teacher_hidden=64,
                remat=plan.options.remat)
    measured = mp.measure_in_subprocess([case])[0]["temp"]
    kw = {k: v for k, v in case.items() if k != "model"}
    estimate = mp.analytical_update_temp(mp.ModelConfig(**small), **kw)
    return (f"validate update step of a small {s.architecture}-like model (d=64, 4 layers, 2 rows x 256 tokens, "
            f"remat {plan.options.remat}) compiled on CPU: memory_analysis temp {measured / 2**20:.2f} MiB, "
            f"analytical {estimate / 2**20:.2f} MiB (ratio {estimate / measured:.2f})")


# ------------------------------------------------------------------------------------------------


def build(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="python -m trd_jax.memory_plan", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="recipe file[:spec], e.g. configs/qwen3.py:opd,1.7b,trd,v5p-8")
    parser.add_argument("--accelerator", choices=sorted(mp.ACCELERATORS))
    parser.add_argument("--devices", type=int, help="devices of the mesh (default: the recipe's hardware)")
    parser.add_argument("--model-config", default="", help="student=NAME_OR_PATH,teacher=NAME_OR_PATH")
    parser.add_argument("--vocab", type=int, help="vocabulary of randomly initialised models")
    parser.add_argument("--remat", choices=mp.REMAT, help="rematerialisation (default: the config's train.remat)")
    parser.add_argument("--attention", choices=ATTENTION,
                        help="attention kernel of both models (default: student/teacher.attention)")
    parser.add_argument("--kv-cache", choices=mp.KV_CACHE,
                        help="KV cache placement (default: sharded over the batch axes, as the Sampler does)")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of the memory kept free")
    parser.add_argument("--validate", action="store_true",
                        help="also compile a small update step on this CPU and compare with the estimate")
    parser.add_argument("--no-suggest", action="store_true", help="do not search for changes that make it fit")
    parser.add_argument("--bytes", action="store_true", help="print exact bytes instead of GiB")
    args, rest = parser.parse_known_args(argv)

    from trd_jax.config import ConfigError, resolve

    cfg, path, spec, module = load_config(args.config)
    if args.attention:  # shorthands first: a --config.KEY=VALUE given as well wins
        cfg.student.attention = cfg.teacher.attention = args.attention
    if args.remat:
        cfg.train.remat = args.remat
    apply_cli_overrides(cfg, rest)
    # Memory depends on neither data nor weights: a recipe planned before its files exist still resolves.
    for key in ("train_files", "eval_files"):
        if key in cfg.task and not cfg.task[key]:
            cfg.task[key] = UNSET
    for side in ("student", "teacher"):
        if cfg[side].source == "path" and not cfg[side].path:
            cfg[side].path = UNSET
    try:
        settings = resolve(cfg)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    defaults = recipe_defaults(module, path, spec)
    hardware = mp.HARDWARE.get(defaults.get("hardware", ""))
    accelerator = args.accelerator or (hardware[0] if hardware else None)
    if accelerator is None:
        raise PlanError("--accelerator is required (the recipe names no hardware)")
    devices = args.devices or (hardware[1] if hardware and not args.accelerator else None)
    try:
        mesh = mp.mesh_sizes(settings.mesh, devices)
        overrides = {"kv_cache": args.kv_cache} if args.kv_cache else {}
        options = mp.options_from_settings(settings, headroom=args.headroom, **overrides)
    except ValueError as e:
        raise PlanError(str(e)) from None
    models, notes = resolve_models(cfg, settings, defaults, parse_model_args(args.model_config), args.vocab)
    work = mp.workload_from_settings(settings)
    work = dataclasses.replace(work, notes=work.notes + tuple(notes))
    return args, work, models, mesh, mp.ACCELERATORS[accelerator], options


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, work, models, mesh, accelerator, options = build(argv)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    plan = mp.make_plan(work, models, mesh, accelerator, options)
    print(format_plan(plan, args.config, exact=args.bytes))
    if not plan.fits and not args.no_suggest:
        applied, final = mp.suggest(work, models, mesh, accelerator, options)
        print(format_suggestions(applied, final))
    if args.validate:
        print(format_validation(plan))
    return 0 if plan.fits else DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
