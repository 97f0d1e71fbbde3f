"""Scoring in row groups (train.max_score_rows) and blockwise attention inside a whole run: the same steps as
scoring every row at once with dense attention."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers.tiny_run import tiny_config
from trd_jax.config import ConfigError
from trd_jax.controller import Trainer

TESTS = os.path.dirname(__file__)


def test_groups_on_a_sharded_mesh():
    """4 CPU devices in a subprocess (the device count is fixed when JAX starts)."""
    done = subprocess.run([sys.executable, os.path.join(TESTS, "helpers", "row_groups_check.py")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.path.dirname(TESTS)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "row groups ok" in done.stdout


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """OPD TRD, 2 steps, every row scored at once, dense attention."""
    workdir = str(tmp_path_factory.mktemp("all_rows"))
    trainer = Trainer(tiny_config(**{"eval.initial": False, "eval.teacher": False}), workdir)
    trainer.run()
    return _metrics(workdir), [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


@pytest.mark.parametrize("overrides", [
    {"train.max_score_rows": 3},  # 4 rows: rows 0-2, then 1-3 (the last group moved back)
    {"student.attention": "blockwise", "teacher.attention": "blockwise", "student.attention_block": 8,
     "teacher.attention_block": 8},
], ids=["score-groups", "blockwise"])
def test_run_matches_reference(overrides, reference, tmp_path):
    want_metrics, want_params = reference
    trainer = Trainer(tiny_config(**{"eval.initial": False, "eval.teacher": False, **overrides}), str(tmp_path))
    trainer.run()
    got = _metrics(str(tmp_path))
    assert len(got) == len(want_metrics) == 2
    for w, g in zip(want_metrics, got):
        assert g["accuracy/y_o"] == w["accuracy/y_o"]
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(g[key], w[key], rtol=2e-4, err_msg=key)
    for w, g in zip(want_params, jax.tree.leaves(trainer.state.params)):
        np.testing.assert_allclose(np.asarray(g), w, atol=2e-5)


def test_negative_group_is_refused():
    from trd_jax.config import resolve

    with pytest.raises(ConfigError, match="train.max_score_rows"):
        resolve(tiny_config(**{"train.max_score_rows": -1}))
