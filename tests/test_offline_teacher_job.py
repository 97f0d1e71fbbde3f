"""offline.teacher_job (trd_jax/offline/teacher_job.py): a generate job writes the rounds of a training job that
runs beside it. With max_lag 0 the pair trains exactly what one multi-round process trains; with max_lag 1
round 1 comes from round 0's student; a training job with no teacher job says what it waits for and gives up
after offline.wait_timeout_s; rounds from other settings are refused."""

import json
import logging
import threading

import jax
import numpy as np
import pytest

from helpers.tiny_run import tiny_config
from trd_jax.config import ConfigError, resolve
from trd_jax.controller import Trainer
from trd_jax.errors import TrainingError
from trd_jax.offline import shards, teacher_job
from trd_jax.offline.teacher_job import serve_rounds, student_dir, student_record, wait_until

ROUNDS = {"train.steps": 2, "log.diagnostics": False, "eval.initial": False, "eval.teacher": False,
          "offline.rounds": 2, "offline.steps_per_round": 1, "offline.top_k": 16}


def test_config_checks():
    with pytest.raises(ConfigError, match="offline.teacher_job.*offline.rounds"):
        resolve(tiny_config(**{"offline.dir": "x", "offline.teacher_job": True}))
    with pytest.raises(ConfigError, match="offline.rounds.*teacher_job=true"):
        resolve(tiny_config(**ROUNDS, **{"mode": "generate", "offline.dir": "x"}))
    with pytest.raises(ConfigError, match="offline.max_lag"):
        resolve(tiny_config(**ROUNDS, **{"offline.dir": "x", "offline.teacher_job": True, "offline.max_lag": 2}))
    with pytest.raises(ConfigError, match="offline.wait_report_s"):
        resolve(tiny_config(**ROUNDS, **{"offline.dir": "x", "offline.teacher_job": True,
                                         "offline.wait_report_s": 0.0}))
    for mode in ("train", "generate"):
        s = resolve(tiny_config(**ROUNDS, **{"mode": mode, "offline.dir": "x", "offline.teacher_job": True,
                                             "offline.max_lag": 1}))
        assert s.offline.teacher_job and s.offline.max_lag == 1 and not s.offline.loads_teacher


def test_wait_until_reports_and_gives_up(caplog):
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    ticks = iter(range(1000))
    with caplog.at_level(logging.INFO, logger="trd_jax.offline.teacher_job"):
        waited = wait_until(lambda: next(ticks) >= 25, what="X", progress=lambda: "3 of 4", report_s=5.0,
                            timeout_s=0.0, clock=lambda: now[0], sleep=sleep)
    assert waited == pytest.approx(12.0)  # 24 polls of 0.5 s
    blocked = [r.getMessage() for r in caplog.records if "blocked on X" in r.getMessage()]
    assert blocked[0] == "blocked on X: 3 of 4" and len(blocked) == 3  # at the start, after 5 s and 10 s
    assert "ready after 12.0 s" in caplog.records[-1].getMessage()
    now[0] = 0.0
    with pytest.raises(TrainingError, match=r"gave up waiting for Y after 3 s \(offline.wait_timeout_s=3\): 0 of 1"):
        wait_until(lambda: False, what="Y", progress=lambda: "0 of 1", report_s=1.0, timeout_s=3.0,
                   clock=lambda: now[0], sleep=sleep)
    assert wait_until(lambda: True, what="Z", progress=str, report_s=1.0, timeout_s=1.0) == 0.0


def test_training_job_alone_publishes_its_student_and_says_what_it_waits_for(tmp_path, caplog):
    cfg = tiny_config(**ROUNDS, **{"offline.dir": str(tmp_path / "t"), "offline.teacher_job": True,
                                   "offline.wait_timeout_s": 1.5, "offline.wait_report_s": 1.0})
    trainer = Trainer(cfg, str(tmp_path / "run"))
    assert trainer.roles.teacher_mode == "offline" and trainer.memory["bytes"]["teacher"] == 0
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingError, match="targets of round 0.*0 of 1 shards"):
        trainer.run()
    assert any("blocked on the targets of round 0" in r.getMessage() for r in caplog.records)
    record = json.load(open(student_record(str(tmp_path / "t"), 0)))
    assert record["round"] == 0 and record["step"] == 0 and record["max_lag"] == 0
    assert record["student_sha256"] == teacher_job.tree_hash(trainer.state.params)

    # A teacher job started with another max_lag is refused at the first student it loads.
    generator = Trainer(tiny_config(**ROUNDS, **{"mode": "generate", "offline.dir": str(tmp_path / "t"),
                                                 "offline.teacher_job": True, "offline.max_lag": 1}),
                        str(tmp_path / "gen"))
    with pytest.raises(TrainingError, match="offline.max_lag=0, this teacher job with 1"):
        serve_rounds(generator)
    # A record of another student at the round's start: the folder is another run's.
    record["student_sha256"] = "0" * 16
    json.dump(record, open(student_record(str(tmp_path / "t"), 0), "w"))
    with pytest.raises(TrainingError, match="records another student than this run's at the start of round 0"):
        Trainer(cfg, str(tmp_path / "run2")).run()


def _pair(tmp_path, name, max_lag):
    """A training job and a teacher job on one offline.dir, the teacher job in a thread; returns the trainer."""
    common = {**ROUNDS, "offline.dir": str(tmp_path / name), "offline.teacher_job": True, "offline.max_lag": max_lag,
              "offline.wait_report_s": 0.5}
    generator = Trainer(tiny_config(**common, **{"mode": "generate"}), str(tmp_path / f"{name}_teacher"))
    failures = []

    def serve():
        try:
            serve_rounds(generator)
        except Exception as e:  # noqa: BLE001 -- reported by the test below
            failures.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    trainer = Trainer(tiny_config(**common), str(tmp_path / f"{name}_train"))
    trainer.run()
    thread.join()
    assert not failures, failures
    return trainer


def _metrics(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_teacher_job_feeds_a_training_job(tmp_path):
    single = Trainer(tiny_config(**ROUNDS, **{"offline.dir": str(tmp_path / "one")}), str(tmp_path / "one_run"))
    single.run()
    paired = _pair(tmp_path, "lag0", max_lag=0)
    # Bit for bit the single-process run: the same targets (round by round, from the same students) trained.
    for x, y in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(paired.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert paired.roles.teacher_mode == "offline"
    rows = _metrics(tmp_path / "lag0_train")
    assert [r["step"] for r in rows] == [1, 2] and all(r["offline/blocked_s"] >= 0 for r in rows)
    # Round 0's weights were deleted once round 1 started (nothing can still need them); the records stay.
    out = str(tmp_path / "lag0")
    assert not (tmp_path / "lag0" / "students" / "round-000").exists()
    assert (tmp_path / "lag0" / "students" / "round-001").is_dir()
    shas = [json.load(open(student_record(out, r)))["student_sha256"] for r in (0, 1)]
    assert [shards.read_manifest(shards.round_dir(out, r))["identity"]["student_sha256"] for r in (0, 1)] == shas

    lagged = _pair(tmp_path, "lag1", max_lag=1)  # round 1 is written from round 0's student
    out = str(tmp_path / "lag1")
    ids = [shards.read_manifest(shards.round_dir(out, r))["identity"]["student_sha256"] for r in (0, 1)]
    assert ids[0] == ids[1] == json.load(open(student_record(out, 0)))["student_sha256"]
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(lagged.state.params), jax.tree.leaves(paired.state.params)))

    # Rounds written under other settings are refused, naming what differs.
    manifest = shards.read_manifest(shards.round_dir(out, 1))
    manifest["identity"]["seed"] = 7
    shards.update_counts(shards.round_dir(out, 1), manifest)
    with pytest.raises(TrainingError, match="round 1's targets .*[(]seed differ"):
        teacher_job.check_round(lagged, 1)
    assert student_dir(out, 0).endswith("students/round-000")
