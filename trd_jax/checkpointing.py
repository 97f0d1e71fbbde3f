"""Checkpoints for exact resume: an orbax CheckpointManager holding two items per step,

    <dir>/<step>/state   the device pytree (TrainState with optimizer state and EMA or None, plus any
                         extra arrays: frozen OPSD teacher params, PRNG keys), written by every process
                         for the shards it owns (orbax/OCDBT handles multi-host arrays). Store keys as
                         jax.random.key_data (portable); typed keys also round-trip with orbax 0.12.
                         None subtrees (ema_params=None) round-trip as None.
    <dir>/<step>/meta    a JSON dict (data iterator position, host seeds, counters, config hash, ...),
                         written by the primary process (0) only: orbax's JsonCheckpointHandler skips the
                         write elsewhere. Every process calls save(), but only process 0's meta reaches
                         disk: gather per-host values (e.g. each host's data position) into it first.

Crash safety: a step is written into `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once
complete (on object stores: a commit_success.txt marker instead), so a save cut short by a kill never
replaces the last good step; stale temporary directories are removed when a Checkpointer opens the
directory. tests/test_checkpointing.py kills a process mid-save to check this.

Use in the host loop:

    ckpt = Checkpointer(workdir / "checkpoints", save_every=cfg.save_every, keep=cfg.keep)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state=abstract_tree(jax.eval_shape(make_state), shardings))
    with PreemptionGuard() as guard:
        for step in range(start, total):
            state, metrics = train_step(state, ...)
            stop = multihost_should_stop(guard.requested, step)
            ckpt.save(step, state, meta, force=stop)
            if stop:
                break
    ckpt.close()  # waits for the last async save
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Sequence
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


def abstract_tree(tree, shardings=None):
    """ShapeDtypeStructs for `tree` (arrays or ShapeDtypeStructs, e.g. from jax.eval_shape) carrying
    `shardings`, or the leaves' own shardings when `shardings` is None. This is what restore() places
    arrays with. `shardings` may be a prefix of `tree`, as jit's in_shardings may: e.g.
    steps.state_shardings() has one NamedSharding where the state has an nnx.Param node."""
    def one(x, s=None):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if s is not None else getattr(x, "sharding", None))

    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, jax.tree.broadcast(shardings, tree))


class Checkpointer:
    """Saves `state` every `save_every` steps (or when forced), keeps the latest `keep` steps.

    With async_save, save() returns once the device arrays are copied to host memory (so the train step
    may donate them at once) and the files are written by a background thread; the next save(),
    wait() or close() blocks until that write is finalised. Every process must make the same calls.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"Checkpointer: save_every={save_every} must be >= 1")
        if keep < 1:
            raise ValueError(f"Checkpointer: keep={keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            preservation_policy=policies.LatestN(keep),  # max_to_keep is deprecated in orbax 0.12
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # drop partial steps left by a killed save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._last_saved: int | None = None

    def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Saves when step % save_every == 0 or force; returns whether a save started. A step that is
        already saved (e.g. a forced preemption save right after an interval save) is not saved again.
        `meta` must be JSON-native (str keys; str, int, float, bool, None, lists, dicts)."""
        step = int(step)
        if not force and step % self.save_every:
            return False
        try:
            json.dumps(meta)  # fail here, not later in the background writer thread
        except (TypeError, ValueError) as e:
            raise ValueError(f"Checkpointer.save(step={step}): meta is not JSON-serialisable: {e}") from None
        # orbax raises StepAlreadyExistsError for an existing step; _last_saved also covers one still in flight
        if step == self._last_saved or step in self._manager.all_steps():
            return False
        saved = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 meta=ocp.args.JsonSave(meta)), force=force)
        if saved:
            self._last_saved = step
        return saved

    def wait(self) -> None:
        """Blocks until any in-flight async save is written and finalised (renamed into place)."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest step saved, or None. Like orbax, this counts an async save still in flight (on disk
        only after wait()); a fresh Checkpointer on the directory sees finalised steps only."""
        return self._manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self._manager.all_steps()

    def restore(self, step: int | None = None, *, abstract_state) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step` (default: the latest). `abstract_state` fixes the tree structure, shapes,
        dtypes and shardings of the result (see abstract_tree()); concrete arrays are accepted too. Each
        process reads only the shards its devices own. A mismatch in tree structure (e.g. EMA saved but
        ema_params=None expected) or in shape raises ValueError."""
        self.wait()  # latest_step() may name a save still in flight
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"Checkpointer.restore: no finalised checkpoint in {self.directory}")
        target = abstract_tree(abstract_state)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                            meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def close(self) -> None:
        """Waits for in-flight saves, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """Turns SIGTERM (the preemption notice of Cloud TPU, Slurm, Kubernetes) and optionally SIGINT into a
    flag, `guard.requested`, that the loop checks after each step to save (force=True), wait and exit
    cleanly instead of dying mid-step. A second SIGINT raises KeyboardInterrupt so Ctrl-C twice still
    stops a stuck run. Previous handlers come back on exit. Must be entered on the main thread (Python
    only delivers signals there)."""

    def __init__(self, *, sigint: bool = False):
        self.signals = (signal.SIGTERM,) + ((signal.SIGINT,) if sigint else ())
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        log.warning("received %s: will checkpoint and stop after the current step", signal.Signals(signum).name)

    def __enter__(self) -> Self:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def multihost_should_stop(flag: bool, step: int | None = None) -> bool:
    """Whether any process wants to stop: one process's SIGTERM must stop all of them at the same step,
    or the others would hang in the next collective. Single process: `flag` itself. Several processes:
    an all-gather of the flags (a collective: every process calls this at the same steps), or-ed, when
    `step` is given, with JAX's preemption sync point (the coordination service's own notice; it needs a
    call at every step)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    stop = bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))
    return stop or (step is not None and ocp.multihost.reached_preemption(int(step)))
