import glob
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.tb_events import read_tb_events, read_tb_scalars, read_wandb_records, wandb_history
from helpers.tiny_run import tiny_config
from trd_jax.config import ConfigError, resolve
from trd_jax.metrics import (
    MetricsWriter,
    PhaseTimer,
    ProgressBar,
    WandbSettings,
    estimate_flops,
    quantiles,
    summary_json,
)

# ------------------------------------------------------------- MetricsWriter

STEPS = [(0, {"loss": 1.5, "lr": 1e-6}), (1, {"loss": np.float32(1.25), "skipped": np.bool_(False)}),
         (7, {"loss": float("nan"), "tokens": np.int64(2 ** 40), "grad_norm": -0.5})]


def expected_scalars():
    """(step, tag, value) as TensorBoard stores them (float32), sorted like read_tb_scalars."""
    return sorted(((s, k, float(np.float32(float(v)))) for s, m in STEPS for k, v in m.items()), key=lambda r: r[:2])


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
    # The format: step, time (rounded to ms), then the metrics in the order given; NaN as JSON's NaN token.
    assert [list(r) for r in rows] == [["step", "time", *m] for _, m in STEPS] + [["step", "time", "x", "n"]]
    assert all(r["time"] == round(r["time"], 3) and r["time"] > 1.6e9 for r in rows)
    assert '"loss": NaN' in lines[2] and '"skipped": 0' in lines[1]
    assert [r["step"] for r in rows] == [0, 1, 7, 8]
    assert rows[0]["lr"] == 1e-6 and rows[1]["loss"] == 1.25 and rows[1]["skipped"] == 0
    assert np.isnan(rows[2]["loss"]) and rows[2]["tokens"] == 2 ** 40 and type(rows[2]["tokens"]) is int
    assert rows[3]["x"] == 2.5 and rows[3]["n"] == 3
    # A resumed run appends.
    with MetricsWriter(tmp_path) as w2:
        w2.write(9, {"loss": 0.5})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    with pytest.raises(TypeError, match="'bad'"):
        MetricsWriter(tmp_path / "other").write(0, {"bad": np.zeros(3)})
    with pytest.raises(RuntimeError, match="after close"):
        w2.write(10, {"loss": 0.25})


def test_metrics_writer_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path)
    for step, m in STEPS:
        w.write(step, m)
    w.write(8, {})  # a step without scalars: a JSONL line, no event
    # What TensorBoard shows, read before close: every step is on disk when write returns.
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert path == w.tb_path and path.endswith("." + socket.gethostname())
    got = read_tb_scalars(path)
    assert len(got) == len(expected_scalars()) and all(map(same, got, expected_scalars())), got
    w.close()
    # The records: TensorBoard's file-version header, then one Event per step holding all of its scalars at
    # the step's JSONL time.
    events = read_tb_events(path)
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 1.6e9
    times = [json.loads(line)["time"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events[1:]] == [s for s, _ in STEPS]
    for e, (_, m), t in zip(events[1:], STEPS, times):
        assert [v.tag for v in e.summary.value] == list(m) and e.wall_time == pytest.approx(t, abs=1e-3)
    assert all(map(same, read_tb_scalars(tmp_path / "tb"), got))  # the directory, as TensorBoard opens a run


def test_resumed_writer_adds_a_tensorboard_file(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(3, {"a": 1.0})
    with MetricsWriter(tmp_path) as w2:  # within the same second: a new name, the first file intact
        w2.write(4, {"a": 2.0})
    assert w2.tb_path != w.tb_path and len(os.listdir(tmp_path / "tb")) == 2
    assert read_tb_scalars(w.tb_path) == [(3, "a", 1.0)] and read_tb_scalars(w2.tb_path) == [(4, "a", 2.0)]
    assert read_tb_scalars(tmp_path / "tb") == [(3, "a", 1.0), (4, "a", 2.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False, wandb=WandbSettings())
    w.write(0, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists() and os.listdir(tmp_path) == []


def test_metrics_writer_wandb_offline(tmp_path, monkeypatch):
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "wandb_config"),
                     ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_DATA_DIR", "wandb_data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    config = {"seed": 3, "loss": {"name": "k3"}}
    with MetricsWriter(run, wandb=WandbSettings(project="trd-test"), run_config=config) as w:
        for step, m in STEPS:
            w.write(step, m)
    # The other two sinks are unchanged by the third.
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(STEPS)
    assert all(map(same, read_tb_scalars(w.tb_path), expected_scalars()))
    # The offline run sits in WANDB_DIR (not the workdir) under the id kept in the workdir.
    run_id = (run / "wandb_run_id").read_text().strip()
    (run_file,) = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert not (run / "wandb").exists()
    records = read_wandb_records(run_file)
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.run_id == run_id and meta.project == "trd-test"
    logged_config = {u.key: json.loads(u.value_json) for u in meta.config.update}
    assert {k: logged_config[k] for k in config} == config
    # Every value at its step, exactly as logged (JSON: ints stay ints, NaN kept).
    logged = sorted(wandb_history(records), key=lambda r: r[:2])
    expected = sorted(((s, k, float(v) if isinstance(v, (float, np.floating)) else int(v)) for s, m in STEPS
                       for k, v in m.items()), key=lambda r: r[:2])
    assert len(logged) == len(expected) and all(map(same, logged, expected)), logged
    assert [type(v) for *_, v in logged] == [type(v) for *_, v in expected]


def test_wandb_settings_from_config(tmp_path, monkeypatch):
    assert resolve(tiny_config()).log.wandb is None  # off by default
    s = resolve(tiny_config(**{"log.wandb": True, "log.wandb_project": "p", "log.wandb_mode": "offline"}))
    assert s.log.wandb == WandbSettings(project="p", mode="offline")
    with pytest.raises(ConfigError, match="config.log.wandb_mode"):
        resolve(tiny_config(**{"log.wandb_mode": "cloud"}))
    with pytest.raises(ConfigError, match="config.log.wandb_project"):
        resolve(tiny_config(**{"log.wandb": True, "log.wandb_project": ""}))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"config\.log\.wandb: is true but wandb is not installed") as e:
        resolve(tiny_config(**{"log.wandb": True}))
    assert e.value.key == "log.wandb"
    assert resolve(tiny_config()).log.wandb is None  # only a run that asks for wandb needs it
    with pytest.raises(ImportError, match="config.log.wandb"):
        MetricsWriter(tmp_path, wandb=WandbSettings())


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
