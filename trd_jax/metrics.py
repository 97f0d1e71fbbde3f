"""Host-side run telemetry: JSONL, TensorBoard and (optionally) Weights & Biases scalars, phase timers,
FLOP estimates, per-token quantiles, a host-0 progress bar and the end-of-run summary.json.

Everything here is plain Python/numpy on the host; jax is imported lazily (only `PhaseTimer` needs it,
to block on device outputs), and so are tensorboardX and wandb (only a `MetricsWriter` that writes needs
them), so that importing this module never pulls in a backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Self

import numpy as np

# Canonical order of phases in reports; other names are allowed.
PHASES = ("rollout", "refine", "grade", "score", "update", "diagnostics", "eval", "checkpoint")


# ----------------------------------------------------------------------------------- JSON helpers

def to_python(x: Any) -> Any:
    """A numpy/jax scalar (or 0-d / size-1 array) -> the Python bool/int/float; others unchanged."""
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "__array__"):  # np.ndarray, jax.Array: one device->host copy
        a = np.asarray(x)
        return a.item() if a.size == 1 else a.tolist()
    return x


def to_jsonable(x: Any) -> Any:
    """Recursively converts numpy/jax values, tuples and paths so that json.dumps accepts them."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return to_python(x)


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Writes `text` to a temp file in the same directory, fsyncs, then os.replace()s it over `path`,
    so readers (and a crash at any point) see either the old file or the complete new one. The temp
    file is removed if anything fails."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> str:
    # Serialise before touching the disk: an unserialisable value then fails with nothing written.
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def summary_json(path: str | os.PathLike, **fields: Any) -> str:
    """Writes the run's end summary (initial_eval, final_eval, phase_seconds, phase_tokens, steps, ...)
    to `path` atomically; numpy/jax values are converted. Returns the path."""
    return atomic_write_json(path, fields)


# ----------------------------------------------------------------------------------- MetricsWriter

@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """The Weights & Biases sink of a run (config.log.wandb*). `mode`: "offline" (the run is written under
    WANDB_DIR, else the workdir, for a later `wandb sync`) | "online" | "" (WANDB_MODE, else "offline")."""

    project: str = "trd_jax"
    mode: str = ""


class _JsonlSink:
    """`metrics.jsonl`: one JSON object per line (step, time, metrics), appended to and flushed per write."""

    def __init__(self, path: str):
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives until close)

    def write(self, step: int, values: Mapping[str, int | float], now: float) -> None:
        self._f.write(json.dumps({"step": step, "time": round(now, 3), **values}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _TensorBoardSink:
    """One TensorBoard event file, `events.out.tfevents.<time>.<host>`, written through tensorboardX: its
    RecordWriter does the TFRecord framing and CRCs, its compiled Event/Summary protos the encoding (tags kept
    as the JSONL keys; tensorboardX's `summary.scalar` would also warn on every NaN).
    Each step is one Event holding every scalar, fsynced before write returns (tensorboardX's SummaryWriter
    would hand events to a background thread whose queue its flush() does not wait for). tensorboardX is
    imported here, not at module level: it imports torch wherever torch is installed."""

    def __init__(self, tb_dir: str):
        from tensorboardX import RecordWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        self._event, self._summary = Event, Summary
        os.makedirs(tb_dir, exist_ok=True)
        # RecordWriter truncates: a writer reopened within the same second (a quick resume) gets a new name.
        base = os.path.join(tb_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self.path, n = base, 1
        while os.path.exists(self.path):
            self.path, n = f"{base}.{n}", n + 1
        self._writer = RecordWriter(self.path)
        self._emit(Event(wall_time=time.time(), file_version="brain.Event:2"))  # how TensorBoard knows the file

    def _emit(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def write(self, step: int, values: Mapping[str, int | float], now: float) -> None:
        if values:
            value = self._summary.Value
            summary = self._summary(value=[value(tag=tag, simple_value=float(x)) for tag, x in values.items()])
            self._emit(self._event(wall_time=now, step=step, summary=summary))

    def close(self) -> None:
        self._writer.close()


class _WandbSink:
    """A Weights & Biases run (`pip install 'trd_jax[wandb]'`). Its id is kept in `workdir/wandb_run_id`, so a
    resumed run logs into the same W&B run; `run_config` (the run's config) becomes the W&B run config."""

    def __init__(self, workdir: str, settings: WandbSettings, run_config: Mapping[str, Any] | None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("config.log.wandb=True needs wandb: pip install 'trd_jax[wandb]'") from e
        id_path = os.path.join(workdir, "wandb_run_id")
        try:
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        except FileNotFoundError:
            run_id = ""
        if not run_id:
            run_id = secrets.token_hex(6)
            atomic_write_text(id_path, run_id + "\n")
        where = {} if os.environ.get("WANDB_DIR") else {"dir": workdir}  # an explicit dir= would override it
        mode = settings.mode or os.environ.get("WANDB_MODE") or "offline"
        self._run = wandb.init(project=settings.project, mode=mode, id=run_id, resume="allow",
                               config=to_jsonable(run_config) if run_config is not None else None, **where)

    def write(self, step: int, values: Mapping[str, int | float], now: float) -> None:
        if values:
            self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Per-step scalars to up to three sinks behind one `write(step, metrics)`:
    - `workdir/metrics.jsonl`, one JSON object per line: step, time, metrics;
    - TensorBoard: `workdir/tb/events.out.tfevents.<time>.<host>` (tensorboardX);
    - Weights & Biases when `wandb` is given (config.log.wandb), see `WandbSettings`.
    The JSONL file is appended to (a resumed run continues it; TensorBoard gets a new file beside the old
    ones) and every write is flushed, so a killed run loses nothing already written to either file.

    `enabled=False` (every process but host 0) makes every method a no-op and creates no files.
    Non-finite values are kept: JSON gets NaN/Infinity tokens (Python's json reads them), TensorBoard
    and W&B get the float. Values must be scalars (bool/int/float, numpy or 0-d jax arrays)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, wandb: WandbSettings | None = None,
                 run_config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        workdir = os.fspath(workdir)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tb_path = None
        self._sinks: list[Any] | None = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._sinks = []
        try:
            self._sinks.append(_JsonlSink(self.jsonl_path))
            tb = _TensorBoardSink(os.path.join(workdir, "tb"))
            self._sinks.append(tb)
            self.tb_path = tb.path
            if wandb is not None:
                self._sinks.append(_WandbSink(workdir, wandb, run_config))
        except BaseException:
            self.close()
            raise

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._sinks is None:
            raise RuntimeError("MetricsWriter.write after close()")
        step = int(to_python(step))
        values = {}
        for key, value in metrics.items():
            value = to_python(value)
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} at step {step} is not a scalar: {type(value).__name__}")
            values[str(key)] = value
        now = time.time()
        for sink in self._sinks:
            sink.write(step, values, now)

    def close(self) -> None:
        sinks, self._sinks = self._sinks or [], None
        for sink in sinks:
            sink.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------- PhaseTimer

class _Span:
    """What `PhaseTimer.phase` yields: add tokens or set the outputs to block on from inside the block,
    since both are usually known only after the work is issued."""

    def __init__(self, tokens: int, block: Any):
        self.tokens = tokens
        self.block = block


class PhaseTimer:
    """Wall seconds and token counts per phase (rollout, refine, grade, score, update, eval, or any name).

        with timer.phase("rollout", block=lambda: out) as span:
            out = rollout_step(...)
            span.tokens += int(out.num_tokens)

    JAX dispatch is asynchronous, so the clock stops only after `jax.block_until_ready` on `block`
    (an object/pytree, or a zero-argument callable returning one, evaluated at exit). A phase whose body
    raises is not recorded. `clock` is injectable for deterministic tests."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._step_s: dict[str, float] = {}
        self._step_tok: dict[str, int] = {}
        self._total_s: dict[str, float] = {}
        self._total_tok: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str, *, tokens: int = 0, block: Any = None) -> Iterator[_Span]:
        span = _Span(tokens, block)
        start = self._clock()
        yield span
        if span.block is not None:
            import jax  # lazy: only device-timing users need it

            jax.block_until_ready(span.block() if callable(span.block) else span.block)
        elapsed = self._clock() - start
        tokens = int(to_python(span.tokens))
        for seconds, toks in ((self._step_s, self._step_tok), (self._total_s, self._total_tok)):
            seconds[name] = seconds.get(name, 0.0) + elapsed
            toks[name] = toks.get(name, 0) + tokens

    @staticmethod
    def _ordered(d: Mapping[str, Any]) -> list[str]:
        return [p for p in PHASES if p in d] + sorted(p for p in d if p not in PHASES)

    def snapshot(self, *, reset: bool = True) -> dict[str, float]:
        """Flat per-step metrics since the last snapshot, ready for MetricsWriter:
        `phase_s/<name>`, `phase_tokens/<name>`, and `tokens_per_s/<name>` where tokens were counted."""
        out: dict[str, float] = {}
        for name in self._ordered(self._step_s):
            s, tok = self._step_s[name], self._step_tok[name]
            out[f"phase_s/{name}"] = s
            out[f"phase_tokens/{name}"] = tok
            if tok:
                out[f"tokens_per_s/{name}"] = tok / s if s > 0 else 0.0
        if reset:
            self._step_s, self._step_tok = {}, {}
        return out

    def restore(self, totals: Mapping[str, Mapping[str, float]]) -> None:
        """Continues the cumulative totals of a resumed run (what totals() returned before)."""
        self._total_s = {k: float(v) for k, v in totals.get("phase_seconds", {}).items()}
        self._total_tok = {k: int(v) for k, v in totals.get("phase_tokens", {}).items()}

    def totals(self) -> dict[str, dict[str, float]]:
        """Cumulative {"phase_seconds": {name: s}, "phase_tokens": {name: n}} for summary.json."""
        names = self._ordered(self._total_s)
        return {"phase_seconds": {n: self._total_s[n] for n in names},
                "phase_tokens": {n: self._total_tok[n] for n in names}}


# ----------------------------------------------------------------------------------- FLOPs, quantiles

def estimate_flops(num_params: int, tokens: int, *, kind: str, num_layers: int | None = None,
                   seq_len: int | None = None, attn_dim: int | None = None) -> float:
    """Matmul FLOPs of a dense transformer over `tokens` tokens: 2*N per token forward ("forward":
    rollout, refine, teacher scoring, eval) or 6*N ("train": forward + backward).

    With `num_layers`, `seq_len` and `attn_dim` (= heads * head_dim) the attention score/value matmuls
    are added: 4*L*seq*attn_dim per token forward, 3x that for training (PaLM appendix B). `seq_len` is
    the number of positions each token attends to: the full length T for the PaLM/MFU convention, about
    T/2 for the actual work of a causal pass or a KV-cached decode to length T."""
    mult = {"forward": 2, "train": 6}.get(kind)
    if mult is None:
        raise ValueError(f"estimate_flops: kind must be 'forward' or 'train', got {kind!r}")
    per_token = mult * float(num_params)
    attn = (num_layers, seq_len, attn_dim)
    if any(a is not None for a in attn):
        if any(a is None for a in attn):
            raise ValueError("estimate_flops: the attention term needs num_layers, seq_len and attn_dim together")
        per_token += 2 * mult * num_layers * seq_len * attn_dim
    return per_token * tokens


def quantiles(values: Any, mask: Any = None) -> dict[str, float]:
    """{p50, p95, max} of `values` where `mask` is true (e.g. per-token KL over response tokens);
    all zeros when nothing is selected, so a step with an empty batch still logs finite values."""
    v = np.asarray(values, dtype=np.float64)
    if mask is not None:
        v = v[np.broadcast_to(np.asarray(mask, dtype=bool), v.shape)]
    v = v.ravel()
    if v.size == 0:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    p50, p95 = np.percentile(v, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "max": float(v.max())}


# ----------------------------------------------------------------------------------- ProgressBar

class ProgressBar:
    """A tqdm bar over training steps, shown on host 0 only (pass enabled=jax.process_index() == 0):
    completed steps / total, tqdm's rate and ETA, plus the current phase and tokens/s. `initial` is the
    resumed step, so the ETA counts only the work of this run."""

    def __init__(self, total_steps: int, enabled: bool = True, *, initial: int = 0, file: Any = None,
                 desc: str = "train"):
        self.enabled = enabled
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=file if file is not None else sys.stderr)

    def update(self, step: int, *, phase: str | None = None, tokens_per_s: float | None = None) -> None:
        """`step`: number of completed steps (absolute, not an increment)."""
        if self._bar is None:
            return
        postfix = []
        if phase is not None:
            postfix.append(f"phase={phase}")
        if tokens_per_s is not None:
            postfix.append(f"tok/s={tokens_per_s:,.0f}")
        if postfix:
            self._bar.set_postfix_str(" ".join(postfix), refresh=False)
        # tqdm.update (not assigning n) keeps its rate/ETA estimate; it redraws at most every mininterval.
        self._bar.update(max(int(step) - self._bar.n, 0))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
