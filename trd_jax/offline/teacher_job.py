"""A teacher job beside a training job (offline.teacher_job): the rounds of a multi-round offline run, with the
teacher on its own devices (its own process, mesh and launch script) instead of the student's.

The two jobs meet in offline.dir, on a file system both see:
- the training job (mode=train) publishes its student at the start of each round r, as an orbax checkpoint in
  students/round-<r>/ and then, once that is complete, a record students/round-<r>.json with its hash; it then
  waits until round r's shards are all written, checks that they come from the student they should (the one
  of round r - max_lag) and trains on them;
- the teacher job (mode=generate) writes round r (offline/generate.py, resumable) from the student published
  for round r - max_lag. With max_lag = 0 the jobs alternate and train exactly what a single-process
  multi-round run trains; with max_lag = L the teacher writes up to L rounds ahead of the trainer, on weights
  up to L rounds old, and neither job idles while the other works.
A job that waits says so when it starts waiting and every offline.wait_report_s seconds after, and gives up
after offline.wait_timeout_s (0: never) with an error naming what it waited for. Weights no round can still
need (those of rounds before r - max_lag once round r starts) are deleted; their records stay.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp

from trd_jax import multihost
from trd_jax.checkpointing import abstract_tree
from trd_jax.errors import TrainingError
from trd_jax.json_files import read_json_object
from trd_jax.metrics import atomic_write_json
from trd_jax.offline import shards
from trd_jax.offline.generate import generate_targets, settings_identity, tree_hash

log = logging.getLogger(__name__)

STUDENTS = "students"
POLL_S = 0.5


def student_dir(directory: str, r: int) -> str:
    return os.path.join(os.path.abspath(directory), STUDENTS, f"round-{r:03d}")


def student_record(directory: str, r: int) -> str:
    return student_dir(directory, r) + ".json"


def source_round(r: int, max_lag: int) -> int:
    """The round whose student writes round r's targets."""
    return max(0, r - max_lag)


def _published(trainer) -> dict:
    state = trainer.state
    return {"params": state.params} if state.ema_params is None else {"params": state.params, "ema": state.ema_params}


def publish_student(trainer, directory: str, r: int, *, at_round_start: bool) -> str:
    """Writes the student as it is now as round r's; returns its hash. A record already there is checked, not
    rewritten: at the round's first step (a run resumed from before it replays to the same weights) the weights
    must hash to it, else the folder holds another run's rounds; inside the round (resumed from a checkpoint
    there, the weights moved on) it is trusted, and its absence is an error. Every process takes part in the
    save; host 0 writes the record last, so a record means a complete checkpoint."""
    record = student_record(directory, r)
    if bool(multihost.process0_decides(os.path.exists(record))):
        recorded = read_json_object(record)
        if at_round_start and tree_hash(trainer.state.params) != recorded["student_sha256"]:
            raise TrainingError(f"offline.dir={directory}: {record} records another student than this run's at the "
                                f"start of round {r}: the folder holds another run's rounds (or this run does not "
                                "replay bit for bit); use a new offline.dir")
        return recorded["student_sha256"]
    if not at_round_start:
        raise TrainingError(f"offline.dir={directory}: this run resumed inside round {r}, whose student was never "
                            f"published ({record} is missing): use the offline.dir the run started with")
    checkpointer = ocp.StandardCheckpointer()
    try:  # force: a save cut short before its record was written is replaced
        checkpointer.save(student_dir(directory, r), _published(trainer), force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    sha = tree_hash(trainer.state.params)
    if jax.process_index() == 0:
        atomic_write_json(record, {"round": r, "step": int(multihost.to_host(trainer.state.step)),
                                   "student_sha256": sha, "max_lag": trainer.s.offline.max_lag})
    log.info("offline teacher job: published the student of round %d (%s)", r, sha)
    return sha


def load_student(trainer, directory: str, r: int) -> str:
    """Replaces the trainer's student (and EMA) with round r's published one; returns its hash."""
    recorded = read_json_object(student_record(directory, r))
    if recorded.get("max_lag") != trainer.s.offline.max_lag:
        raise TrainingError(f"offline.dir={directory}: the training job runs with offline.max_lag="
                            f"{recorded.get('max_lag')}, this teacher job with {trainer.s.offline.max_lag}: "
                            "give both the same")
    if not os.path.isdir(student_dir(directory, r)):
        raise TrainingError(f"offline.dir={directory}: the student of round {r} was deleted (the training job has "
                            f"moved past the rounds that need it): {student_dir(directory, r)}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(student_dir(directory, r), abstract_tree(_published(trainer)))
    finally:
        checkpointer.close()
    trainer.state = trainer.state._replace(params=restored["params"], ema_params=restored.get("ema"))
    sha = tree_hash(trainer.state.params)
    if sha != recorded["student_sha256"]:
        raise TrainingError(f"offline.dir={directory}: the student of round {r} hashes to {sha}, its record says "
                            f"{recorded['student_sha256']}: {student_dir(directory, r)} was changed after it was "
                            "published")
    return sha


def prune_students(directory: str, before: int) -> None:
    """Deletes the published weights of rounds < before (their records stay)."""
    if jax.process_index() != 0:
        return
    for r in range(before):
        path = student_dir(directory, r)
        if os.path.isdir(path):
            shutil.rmtree(path)


def wait_until(ready: Callable[[], bool], *, what: str, progress: Callable[[], str], report_s: float,
               timeout_s: float, clock=time.monotonic, sleep=time.sleep) -> float:
    """Blocks until ready(); returns the seconds waited. Logs when it starts waiting and every report_s after;
    raises TrainingError after timeout_s (> 0)."""
    if ready():
        return 0.0
    start = clock()
    log.warning("blocked on %s: %s", what, progress())
    next_report = start + report_s
    while not ready():
        now = clock()
        if timeout_s and now - start >= timeout_s:
            raise TrainingError(f"gave up waiting for {what} after {now - start:.0f} s (offline.wait_timeout_s="
                                f"{timeout_s:g}): {progress()}")
        if now >= next_report:
            log.warning("still blocked on %s after %.1f s: %s", what, now - start, progress())
            next_report += report_s
        sleep(POLL_S)
    waited = clock() - start
    log.info("%s ready after %.1f s", what, waited)
    return waited


def await_round(trainer, r: int, *, at_round_start: bool) -> float:
    """The training job's side of round r: publish, prune, wait for the targets, check where they come from.
    Returns the seconds spent blocked on the targets."""
    o = trainer.s.offline
    publish_student(trainer, o.dir, r, at_round_start=at_round_start)
    prune_students(o.dir, before=source_round(r, o.max_lag))
    path = shards.round_dir(o.dir, r)

    def progress() -> str:
        return (f"{len(shards.finished_shards(path))} of {o.steps_per_round} shards in {path} (written by the "
                f"teacher job: mode=generate with offline.teacher_job=true and this run's offline settings)")

    waited = wait_until(lambda: shards.round_complete(o.dir, r, o.steps_per_round),
                        what=f"the targets of round {r}",
                        progress=progress, report_s=o.wait_report_s, timeout_s=o.wait_timeout_s)
    check_round(trainer, r)
    return waited


def check_round(trainer, r: int) -> None:
    """Round r's targets must come from this run's settings and from the student published for them."""
    o = trainer.s.offline
    path = shards.round_dir(o.dir, r)
    found = shards.read_manifest(path)["identity"]
    source = source_round(r, o.max_lag)
    expected = {**settings_identity(trainer, found["k"]),
                "student_sha256": read_json_object(student_record(o.dir, source))["student_sha256"]}
    differ = sorted(key for key in expected if key != "k" and found.get(key) != expected[key])
    if found["k"] != min(o.top_k, found.get("vocab", found["k"])):  # k, or the whole of a smaller vocabulary
        differ.append("k")
    if differ:
        raise TrainingError(f"offline.dir={o.dir}: round {r}'s targets ({path}) do not come from this run "
                            f"({', '.join(differ)} differ; they should come from the student of round {source}): "
                            f"start the teacher job with this run's settings, or use a new offline.dir")


def serve_rounds(trainer) -> list[dict]:
    """The teacher job: writes every round's targets in turn, each from the student its round needs, waiting
    for the training job to publish it. Rounds already written are skipped (a restarted teacher job goes on
    where it stopped). Returns the rounds' manifests."""
    o = trainer.s.offline
    manifests = []
    for r in range(o.rounds):
        path = shards.round_dir(o.dir, r)
        # one decision for all processes
        if bool(multihost.process0_decides(shards.round_complete(o.dir, r, o.steps_per_round))):
            manifests.append(shards.read_manifest(path))
            continue
        source = source_round(r, o.max_lag)
        record = student_record(o.dir, source)
        missing = (f"no {record} yet (written by the training job: mode=train with offline.teacher_job=true and "
                   f"this job's offline settings)")
        wait_until(lambda: os.path.exists(record), progress=lambda: missing,  # noqa: B023 -- used in this iteration
                   what=f"the training job's student of round {source} (for round {r}'s targets)",
                   report_s=o.wait_report_s, timeout_s=o.wait_timeout_s)
        sha = load_student(trainer, o.dir, source)
        log.info("offline teacher job: round %d/%d from the student of round %d (%s)", r + 1, o.rounds, source, sha)
        manifests.append(generate_targets(trainer, path, k=o.top_k, num_shards=o.steps_per_round,
                                          first_step=r * o.steps_per_round))
    return manifests
