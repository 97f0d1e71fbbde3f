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

Verification: once a step is finalised, a background thread of process 0 writes its content manifest
(checkpoint_manifest.py: every file's size and SHA-256, written last). `verified_latest()` picks the newest
step whose files match their manifest, moves any newer step that fails aside (`<dir>.corrupt/`, never
deleted) and reports it; when no step verifies it raises CheckpointError (a directory written before
manifests existed, with no manifest at all, is restored unverified with a warning).

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

import concurrent.futures
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

from trd_jax import multihost
from trd_jax.checkpoint_manifest import set_aside, verify, write_manifest
from trd_jax.errors import CheckpointError

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
        # Manifests: written by process 0 on a thread of their own once a step is finalised on disk.
        self._writes_manifests = jax.process_index() == 0
        self._unhashed: list[int] = []
        self._hashing: list[concurrent.futures.Future] = []
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-manifest")

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
            if self._writes_manifests:
                self._unhashed.append(step)
        self._hash_finalised()
        return saved

    def _hash_finalised(self) -> None:
        """Hands every saved step that is now finalised (renamed into place) to the manifest thread."""
        for step in list(self._unhashed):
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path):
                self._unhashed.remove(step)
                self._hashing.append(self._hasher.submit(self._manifest, path))
        self._hashing = [f for f in self._hashing if not f.done()]

    @staticmethod
    def _manifest(path: str) -> None:
        try:
            write_manifest(path)
        except FileNotFoundError:  # the step was deleted (keep) while it was hashed
            log.debug("checkpoint %s removed before its manifest was written", path)

    def wait(self) -> None:
        """Blocks until any in-flight async save is written and finalised (renamed into place) and its
        manifest written."""
        self._manager.wait_until_finished()
        self._hash_finalised()
        concurrent.futures.wait(self._hashing)
        for future in self._hashing:
            future.result()  # an error while hashing surfaces here
        self._hashing = []

    def verified_latest(self) -> tuple[int | None, list[dict]]:
        """(the newest step whose files match their manifest, the newer steps set aside as
        [{"step", "reason", "moved_to"}]); (None, []) when there is no checkpoint. Raises CheckpointError,
        moving nothing, when checkpoints exist but none verifies."""
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None, []
        verdicts = {step: verify(os.path.join(self.directory, str(step))) for step in steps}
        good = [step for step in steps if verdicts[step].ok]
        if not good:
            if all(v.reason == "no manifest" for v in verdicts.values()):  # written before manifests existed
                log.warning("checkpoints in %s have no manifests: restoring step %d unverified", self.directory,
                            steps[0])
                return steps[0], []
            detail = "; ".join(f"step {step}: {verdicts[step].reason}" for step in steps)
            raise CheckpointError(f"no checkpoint in {self.directory} verifies ({detail}); nothing was moved or "
                                  "deleted")
        aside = [{"step": step, "reason": verdicts[step].reason} for step in steps if step > good[0]]
        if aside:
            if jax.process_index() == 0:
                for entry in aside:
                    entry["moved_to"] = set_aside(self.directory, entry["step"])
                    log.warning("checkpoint step %d fails verification (%s): moved to %s", entry["step"],
                                entry["reason"], entry["moved_to"])
            if multihost.multi_process():
                multihost.sync("checkpoints-set-aside")
            self._manager.reload()
        return good[0], aside

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
        """Waits for in-flight saves and their manifests, then releases the threads."""
        try:
            self.wait()
        finally:
            self._manager.close()
            self._hasher.shutdown()

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
