import glob
import json
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from trd_jax import metrics
from trd_jax.metrics import (
    MetricsWriter,
    PhaseTimer,
    ProgressBar,
    estimate_flops,
    quantiles,
    read_tb_scalars,
    summary_json,
)

# ------------------------------------------------------------- independent TFRecord/crc32c checking

def bitwise_crc32c(data: bytes) -> int:
    """CRC-32C bit by bit (no table), independent of metrics.crc32c."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def split_records(path):
    """Payloads of a TFRecord file; asserts both framing CRCs with the bitwise crc32c."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        header = data[i:i + 8]
        (size,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked(bitwise_crc32c(header))
        payload = data[i + 12:i + 12 + size]
        assert struct.unpack("<I", data[i + 12 + size:i + 16 + size])[0] == masked(bitwise_crc32c(payload))
        out.append(payload)
        i += 16 + size
    assert i == len(data)
    return out


def event_class():
    """tensorflow.Event / Summary built from a descriptor at runtime (field numbers of event.proto and
    summary.proto), so decoding uses the real protobuf library rather than our hand decoder."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="trd_test_event.proto", package="trdtest", syntax="proto3")
    summary = fdp.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".trdtest.Summary.Value")
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".trdtest.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("trdtest.Event"))


def test_crc32c_known_vector():
    assert metrics.crc32c(b"123456789") == bitwise_crc32c(b"123456789") == 0xE3069283
    blob = bytes(range(256)) * 3
    assert metrics.crc32c(blob) == bitwise_crc32c(blob)
    assert metrics.masked_crc32c(blob) == masked(bitwise_crc32c(blob))


# ------------------------------------------------------------- MetricsWriter

STEPS = [(0, {"loss": 1.5, "lr": 1e-6}), (1, {"loss": np.float32(1.25), "skipped": np.bool_(False)}),
         (7, {"loss": float("nan"), "tokens": np.int64(2 ** 40), "grad_norm": -0.5})]


def expected_scalars():
    return [(s, k, float(np.float32(float(v)))) for s, m in STEPS for k, v in m.items()]


def same(a, b):
    return a[:2] == b[:2] and (a[2] == b[2] or (np.isnan(a[2]) and np.isnan(b[2])))


def test_metrics_writer_jsonl(tmp_path):
    import jax.numpy as jnp

    w = MetricsWriter(tmp_path)
    for step, m in STEPS:
        w.write(step, m)
    w.write(np.int64(8), {"x": jnp.float32(2.5), "n": jnp.int32(3)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # readable before close: flushed
    w.close()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [0, 1, 7, 8]
    assert rows[1]["loss"] == 1.25 and rows[1]["skipped"] == 0
    assert np.isnan(rows[2]["loss"]) and rows[2]["tokens"] == 2 ** 40 and type(rows[2]["tokens"]) is int
    assert rows[3]["x"] == 2.5 and rows[3]["n"] == 3 and all("time" in r for r in rows)
    # A resumed run appends.
    with MetricsWriter(tmp_path) as w2:
        w2.write(9, {"loss": 0.5})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    with pytest.raises(TypeError, match="'bad'"):
        MetricsWriter(tmp_path / "other").write(0, {"bad": np.zeros(3)})


def test_metrics_writer_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path)
    for step, m in STEPS:
        w.write(step, m)
    w.close()
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert path == w.tb_path and path.endswith("." + socket.gethostname())
    # Our reader.
    got = read_tb_scalars(path)
    assert len(got) == len(expected_scalars()) and all(map(same, got, expected_scalars()))
    # Independent: bitwise CRCs on every record, protobuf library decoding of every Event.
    Event = event_class()
    events = [Event.FromString(p) for p in split_records(path)]
    assert events[0].file_version == "brain.Event:2"
    decoded = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert all(map(same, decoded, expected_scalars()))
    assert all(e.wall_time > 1.6e9 for e in events)


def test_read_tb_scalars_tolerates_truncated_tail_and_detects_corruption(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(3, {"a": 1.0})
        w.write(4, {"a": 2.0})
    tb = Path(w.tb_path)
    data = tb.read_bytes()
    tb.write_bytes(data[:-5])  # killed mid-record
    assert read_tb_scalars(w.tb_path) == [(3, "a", 1.0)]
    corrupt = bytearray(data)
    corrupt[-6] ^= 0xFF  # flip a payload byte of the last record
    tb.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="crc"):
        read_tb_scalars(w.tb_path)


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.write(0, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists() and os.listdir(tmp_path) == []


# ------------------------------------------------------------- PhaseTimer

class FakeClock:
    def __init__(self, times, log):
        self.times, self.log = list(times), log

    def __call__(self):
        self.log.append("clock")
        return self.times.pop(0)


def test_phase_timer_accumulates_and_blocks(monkeypatch):
    import jax

    log = []
    monkeypatch.setattr(jax, "block_until_ready", lambda x: log.append(("block", x)) or x)
    timer = PhaseTimer(clock=FakeClock([0.0, 2.0, 2.0, 2.5, 10.0, 14.0, 20.0, 21.0], log))
    with timer.phase("rollout", tokens=100, block=lambda: out) as span:
        out = "rollout-out"
        span.tokens += 60
    # The callable is resolved at exit and blocked on before the clock stops.
    assert log == ["clock", ("block", "rollout-out"), "clock"]
    with timer.phase("update") as span:
        span.block = "update-out"
    assert log[-2:] == [("block", "update-out"), "clock"]
    assert timer.snapshot() == {"phase_s/rollout": 2.0, "phase_tokens/rollout": 160, "tokens_per_s/rollout": 80.0,
                                "phase_s/update": 0.5, "phase_tokens/update": 0}
    with timer.phase("rollout", tokens=40):
        pass
    with timer.phase("eval", tokens=np.int64(10)):
        pass
    assert timer.snapshot(reset=False) == {"phase_s/rollout": 4.0, "phase_tokens/rollout": 40,
                                           "tokens_per_s/rollout": 10.0, "phase_s/eval": 1.0,
                                           "phase_tokens/eval": 10, "tokens_per_s/eval": 10.0}
    assert timer.totals() == {"phase_seconds": {"rollout": 6.0, "update": 0.5, "eval": 1.0},
                              "phase_tokens": {"rollout": 200, "update": 0, "eval": 10}}


def test_phase_timer_real_jax_and_failed_phase():
    import jax.numpy as jnp

    timer = PhaseTimer()
    with timer.phase("score", block=lambda: y):
        y = {"logits": jnp.ones((4, 4)) @ jnp.ones((4, 4))}
    with pytest.raises(RuntimeError), timer.phase("grade"):
        raise RuntimeError("grader crashed")
    t = timer.totals()
    assert list(t["phase_seconds"]) == ["score"] and t["phase_seconds"]["score"] >= 0


# ------------------------------------------------------------- FLOPs, quantiles, summary

def test_estimate_flops():
    assert estimate_flops(1_000, 10, kind="forward") == 20_000
    assert estimate_flops(1_000, 10, kind="train") == 60_000
    # + attention: 4*L*seq*d per token forward, 12*L*seq*d train.
    attn = {"num_layers": 2, "seq_len": 8, "attn_dim": 16}
    assert estimate_flops(1_000, 10, kind="forward", **attn) == 20_000 + 4 * 2 * 8 * 16 * 10
    assert estimate_flops(1_000, 10, kind="train", **attn) == 60_000 + 12 * 2 * 8 * 16 * 10
    with pytest.raises(ValueError, match="kind"):
        estimate_flops(1, 1, kind="backward")
    with pytest.raises(ValueError, match="together"):
        estimate_flops(1, 1, kind="train", num_layers=2)


def test_quantiles():
    rng = np.random.default_rng(0)
    values, mask = rng.exponential(size=(4, 50)), rng.random((4, 50)) < 0.3
    q = quantiles(values, mask)
    sel = values[mask]
    assert q == pytest.approx({"p50": np.percentile(sel, 50), "p95": np.percentile(sel, 95), "max": sel.max()})
    assert quantiles(values, np.zeros_like(mask)) == {"p50": 0.0, "p95": 0.0, "max": 0.0}
    assert quantiles([1.0, 3.0])["max"] == 3.0


def test_summary_json(tmp_path):
    path = summary_json(tmp_path / "summary.json", steps=np.int64(5), initial_eval={"avg_at_k": np.float32(0.5)},
                        phase_seconds={"rollout": 1.5})
    assert os.listdir(tmp_path) == ["summary.json"]
    expected = {"steps": 5, "initial_eval": {"avg_at_k": 0.5}, "phase_seconds": {"rollout": 1.5}}
    assert json.loads(Path(path).read_text()) == expected


# ------------------------------------------------------------- ProgressBar

def test_progress_bar_disabled_prints_nothing(capsys):
    bar = ProgressBar(10, enabled=False)
    bar.update(3, phase="rollout", tokens_per_s=1234.0)
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_progress_bar_shows_step_and_phase(capsys):
    bar = ProgressBar(10, enabled=True)
    bar.update(1, phase="rollout", tokens_per_s=1234.0)
    bar.update(3, phase="refine")
    bar.close()
    err = capsys.readouterr().err
    assert "3/10" in err and "phase=refine" in err
