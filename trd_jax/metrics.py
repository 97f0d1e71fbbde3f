"""Host-side run telemetry: JSONL + TensorBoard scalars, phase timers, FLOP estimates, per-token
quantiles, a host-0 progress bar and the end-of-run summary.json.

Everything here is plain Python/numpy on the host; jax is imported lazily (only `PhaseTimer` needs it,
to block on device outputs) so that reading metrics back never pulls in a backend.

TensorBoard files are written by a small self-contained writer (no tensorboard/tensorflow dependency):
TFRecord framing (u64 length, masked crc32c(length), payload, masked crc32c(payload)) around `Event`
protobufs encoded by hand. Field numbers follow tensorflow/core/util/event.proto and summary.proto:
    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
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


# ----------------------------------------------------------------------------------- crc32c + protobuf

def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):  # reflected Castagnoli polynomial
            c = ((c >> 1) ^ 0x82F63B78) if c & 1 else (c >> 1)
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), table-driven; crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC (rotate right 15, add a constant), so CRCs of CRC-bearing data stay robust."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if scalars:
        values = b"".join(_len_field(1, _len_field(1, tag.encode()) + _varint(2 << 3 | 5)
                                     + struct.pack("<f", value)) for tag, value in scalars.items())
        out += _len_field(5, values)
    return out


def _tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, i


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, raw value) pairs of one serialised message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = buf[i:i + width], i + width
        elif wire == 2:
            size, i = _read_varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def read_tfrecords(path: str | os.PathLike) -> Iterator[bytes]:
    """Payloads of a TFRecord file, CRCs verified (ValueError naming the offset). A truncated last
    record (a writer killed mid-write) ends the iteration, as TensorBoard does."""
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i + 12 <= len(data):
        header = data[i:i + 8]
        (size,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length crc at offset {i}")
        if i + 12 + size + 4 > len(data):
            return
        payload = data[i + 12:i + 12 + size]
        (dcrc,) = struct.unpack("<I", data[i + 12 + size:i + 16 + size])
        if dcrc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad data crc at offset {i}")
        yield payload
        i += 16 + size


def read_tb_scalars(path: str | os.PathLike) -> list[tuple[int, str, float]]:
    """(step, tag, simple_value) of every scalar in an event file, in file order."""
    out = []
    for record in read_tfrecords(path):
        step, values = 0, []
        for field, value in _proto_fields(record):
            if field == 2:
                step = value - (1 << 64) if value >= 1 << 63 else value
            elif field == 5:
                for f_sum, v in _proto_fields(value):
                    if f_sum != 1:
                        continue
                    fields = dict(_proto_fields(v))
                    if 2 in fields:
                        values.append((fields.get(1, b"").decode(), struct.unpack("<f", fields[2])[0]))
        out.extend((step, tag, val) for tag, val in values)
    return out


# ----------------------------------------------------------------------------------- MetricsWriter

class MetricsWriter:
    """Per-step scalars to `workdir/metrics.jsonl` (one JSON object per line: step, time, metrics) and to
    `workdir/tb/events.out.tfevents.<time>.<host>`. Both files are appended to (a resumed run continues
    them) and flushed after every write, so a killed run loses nothing already written.

    `enabled=False` (every process but host 0) makes every method a no-op and creates no files.
    Non-finite values are kept: JSON gets NaN/Infinity tokens (Python's json reads them), TensorBoard
    gets the float. Values must be scalars (bool/int/float, numpy or 0-d jax arrays)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self.tb_path = None
        self._jsonl = self._tb = None
        if not enabled:
            return
        tb_dir = os.path.join(os.fspath(workdir), "tb")
        os.makedirs(tb_dir, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (lives until close)
        self.tb_path = os.path.join(tb_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._tb = open(self.tb_path, "ab")  # noqa: SIM115
        # TensorBoard identifies event files by this first record.
        self._tb.write(_tfrecord(_event(time.time(), 0, file_version="brain.Event:2")))
        self._tb.flush()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
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
        self._jsonl.write(json.dumps({"step": step, "time": round(now, 3), **values}) + "\n")
        self._jsonl.flush()
        if values:
            self._tb.write(_tfrecord(_event(now, step, scalars={k: float(v) for k, v in values.items()})))
            self._tb.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._tb = None

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
