"""Checkpointer: bitwise round trip of a TrainState (with and without EMA) plus extra arrays and meta,
restore onto mesh shardings, save interval / keep-N / force, async save, a SIGKILL mid-save that must
leave the previous step intact, and the preemption signal guard."""

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity

from trd_jax.checkpointing import (
    Checkpointer,
    PreemptionGuard,
    abstract_tree,
    multihost_should_stop,
)
from trd_jax.sharding import make_mesh, param_shardings, replicated
from trd_jax.steps import state_shardings

HERE = os.path.dirname(__file__)
KILL_SCRIPT = os.path.join(HERE, "helpers", "checkpoint_kill_check.py")


def _load_helper():
    spec = importlib.util.spec_from_file_location("checkpoint_kill_check", KILL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tree = _load_helper().make_tree  # shared with the subprocess so both build identical states


def assert_bitwise_equal(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for (path, b), a in zip(jax.tree.leaves_with_path(expected), jax.tree.leaves(restored)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


def small_tree(i):
    return {"w": jax.numpy.full((3, 4), i, np.float32), "n": jax.numpy.int32(i)}


@pytest.mark.parametrize("ema", [False, True])
def test_round_trip_bitwise_and_onto_mesh_shardings(tmp_path, ema):
    tree, meta = make_tree(3, ema=ema)
    assert (tree["train"].ema_params is None) != ema
    with Checkpointer(tmp_path, save_every=5, keep=2) as ckpt:
        assert ckpt.save(5, tree, meta)
        ckpt.wait()
        assert ckpt.latest_step() == 5
        state, restored_meta = ckpt.restore(abstract_state=abstract_tree(tree))
        assert_bitwise_equal(state, tree)
        assert restored_meta == meta
        # a structure mismatch (EMA saved, none expected, or the reverse) is an error, never a silent drop
        other = tree["train"]._replace(ema_params=None if ema else tree["train"].params)
        with pytest.raises(ValueError, match="ema_params"):
            ckpt.restore(abstract_state=abstract_tree({**tree, "train": other}))

        # Restore placed with the shardings training uses (a 1-device mesh here; the same call places
        # shards directly on a multi-device / multi-host mesh).
        mesh = make_mesh()
        params = tree["train"].params
        shardings = {"train": state_shardings(params, param_shardings(params, mesh), optax.adamw(1e-2), mesh,
                                              ema=ema),
                     "teacher": param_shardings(tree["teacher"], mesh), "rng": replicated(mesh),
                     "typed_key": replicated(mesh)}
        abstract = abstract_tree(jax.eval_shape(lambda t: t, tree), shardings)
        state, _ = ckpt.restore(5, abstract_state=abstract)
        assert_bitwise_equal(state, tree)
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
            assert got.sharding == want.sharding
        assert isinstance(jax.tree.leaves(state)[0].sharding, jax.sharding.NamedSharding)


def test_save_interval_keep_and_force(tmp_path):
    with Checkpointer(tmp_path, save_every=2, keep=2, async_save=True) as ckpt:
        with pytest.raises(FileNotFoundError):
            ckpt.restore(abstract_state=abstract_tree(small_tree(0)))
        saved = [s for s in range(7) if ckpt.save(s, small_tree(s), {"s": s})]
        assert saved == [0, 2, 4, 6]
        # a preemption save right after the interval save of the same step (still in flight): no-op
        assert not ckpt.save(6, small_tree(6), {"s": 6}, force=True)
        assert ckpt.save(7, small_tree(7), {"s": 7}, force=True)
        ckpt.wait()
        assert list(ckpt.all_steps()) == [6, 7]
        assert sorted(os.listdir(tmp_path)) == ["6", "7"]
        state, meta = ckpt.restore(6, abstract_state=abstract_tree(small_tree(0)))
        assert_bitwise_equal(state, small_tree(6))
        assert meta == {"s": 6}
        with pytest.raises(ValueError, match="meta is not JSON"):
            ckpt.save(8, small_tree(8), {"seed": np.int64(1)})
    # reopening sees the kept steps; saves continue after them
    with Checkpointer(tmp_path, save_every=2, keep=2, async_save=False) as ckpt:
        assert ckpt.latest_step() == 7
        assert ckpt.save(8, small_tree(8), {})
        assert list(ckpt.all_steps()) == [7, 8]


def test_async_save_returns_before_commit_and_wait_makes_it_durable(tmp_path, monkeypatch):
    reached, release = threading.Event(), threading.Event()
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def gated(self):
        if self.get_final().name == "4":
            reached.set()
            await asyncio.to_thread(release.wait, 60)
        return await original(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", gated)
    tree = small_tree(4)
    with Checkpointer(tmp_path, save_every=2, keep=3, async_save=True) as ckpt:
        try:
            assert ckpt.save(4, tree, {"s": 4})
            # save() has returned, yet the background writer has not committed step 4
            assert reached.wait(60)
            assert not (tmp_path / "4").exists() and any(d.startswith("4.") for d in os.listdir(tmp_path))
            for x in jax.tree.leaves(tree):  # as a donating train step would: orbax holds host copies
                x.delete()
        finally:
            release.set()  # never leave close() waiting on the gate
        ckpt.wait()
        assert ckpt.latest_step() == 4 and (tmp_path / "4").is_dir()
    with Checkpointer(tmp_path, save_every=2, keep=3) as ckpt:
        state, meta = ckpt.restore(abstract_state=abstract_tree(small_tree(0)))
    assert_bitwise_equal(state, small_tree(4))
    assert meta == {"s": 4}


def test_sigkill_during_save_keeps_last_good_step(tmp_path):
    directory, marker, log = tmp_path / "ckpt", tmp_path / "stalled", tmp_path / "child.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, KILL_SCRIPT, str(directory), str(marker)], env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, f"child exited {child.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"child never reached the commit:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        # step 2 is fully written but not committed: only its temporary directory holds it
        partial = [d for d in os.listdir(directory) if d.startswith("2") and d != "2"]
        assert partial and not (directory / "2").exists(), os.listdir(directory)
        assert sum(len(files) for _, _, files in os.walk(directory / partial[0])) > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL

    tree1, meta1 = make_tree(1)
    tree2, meta2 = make_tree(2)
    with Checkpointer(directory, save_every=1, keep=5) as ckpt:
        assert ckpt.latest_step() == 1 and list(ckpt.all_steps()) == [1]
        state, meta = ckpt.restore(abstract_state=abstract_tree(tree1))
        assert_bitwise_equal(state, tree1)
        assert meta == meta1
        # the leftover temporary directory does not block saving step 2 again
        assert ckpt.save(2, tree2, meta2)
        ckpt.wait()
        assert list(ckpt.all_steps()) == [1, 2]
        state, meta = ckpt.restore(2, abstract_state=abstract_tree(tree2))
    assert_bitwise_equal(state, tree2)
    assert meta == meta2
    assert sorted(os.listdir(directory)) == ["1", "2"]


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)  # Python runs signal handlers on the main thread between bytecodes
    return predicate()


def test_preemption_guard_sets_flag_and_restores_handlers():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: guard.requested)
        assert guard.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is before_int  # SIGINT untouched unless asked for
        assert multihost_should_stop(guard.requested, step=3)
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert not multihost_should_stop(False)

    with PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: guard.requested) and guard.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still interrupts
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, timeout=2.0)
    assert signal.getsignal(signal.SIGINT) is before_int
