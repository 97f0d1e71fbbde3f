"""The run configuration: every field with its default and meaning (``base_config``, kept in
trd_jax/config_defaults.py and re-exported here), and the checks that turn a ConfigDict into the typed
settings the controller uses (``resolve``).

Recipes in configs/ start from ``base_config()`` and change what they need; the command line overrides
any field with ``--config.section.field=value``. ``resolve`` rejects unknown values, wrong types and
impossible combinations with a ``ConfigError`` that names the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import importlib.util
import re
from typing import Any

import ml_collections

from trd_jax.config_defaults import base_config
from trd_jax.data.task import TaskSettings
from trd_jax.errors import ConfigError, config_error
from trd_jax.metrics import WandbSettings
from trd_jax.models.config import ATTENTION, REMAT
from trd_jax.models.lora import TARGETS as LORA_TARGETS, LoRAConfig
from trd_jax.refine import RefineConfig
from trd_jax.sampling import ContinuousConfig, SamplingConfig
from trd_jax.sharding import MeshConfig
from trd_jax.losses import LOSSES, LossConfig
from trd_jax.steps import OPSD_TEACHER_MODES, OptimConfig
from trd_jax.tokenization import PROMPT_MODES

# Each task name and the refine templates its prompts take (trd_jax.prompts.TASKS): the kind of every task
# is fixed by its name, so the refine settings are complete at resolve time.
TASK_KINDS = {"arithmetic": "math", "math": "math", "mini_math": "math", "code": "code"}

# ------------------------------------------------------------------------------------------------
# Resolution into typed settings


def _choice(cfg, key: str, valid) -> str:
    value = _get(cfg, key)
    if value not in valid:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, valid))}")
    return value


def _get(cfg, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _int(cfg, key: str, low: int | None = None) -> int:
    value = _get(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not an integer")
    if low is not None and value < low:
        raise ConfigError(key, f"{value} must be >= {low}")
    return value


def _float(cfg, key: str, low: float | None = None, high: float | None = None, *, open_low=False) -> float:
    value = _get(cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not a number")
    value = float(value)
    if low is not None and (value <= low if open_low else value < low):
        raise ConfigError(key, f"{value} must be {'>' if open_low else '>='} {low}")
    if high is not None and value > high:
        raise ConfigError(key, f"{value} must be <= {high}")
    return value


@dataclasses.dataclass(frozen=True)
class ModelSource:
    source: str
    path: str
    dtype: str
    param_dtype: str
    init_seed: int
    shape: dict
    attention: str = "dense"  # ModelConfig.attention
    attention_block: int = 512


# The embedded task's bootstrap (trd_jax/bootstrap.py trains these models).
@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    teacher: ModelShape = ModelShape(128, 384, 2, 4, 2, 32)
    student: ModelShape = ModelShape(96, 256, 2, 4, 2, 24)
    # Two phases each: solving alone first (the arithmetic is learned fastest without attempts in context,
    # whose flawed lines would contradict it), then the full mixture.
    teacher_solve_steps: int = 300
    # 2000 mixed steps: with 1000 the teacher rewrote the student's rollouts correctly 45% of the time on one
    # bootstrap of three (95% and 90% on the others), with 2000 99% on that one (docs/reproduction); with 450
    # the repair skill below costs the teacher most of its rewriting accuracy.
    teacher_mixed_steps: int = 2000
    student_solve_steps: int = 300
    # 1600 steps with the reference sets weighted up: with 200 steps at weight 0.5 the student shown the
    # reference (OPSD's teacher) solved 9% of problems, worse than alone; with 800 (refine weight 2) its rewrites
    # were right less often than the rollouts they rewrote on one bootstrap of two (52 vs 56%); with 1600 and
    # refine weight 4, 93-97% against 32-50% on both (docs/reproduction/budget.md).
    student_mixed_steps: int = 1600
    batch_tokens: int = 4096  # tokens per SFT batch (rows = this // padded row width)
    learning_rate: float = 3e-3
    # The student's misconception (trd_jax/data/arithmetic.py, buggy_values): each line of its solve targets
    # that crosses the modulus is off by one with this probability, and later lines carry the error forward.
    # Above 0.5 its most likely token at a wrap is wrong, so its mistakes survive the evaluation's
    # temperature 0.6 (random noise does not: the mode of noisy targets is still the right value).
    student_bug_rate: float = 0.9
    # Each plain fact (a op b, no wrap) is misremembered by the student with this probability, drawn once per
    # bootstrap seed (arithmetic.misremembered_facts; its solve targets get it wrong at student_bug_rate).
    # Meant to keep headroom that the wrap misconception alone (one rule, unlearned at once) does not; at 0.5 a
    # student starting at 23% still learned every fact back within 20 steps (docs/reproduction/budget.md), so 0.
    student_wrong_fact_rate: float = 0.0
    # (Not in a bootstrap's identity while 0, so bootstraps built before it existed keep theirs.)
    # Fraction of lines written in the complement form ("add 2" as "- 8") in the solve targets: the task's
    # alternative derivations. Complement lines cross the modulus more often, so the student's form choices
    # matter to its accuracy.
    student_alt_form_rate: float = 0.0
    teacher_alt_form_rate: float = 0.0
    student_reference_weight: float = 2.0  # sampling weight of x + y* -> y* against 2 for the noisy solutions
    # Sampling weight of the OPSD refine prompt -> rewrite (the self-teacher's rewriting skill).
    student_refine_weight: float = 4.0
    # The teacher also learns to go on after a flawed prefix: repairing (this fraction) or continuing
    # consistently with the error, like a real model that sometimes backtracks, so its next-token
    # distribution after a wrong step is the bimodal mixture of prefix failure (TRD_SPEC §2). With 0 it
    # always continues consistently and token-level targets on flawed rollouts are not fragmented.
    repair_fraction: float = 0.5
    # The fraction of those flawed prefixes whose wrong line is the student's kind (one too far where a line
    # crosses the modulus) rather than any wrong digit at any line.
    repair_on_student_errors: float = 0.0
    seed: int = 0


def bootstrap_config(cfg):
    """The BootstrapConfig of cfg.bootstrap (checked), or None when bootstrapping is off."""
    for key in ("enabled", "from_scratch"):
        if not isinstance(cfg.bootstrap[key], bool):
            raise ConfigError(f"bootstrap.{key}", f"{cfg.bootstrap[key]!r} is not a bool")
    for key in ("dir", "teacher_from"):
        if not isinstance(cfg.bootstrap[key], str):
            raise ConfigError(f"bootstrap.{key}", f"{cfg.bootstrap[key]!r} is not a string")
    if not cfg.bootstrap.enabled:
        return None
    if cfg.task.name != "arithmetic":
        raise ConfigError("bootstrap.enabled", f"bootstrapping trains models for the 'arithmetic' task, not "
                                               f"{cfg.task.name!r}; give student.path / teacher.path instead")
    for side in ("student", "teacher"):  # the bootstrap supplies both models: a given one would be ignored
        if cfg[side].source != "random" or cfg[side].path:
            raise ConfigError(f"{side}.source", f"{cfg[side].source!r} (path {cfg[side].path!r}) would be replaced "
                                                f"by the bootstrap's {side}: set bootstrap.enabled=false to use it")
    shapes = {}
    for role in ("teacher", "student"):
        fields = {f.name: _int(cfg, f"bootstrap.{role}_model.{f.name}", 1) for f in dataclasses.fields(ModelShape)}
        if fields["num_heads"] % fields["num_kv_heads"]:
            raise ConfigError(f"bootstrap.{role}_model.num_kv_heads", "must divide num_heads")
        shapes[role] = ModelShape(**fields)
    steps = {k: _int(cfg, f"bootstrap.{k}", 0) for k in ("teacher_solve_steps", "teacher_mixed_steps",
                                                         "student_solve_steps", "student_mixed_steps")}
    return BootstrapConfig(teacher=shapes["teacher"], student=shapes["student"], **steps,
                           batch_tokens=_int(cfg, "bootstrap.batch_tokens", 64),
                           learning_rate=_float(cfg, "bootstrap.learning_rate", 0.0, open_low=True),
                           student_bug_rate=_float(cfg, "bootstrap.student_bug_rate", 0.0, 1.0),
                           student_wrong_fact_rate=_float(cfg, "bootstrap.student_wrong_fact_rate", 0.0, 1.0),
                           student_alt_form_rate=_float(cfg, "bootstrap.student_alt_form_rate", 0.0, 1.0),
                           teacher_alt_form_rate=_float(cfg, "bootstrap.teacher_alt_form_rate", 0.0, 1.0),
                           student_reference_weight=_float(cfg, "bootstrap.student_reference_weight", 0.0),
                           student_refine_weight=_float(cfg, "bootstrap.student_refine_weight", 0.0),
                           repair_fraction=_float(cfg, "bootstrap.repair_fraction", 0.0, 1.0),
                           repair_on_student_errors=_float(cfg, "bootstrap.repair_on_student_errors", 0.0, 1.0),
                           seed=_int(cfg, "bootstrap.seed", 0))


@dataclasses.dataclass(frozen=True)
class TeacherSFTConfig:
    """cfg.teacher_sft, checked (trd_jax/teacher_sft.py)."""
    steps: int
    learning_rate: float
    batch_tokens: int
    refine_weight: float  # sampling weight of the refine set against the solve set (weight 1)
    correct_attempt_rate: float
    seed: int


def teacher_sft_config(cfg):
    """The TeacherSFTConfig of cfg.teacher_sft (checked), or None when it is off."""
    if not isinstance(cfg.teacher_sft.enabled, bool):
        raise ConfigError("teacher_sft.enabled", f"{cfg.teacher_sft.enabled!r} is not a bool")
    if not cfg.teacher_sft.enabled:
        return None
    if cfg.distill.mode != "opd":
        raise ConfigError("teacher_sft.enabled", "fine-tunes OPD's separate teacher; OPSD has none")
    if cfg.task.name not in ("math", "mini_math"):
        raise ConfigError("teacher_sft.enabled", f"trains on reference solutions of a math task, not {cfg.task.name!r}")
    if not isinstance(cfg.teacher_sft.dir, str):
        raise ConfigError("teacher_sft.dir", f"{cfg.teacher_sft.dir!r} is not a string")
    return TeacherSFTConfig(steps=_int(cfg, "teacher_sft.steps", 1),
                            learning_rate=_float(cfg, "teacher_sft.learning_rate", 0.0, open_low=True),
                            batch_tokens=_int(cfg, "teacher_sft.batch_tokens", 64),
                            refine_weight=_float(cfg, "teacher_sft.refine_weight", 0.0),
                            correct_attempt_rate=_float(cfg, "teacher_sft.correct_attempt_rate", 0.0, 1.0),
                            seed=_int(cfg, "teacher_sft.seed", 0))


@dataclasses.dataclass(frozen=True)
class OfflineSettings:
    """Stored targets (trd_jax/offline): where they are, what a shard keeps, and the rounds of a run that
    regenerates them (in the run itself, or in a separate teacher job: offline/teacher_job.py)."""
    dir: str = ""  # "" = no stored targets (config offline.dir)
    top_k: int = 64
    rounds: int = 0  # > 0: targets regenerated every steps_per_round steps (offline/rounds.py)
    steps_per_round: int = 0
    teacher_job: bool = False  # the rounds' targets come from a separate mode=generate job
    max_lag: int = 0  # round r's targets come from the student of round r - max_lag (teacher_job)
    wait_report_s: float = 60.0
    wait_timeout_s: float = 0.0  # 0: wait for the other job for ever

    @property
    def loads_teacher(self) -> bool:
        """Whether a training run on these targets needs the teacher: only to generate its own rounds."""
        return self.rounds > 0 and not self.teacher_job


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """The distill section: which distillation runs (TRD_SPEC §3, §7.9)."""

    mode: str  # opd | opsd
    trajectory: str  # y_r (TRD) | y_o (token-level baselines)
    teacher_context: str  # refine | vanilla
    opsd_teacher: str  # initial | live | ema
    ema_decay: float | None  # opsd_teacher "ema" only


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """The rollout section: how the student samples y_o, and how the samplers of rollout and evaluation run."""

    sampling: SamplingConfig
    n: int  # samples per prompt
    max_new: int  # response budget of y_o
    release_kv_cache: bool  # free each sampler's cache when its phase ends
    max_rows_per_call: int  # rows per sampler call (0: all at once)
    prompt_lookup_tokens: int  # rollout and evaluation drafts from the prompt (0: plain decoding)
    continuous: ContinuousConfig  # rollout and evaluation through continuous batching (slots 0: off), paged or not


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The eval section: when, on how many problems, how many samples, how sampled (evaluator.py)."""

    every: int  # every this many steps (0: only before and after training)
    initial: bool  # the student before training
    teacher: bool  # the teacher once, in its vanilla context
    problems: int  # problems of the eval split (0: all)
    n: int  # samples per problem
    k: int  # Pass@k
    max_new: int  # response budget
    greedy: bool  # also one temperature-0 sample per problem
    sampling: SamplingConfig


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The train section: the optimizer steps and how each step's rows are batched and recomputed."""

    steps: int
    batch_size: int  # prompts per step
    micro_batches: int
    remat: str  # ModelConfig.remat of the student model the update runs
    max_score_rows: int  # rows per scoring forward (0: all at once)
    max_skipped_fraction: float = 0.5  # of steps, skipped as non-finite, before the run fails
    length_buckets: bool = True  # micro-batches of rows sorted by length, each at its own widths


@dataclasses.dataclass(frozen=True)
class LogSettings:
    diagnostics: bool  # prefix-failure diagnostics
    diagnostics_every: int
    progress: bool  # the console progress bar
    wandb: WandbSettings | None = None  # the W&B sink of the metrics; None: off (config.log.wandb)


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    enabled: bool  # the final student as a Hugging Face folder in workdir/export
    dtype: str  # "" keeps the parameter dtype


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every: int  # save every this many steps (and on SIGTERM and at the end)
    keep: int  # newest checkpoints kept
    async_save: bool  # written in a background thread


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated, typed view of a run configuration."""

    seed: int
    distill: DistillSettings
    student: ModelSource
    teacher: ModelSource | None
    refine: RefineConfig
    rollout: RolloutSettings
    eval: EvalSettings
    refine_sampling: SamplingConfig
    loss: LossConfig
    optim: OptimConfig
    mesh: MeshConfig
    train: TrainSettings
    lora: LoRAConfig | None  # the student's adapters; None: full fine-tuning
    checkpoint: CheckpointSettings
    log: LogSettings
    export: ExportSettings
    task: TaskSettings
    evaluate_only: bool  # config.mode == "eval": the student alone is evaluated, nothing trains
    # mode "train" with offline.dir: the stored targets (trd_jax/offline) train the student, no teacher is loaded
    targets_dir: str = ""  # offline.dir in train mode: the student trains on stored targets
    offline: OfflineSettings = OfflineSettings()
    # The embedded task's bootstrap (None: off) and where its models are cached.
    bootstrap: BootstrapConfig | None = None
    bootstrap_dir: str = ""  # "" = workdir/bootstrap
    bootstrap_from_scratch: bool = False
    bootstrap_teacher_from: str = ""  # a finished bootstrap whose teacher is copied instead of trained
    # OPD's teacher fine-tuned before the run (None: off) and where it is cached.
    teacher_sft: TeacherSFTConfig | None = None
    teacher_sft_dir: str = ""  # "" = workdir/teacher_sft


def _model_source(cfg, side: str) -> ModelSource:
    source = _choice(cfg, f"{side}.source", ("random", "path", "smollm2"))
    path = _get(cfg, f"{side}.path")
    if source == "path" and not path:
        raise ConfigError(f"{side}.path", f"is empty but {side}.source='path'")
    dtype = _choice(cfg, f"{side}.dtype", ("float32", "bfloat16"))
    param_dtype = _get(cfg, f"{side}.param_dtype") or dtype
    if param_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"{side}.param_dtype", f"{param_dtype!r} is not one of float32, bfloat16")
    shape = {}
    for name, value in _get(cfg, f"{side}.model").items():
        key = f"{side}.model.{name}"
        if name == "tie_word_embeddings":
            if not isinstance(value, bool):
                raise ConfigError(key, f"{value!r} is not a bool")
        elif name == "rope_theta":
            _float(cfg, key, 0.0, open_low=True)
        else:
            _int(cfg, key, 1)
        shape[name] = value
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise ConfigError(f"{side}.model.num_kv_heads", f"{shape['num_kv_heads']} does not divide num_heads "
                                                        f"{shape['num_heads']}")
    if shape["head_dim"] % 2:
        raise ConfigError(f"{side}.model.head_dim", f"{shape['head_dim']} must be even (rotary embeddings)")
    return ModelSource(source, path, dtype, param_dtype, _int(cfg, f"{side}.init_seed", -1), shape,
                       _choice(cfg, f"{side}.attention", ATTENTION), _int(cfg, f"{side}.attention_block", 1))


def _lora(cfg) -> LoRAConfig | None:
    if not isinstance(cfg.lora.enabled, bool):
        raise ConfigError("lora.enabled", f"{cfg.lora.enabled!r} is not a bool")
    if not isinstance(cfg.lora.use_rslora, bool):
        raise ConfigError("lora.use_rslora", f"{cfg.lora.use_rslora!r} is not a bool")
    rank = _int(cfg, "lora.rank", 1)
    alpha = _float(cfg, "lora.alpha", 0.0, open_low=True)
    dropout = _float(cfg, "lora.dropout", 0.0)
    if dropout >= 1.0:
        raise ConfigError("lora.dropout", f"{dropout} must be < 1")
    text = _get(cfg, "lora.targets")
    targets = [t.strip() for t in text.split(",")] if isinstance(text, str) else None
    if not targets or not all(targets):
        raise ConfigError("lora.targets", f"{text!r}: expected a comma-separated subset of {','.join(LORA_TARGETS)}")
    for target in targets:
        if target not in LORA_TARGETS:
            raise ConfigError("lora.targets", f"{target!r} is not one of {', '.join(LORA_TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ConfigError("lora.targets", f"{text!r} names a projection twice")
    if not cfg.lora.enabled:
        return None
    return LoRAConfig(rank=rank, alpha=alpha, targets=tuple(targets), dropout=dropout,
                      use_rslora=cfg.lora.use_rslora)


def _loss(cfg) -> LossConfig:
    name = _choice(cfg, "loss.name", tuple(LOSSES))
    params = []
    for param, field in LOSSES[name].fields.items():
        key = f"loss.{field}"
        if field == "top_k":
            params.append((param, _int(cfg, key, 1)))
        elif field == "jsd_beta":
            params.append((param, _float(cfg, key, 0.0, 1.0)))
        elif field == "pg_dual_clip":
            value = _get(cfg, key)
            if value is not None and _float(cfg, key) <= 1.0:
                raise ConfigError(key, f"{value} must be > 1 (or None to disable the dual clip)")
            params.append((param, None if value is None else float(value)))
        else:
            params.append((param, _float(cfg, key, 0.0, open_low=True)))
    vocab_chunk = _int(cfg, "loss.vocab_chunk", 0)
    return LossConfig(name=name, params=tuple(params), temperature=_float(cfg, "loss.temperature", 0.0, open_low=True),
                      chunk_size=_int(cfg, "loss.chunk_size", 1), vocab_chunk=vocab_chunk or None)


def _refine_sampling(cfg, rollout: SamplingConfig) -> SamplingConfig:
    """refine.temperature / top_k / top_p, each -1 meaning the rollout's value."""
    values = {}
    for name, default in (("temperature", rollout.temperature), ("top_k", rollout.top_k), ("top_p", rollout.top_p)):
        value = _get(cfg, f"refine.{name}")
        values[name] = default if value == -1 else value
    try:
        return SamplingConfig(**values)
    except ValueError as e:
        raise config_error("refine", e, " (or -1: the rollout's value)") from None


def _sampling(cfg, section: str) -> SamplingConfig:
    return SamplingConfig(temperature=_float(cfg, f"{section}.temperature", 0.0),
                          top_k=_int(cfg, f"{section}.top_k", 0),
                          top_p=_float(cfg, f"{section}.top_p", 0.0, 1.0, open_low=True))


def _continuous(cfg) -> ContinuousConfig:
    slots = _int(cfg, "rollout.continuous_slots", 0)
    page_size, pool = _int(cfg, "rollout.kv_page_size", 0), _int(cfg, "rollout.kv_pool_tokens", 0)
    if (page_size or pool) and not slots:
        raise ConfigError("rollout.kv_page_size", "a paged KV cache is continuous batching's: set "
                                                  "rollout.continuous_slots > 0 too")
    if pool and not page_size:
        raise ConfigError("rollout.kv_pool_tokens", "set rollout.kv_page_size too")
    if pool:  # the longest row of the student's samplers (rollout and evaluation) must fit, or no row could run
        longest = _int(cfg, "task.max_prompt_tokens", 1) + max(_int(cfg, "rollout.max_new_tokens", 1),
                                                              _int(cfg, "eval.max_new_tokens", 1)) - 1
        if pool // page_size < -(-longest // page_size):
            raise ConfigError("rollout.kv_pool_tokens", f"{pool} tokens in pages of {page_size} cannot hold the "
                                                        f"longest row: task.max_prompt_tokens + the largest of "
                                                        f"rollout/eval.max_new_tokens = {longest + 1} positions")
    return ContinuousConfig(slots=slots, page_size=page_size, pool_tokens=pool)


def _refine(cfg, mode: str, task_kind: str) -> RefineConfig:
    fields = {}
    for f in dataclasses.fields(RefineConfig):
        if f.name in ("mode", "task"):
            continue
        value = _get(cfg, f"refine.{f.name}")
        if isinstance(f.default, int) and not isinstance(f.default, bool):
            value = _int(cfg, f"refine.{f.name}")
        fields[f.name] = value
    try:
        return RefineConfig(mode=mode, task=task_kind, **fields)
    except ValueError as e:
        raise config_error("refine", e) from None


def _offline(cfg, run_mode: str) -> OfflineSettings:
    directory = str(cfg.offline.dir)
    if directory and "://" not in directory:  # a teacher job and a training job started in other folders agree
        directory = os.path.abspath(os.path.expanduser(directory))
    rounds, teacher_job = _int(cfg, "offline.rounds", 0), cfg.offline.teacher_job
    if not isinstance(teacher_job, bool):
        raise ConfigError("offline.teacher_job", f"{teacher_job!r} is not true or false")
    per_round = max_lag = 0
    if rounds:
        if run_mode == "eval" or not directory:
            raise ConfigError("offline.rounds", "needs an offline.dir for the rounds' targets (mode train or generate)")
        if run_mode == "generate" and not teacher_job:
            raise ConfigError("offline.rounds", "with mode=generate, set offline.teacher_job=true: the generate job "
                                                "then writes the rounds of a training job that runs beside it")
        per_round = _int(cfg, "offline.steps_per_round", 1)
        if rounds * per_round != _int(cfg, "train.steps", 1):
            raise ConfigError("offline.rounds", f"{rounds} rounds x offline.steps_per_round={per_round} must "
                                                f"equal train.steps={cfg.train.steps}")
        max_lag = _int(cfg, "offline.max_lag", 0)
        if max_lag >= rounds:
            raise ConfigError("offline.max_lag", f"{max_lag} must be < offline.rounds={rounds}")
    elif teacher_job:
        raise ConfigError("offline.teacher_job", "needs offline.rounds >= 1 (and offline.steps_per_round): the "
                                                 "teacher job writes the targets round by round")
    if run_mode == "generate" and not directory:
        raise ConfigError("offline.dir", "mode=generate writes its targets there: give a folder")
    return OfflineSettings(dir=directory, top_k=_int(cfg, "offline.top_k", 1), rounds=rounds,
                           steps_per_round=per_round, teacher_job=teacher_job, max_lag=max_lag,
                           wait_report_s=_float(cfg, "offline.wait_report_s", 0.0, open_low=True),
                           wait_timeout_s=_float(cfg, "offline.wait_timeout_s", 0.0))


def resolve(cfg: ml_collections.ConfigDict) -> Settings:
    """Checks every field and combination; returns the typed settings or raises ConfigError. Called once per
    run (main.py hands the result to the Trainer); nothing rewrites the settings afterwards."""
    known = base_config()
    _check_keys(cfg, known, "")
    run_mode = _choice(cfg, "mode", ("train", "eval", "generate"))
    offline = _offline(cfg, run_mode)
    bootstrap = bootstrap_config(cfg)
    mode = _choice(cfg, "distill.mode", ("opd", "opsd"))
    teacher_sft = teacher_sft_config(cfg)
    trajectory = _choice(cfg, "distill.trajectory", ("y_r", "y_o"))
    teacher_context = _choice(cfg, "distill.teacher_context", ("refine", "vanilla"))
    if teacher_context == "refine" and trajectory == "y_o":
        raise ConfigError("distill.teacher_context", "'refine' conditions the teacher on the refine prompt that "
                                                     "produced y_r; with trajectory='y_o' use 'vanilla'")
    if trajectory == "y_o":
        for key, default in (("refine.rows", "all"), ("refine.on_wrong_rewrite", "keep")):
            if _get(cfg, key) != default:
                raise ConfigError(key, f"{_get(cfg, key)!r} applies to rewrites (distill.trajectory='y_r'); with "
                                       f"trajectory='y_o' leave it {default!r}")
    opsd_teacher = _choice(cfg, "distill.opsd_teacher", OPSD_TEACHER_MODES)
    ema_decay = None
    if mode == "opsd" and opsd_teacher == "ema":
        ema_decay = _float(cfg, "distill.ema_decay", 0.0, open_low=True)
        if ema_decay >= 1.0:
            raise ConfigError("distill.ema_decay", f"{ema_decay} must be < 1")
    _choice(cfg, "task.prompt_mode", PROMPT_MODES)
    _int(cfg, "task.max_prompt_tokens", 1)
    _check_task(cfg)
    task = TaskSettings(**cfg.task.to_dict())
    rollout_n = _int(cfg, "rollout.n", 1)
    batch_size = _int(cfg, "train.batch_size", 1)
    micro = _int(cfg, "train.micro_batches", 1)
    if (batch_size * rollout_n) % micro:
        raise ConfigError("train.micro_batches", f"{micro} does not divide the {batch_size * rollout_n} rows of a "
                                                 f"step (train.batch_size * rollout.n)")
    steps = _int(cfg, "train.steps", 0)
    max_skipped_fraction = _float(cfg, "train.max_skipped_fraction", 0.0, 1.0)
    remat = _choice(cfg, "train.remat", REMAT)
    rollout = _sampling(cfg, "rollout")
    warmup = _float(cfg, "optim.warmup_ratio", 0.0, 1.0)
    optim = OptimConfig(learning_rate=_float(cfg, "optim.learning_rate", 0.0, open_low=True),
                        warmup_steps=int(round(warmup * steps)), total_steps=steps,
                        min_lr_ratio=_float(cfg, "optim.min_lr_ratio", 0.0, 1.0),
                        b1=_float(cfg, "optim.b1", 0.0, 1.0), b2=_float(cfg, "optim.b2", 0.0, 1.0),
                        weight_decay=_float(cfg, "optim.weight_decay", 0.0),
                        clip_norm=_float(cfg, "optim.clip_norm", 0.0, open_low=True))
    eval_n = _int(cfg, "eval.n", 1)
    eval_k = _int(cfg, "eval.k", 0) or eval_n
    if eval_k > eval_n:
        raise ConfigError("eval.k", f"{eval_k} exceeds eval.n={eval_n} samples per problem")
    mesh_sizes = {}
    for axis in ("data", "fsdp", "tensor"):
        size = _int(cfg, f"mesh.{axis}", -1)
        if size == 0:
            raise ConfigError(f"mesh.{axis}", "must be -1 or >= 1")
        mesh_sizes[axis] = size
    if list(mesh_sizes.values()).count(-1) > 1:
        raise ConfigError("mesh", "at most one axis may be -1")
    export_dtype = _get(cfg, "export.dtype")
    if export_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError("export.dtype", f"{export_dtype!r} is not one of '', float32, bfloat16")
    for key in ("train.length_buckets", "rollout.release_kv_cache", "eval.initial", "eval.teacher", "eval.greedy",
                "checkpoint.async_save", "log.diagnostics", "log.progress", "log.wandb", "export.enabled"):
        if not isinstance(_get(cfg, key), bool):
            raise ConfigError(key, f"{_get(cfg, key)!r} is not a bool")
    wandb = _wandb(cfg)
    return Settings(
        seed=_int(cfg, "seed", 0),
        distill=DistillSettings(mode=mode, trajectory=trajectory, teacher_context=teacher_context,
                                opsd_teacher=opsd_teacher, ema_decay=ema_decay),
        student=_model_source(cfg, "student"),
        teacher=_model_source(cfg, "teacher") if mode == "opd" else None,
        refine=_refine(cfg, mode, TASK_KINDS[task.name]),
        rollout=RolloutSettings(sampling=rollout, n=rollout_n, max_new=_int(cfg, "rollout.max_new_tokens", 1),
                                release_kv_cache=cfg.rollout.release_kv_cache,
                                max_rows_per_call=_int(cfg, "rollout.max_rows_per_call", 0),
                                prompt_lookup_tokens=_int(cfg, "rollout.prompt_lookup_tokens", 0),
                                continuous=_continuous(cfg)),
        refine_sampling=_refine_sampling(cfg, rollout),
        eval=EvalSettings(every=_int(cfg, "eval.every", 0), initial=cfg.eval.initial, teacher=cfg.eval.teacher,
                          problems=_int(cfg, "eval.num_problems", 0), n=eval_n, k=eval_k,
                          max_new=_int(cfg, "eval.max_new_tokens", 1), greedy=cfg.eval.greedy,
                          sampling=_sampling(cfg, "eval")),
        loss=_loss(cfg), optim=optim, mesh=MeshConfig(**mesh_sizes),
        train=TrainSettings(steps=steps, batch_size=batch_size, micro_batches=micro, remat=remat,
                            max_score_rows=_int(cfg, "train.max_score_rows", 0),
                            max_skipped_fraction=max_skipped_fraction, length_buckets=cfg.train.length_buckets),
        lora=_lora(cfg),
        checkpoint=CheckpointSettings(every=_int(cfg, "checkpoint.every", 1), keep=_int(cfg, "checkpoint.keep", 1),
                                      async_save=cfg.checkpoint.async_save),
        log=LogSettings(diagnostics=cfg.log.diagnostics, diagnostics_every=_int(cfg, "log.diagnostics_every", 1),
                        progress=cfg.log.progress, wandb=wandb),
        export=ExportSettings(enabled=cfg.export.enabled, dtype=export_dtype), task=task,
        evaluate_only=run_mode == "eval",
        bootstrap=bootstrap,
        targets_dir=offline.dir if run_mode == "train" else "", offline=offline,
        bootstrap_dir=cfg.bootstrap.dir,
        bootstrap_from_scratch=cfg.bootstrap.from_scratch, bootstrap_teacher_from=cfg.bootstrap.teacher_from,
        teacher_sft=teacher_sft,
        teacher_sft_dir=cfg.teacher_sft.dir)


def _wandb(cfg) -> WandbSettings | None:
    """The W&B sink's settings (config.log.wandb*); None when it is off."""
    mode = _choice(cfg, "log.wandb_mode", ("", "offline", "online"))
    project = _get(cfg, "log.wandb_project")
    if not isinstance(project, str) or not project:
        raise ConfigError("log.wandb_project", f"{project!r} is not a non-empty string")
    if not cfg.log.wandb:
        return None
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb", "is true but wandb is not installed: pip install 'trd_jax[wandb]' "
                                       "(or set log.wandb=false)")
    return WandbSettings(project=project, mode=mode)


def _check_task(cfg) -> None:
    """The real-data task fields (trd_jax/data/registry.py uses them)."""
    _choice(cfg, "task.name", tuple(TASK_KINDS))
    _float(cfg, "task.grade_timeout_s", 0.0, open_low=True)
    _int(cfg, "task.grade_workers", 1)
    _float(cfg, "task.code_timeout_s", 0.0, open_low=True)
    _int(cfg, "task.code_memory_mb", 64)
    _int(cfg, "task.mini_math_max_operand", 3)
    if _int(cfg, "task.shots", 0):
        if cfg.task.name != "mini_math":
            raise ConfigError("task.shots", f"worked examples are made for task 'mini_math', not {cfg.task.name!r}")
        if cfg.task.prompt_mode == "plain":
            raise ConfigError("task.shots", "worked examples are chat turns: use task.prompt_mode 'chat' or 'thinking'")
    for key in ("task.train_files", "task.eval_files", "task.data_dir", "task.tokenizer"):
        if not isinstance(_get(cfg, key), str):
            raise ConfigError(key, f"{_get(cfg, key)!r} is not a string")
    if not isinstance(cfg.task.allow_unsandboxed, bool):
        raise ConfigError("task.allow_unsandboxed", f"{cfg.task.allow_unsandboxed!r} is not a bool")
    name = _get(cfg, "task.dataset_name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError("task.dataset_name", f"{name!r}: use letters, digits, '_', '.', '-'")
    if cfg.mode == "train" and cfg.task.name in ("math", "code") and not cfg.task.train_files:
        raise ConfigError("task.train_files", "is empty: training needs a training set (a local file or glob)")
    if cfg.task.name in ("math", "code") and not cfg.task.eval_files:
        raise ConfigError("task.eval_files", "is empty: give the evaluation set (a local file or glob)")


def _check_keys(cfg, known, prefix: str) -> None:
    """Every key of cfg must exist in the base config (a recipe's typo would otherwise be ignored)."""
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if not prefix and key == "model" and cfg.model is cfg.student:
            continue  # configs/eval.py's alias of the student section
        if key not in known:
            raise ConfigError(path, "unknown key")
        if isinstance(cfg[key], ml_collections.ConfigDict) and isinstance(known[key], ml_collections.ConfigDict):
            _check_keys(cfg[key], known[key], path + ".")
