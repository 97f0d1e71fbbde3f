"""Verified checkpoints: every finalised step gets a content manifest; a restore picks the newest step whose
files still match it, sets newer failing steps aside (never deleting them) and reports them; when no step
verifies, nothing is moved and the error names each step and file. Corruption that leaves everything
decodable (a changed value in the meta JSON, bytes changed in an array chunk) is caught as well as the kind
that would crash a decoder."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from trd_jax.checkpoint_manifest import MANIFEST, verify
from trd_jax.checkpointing import Checkpointer, abstract_tree
from trd_jax.errors import CheckpointError

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _tree(i):
    return {"w": jax.numpy.full((64, 64), float(i), np.float32), "n": jax.numpy.int32(i)}


def _saved(directory, steps=(1, 2, 3), async_save=True):
    with Checkpointer(directory, save_every=1, keep=5, async_save=async_save) as ckpt:
        for step in steps:
            ckpt.save(step, _tree(step), {"step": step, "note": "x" * 8})
    return directory


def _largest_array_file(step_dir):
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
    return max(files, key=os.path.getsize)


def _flip(path, offset=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _snapshot(directory):
    return {os.path.relpath(os.path.join(r, n), directory): open(os.path.join(r, n), "rb").read()
            for r, _, ns in os.walk(directory) for n in ns}


@pytest.mark.parametrize("async_save", [True, False])
def test_every_step_gets_a_manifest_that_verifies(tmp_path, async_save):
    _saved(tmp_path, async_save=async_save)
    for step in (1, 2, 3):
        assert verify(str(tmp_path / str(step))).ok
        listed = json.loads((tmp_path / str(step) / MANIFEST).read_text())["files"]
        assert any(name.startswith("state/") for name in listed) and any(name.startswith("meta/") for name in listed)


@pytest.mark.parametrize("corrupt", ["array_bytes", "meta_value", "extra_file", "missing_file"])
def test_a_corrupt_newest_step_is_set_aside_and_the_previous_one_restored(tmp_path, corrupt):
    _saved(tmp_path)
    newest = tmp_path / "3"
    if corrupt == "array_bytes":
        _flip(_largest_array_file(newest))
    elif corrupt == "meta_value":  # still valid JSON, still decodable: only the hash can tell
        meta = next(os.path.join(r, n) for r, _, ns in os.walk(newest / "meta") for n in ns if n != "commit_success.txt"
                    and b'"note"' in open(os.path.join(r, n), "rb").read())
        text = open(meta).read()
        open(meta, "w").write(text.replace('"step": 3', '"step": 4'))
    elif corrupt == "extra_file":
        (newest / "state" / "stray").write_text("?")
    else:
        os.remove(_largest_array_file(newest))
    expected_reason = {"array_bytes": "SHA-256 differs", "meta_value": "SHA-256 differs",
                       "extra_file": "not in the manifest", "missing_file": "missing"}[corrupt]
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        step, aside = ckpt.verified_latest()
        assert step == 2 and [a["step"] for a in aside] == [3] and expected_reason in aside[0]["reason"]
        assert os.path.isdir(aside[0]["moved_to"]) and not newest.exists()  # kept aside, not deleted
        assert list(ckpt.all_steps()) == [1, 2]
        state, meta = ckpt.restore(step, abstract_state=abstract_tree(_tree(0)))
        assert float(state["w"][0, 0]) == 2.0 and meta["step"] == 2
        assert ckpt.save(3, _tree(33), {"step": 3})  # step 3 can be written again
    assert verify(str(tmp_path / "3")).ok


def test_no_step_verifies_raises_and_moves_nothing(tmp_path):
    _saved(tmp_path, steps=(1, 2))
    for step in (1, 2):
        _flip(_largest_array_file(tmp_path / str(step)))
    before = _snapshot(tmp_path)
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        with pytest.raises(CheckpointError, match=r"no checkpoint .* verifies \(step 2: state/.*; step 1: state/"):
            ckpt.verified_latest()
    assert _snapshot(tmp_path) == before


def test_cli_resumes_from_the_newest_good_checkpoint_and_stops_when_none_is(tmp_path):
    """Through the command line: a flipped byte in the newest checkpoint makes the rerun resume from the step
    before (summary.json and the console say so); with every checkpoint corrupt the rerun exits 2 with one
    line and leaves the workdir's checkpoints byte for byte as they were."""
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}

    def main(*args):
        cmd = [sys.executable, "-m", "trd_jax.main", "--config", os.path.join(TESTS, "helpers", "tiny_recipe.py"),
               "--workdir", str(tmp_path / "run"), "--config.eval.initial=False", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first = main("--config.train.steps=3")
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    _flip(_largest_array_file(ckpts / "3"))
    again = main("--config.train.steps=3")  # resumes from step 2 and trains step 3 again
    assert again.returncode == 0, again.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert [a["step"] for a in summary["checkpoints_set_aside"]] == [3]
    assert "Checkpoint step 3 failed verification" in again.stdout
    assert os.listdir(str(ckpts) + ".corrupt")
    for step in os.listdir(ckpts):
        _flip(_largest_array_file(ckpts / step))
    before = _snapshot(ckpts)
    broken = main("--config.train.steps=3")
    assert broken.returncode == 2
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint in") and "verifies" in lines[0], lines
    assert _snapshot(ckpts) == before
