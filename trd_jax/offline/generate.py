"""config.mode "generate": the targets of `train.steps` steps written once to offline.dir, for training without
the teacher (issue 20).

Shard i holds what step i of the online loop would distil on, from the current (initial) student: the
prompts the step's data order gives it, the student's rollouts y_o, for TRD the teacher's rewrites y_r,
both grades, the trained trajectory, and the teacher's top-k log-probs, tail mass and token log-prob at
each of its positions (offline/topk.py), under the step's own random streams. A generation that is killed
resumes where it stopped: finished shards are kept (each is written atomically) and the data order is
replayed past them, so no row is duplicated or lost.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time

import jax
import numpy as np

from trd_jax import multihost
from trd_jax.offline import shards
from trd_jax.offline.topk import teacher_topk
from trd_jax.sharding import batch_sharding

log = logging.getLogger(__name__)


def tree_hash(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(multihost.to_host(leaf)).tobytes())
    return h.hexdigest()[:16]


def _folder_hash(directory: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def settings_identity(trainer, k: int) -> dict:
    """What decides the targets apart from the weights: a training job checks a teacher job's rounds by it."""
    s = trainer.s
    return {"mode": s.distill.mode, "trajectory": s.distill.trajectory, "teacher_context": s.distill.teacher_context,
            "k": k, "seed": s.seed, "batch_size": s.train.batch_size, "rollout_n": s.rollout.n,
            "task": trainer.task.name,
            "rollout": repr(s.rollout.sampling), "refine_sampling": repr(s.refine_sampling), "refine": repr(s.refine),
            "rollout_max_new": s.rollout.max_new, "temperature": s.loss.temperature,
            "teacher": repr(s.teacher), "opsd_teacher": s.distill.opsd_teacher, "prompt_mode": s.task.prompt_mode,
            "max_prompt_tokens": s.task.max_prompt_tokens, "prompt_lookup_tokens": s.rollout.prompt_lookup_tokens,
            "tokenizer_sha256": _folder_hash(trainer.task.tokenizer_dir)}


def identity(trainer, k: int, vocab: int) -> dict:
    """What decides the targets: a folder generated with another identity is refused."""
    return {**settings_identity(trainer, k), "vocab": vocab, "student_sha256": tree_hash(trainer.state.params),
            "teacher_sha256": tree_hash(trainer._teacher_params())}


def _rows(t, targets, examples_of_rows) -> list[dict]:
    """One record per trained row (dropped rows have nothing to train on), response positions only."""
    rows, batch = t.rows, t.batch
    ids, logp, tail, token = (np.asarray(multihost.to_host(x)) for x in targets)
    out = []
    for b, source in enumerate(rows.sources):
        if source == "dropped":
            continue
        n = len(rows.responses[b])
        if not np.all(batch.response_mask[b, :n]):
            raise AssertionError(f"row {b}: the response mask does not cover its {n} tokens")
        j = rows.verdicts.rewrite_index[b] if rows.verdicts is not None else -1
        out.append({"prompt": np.asarray(rows.prompts[b], np.int32),
                    "response": np.asarray(rows.responses[b], np.int32),
                    "topk_ids": ids[b, :n], "topk_logp": logp[b, :n], "tail": tail[b, :n], "token_logp": token[b, :n],
                    "source": source, "y_o_reward": float(rows.y_o_reward[b]),
                    "y_r_reward": float(rows.y_r_reward[j]) if j >= 0 else -1.0,
                    "example_id": str(examples_of_rows[b].id)})
    return out


def generate_targets(trainer, directory: str, *, k: int, num_shards: int | None = None, first_step: int = 0) -> dict:
    """Writes shards 0 .. num_shards - 1 (default train.steps) into `directory`, skipping finished ones;
    returns the manifest. first_step: shard i is step first_step + i (its prompts and random streams), for
    the rounds of a multi-round run (offline/rounds.py)."""
    s = trainer.s
    num_shards = s.train.steps if num_shards is None else num_shards
    head = trainer.roles.teacher_head(trainer._teacher_params())  # fixed: nothing trains while generating
    k = min(k, int(head.shape[1]))  # a small vocabulary is stored whole (exact targets)
    # Several processes: every one computes every shard (the controller's steps are collectives over the same
    # global batch); process 0 alone writes shards and manifest. Each reads what is finished before the first
    # collective, so all skip the same shards.
    writer = jax.process_index() == 0
    record = {"config": {key: v for key, v in trainer.cfg.to_dict().items() if key != "model"},
              "models": {"student": s.student.path, "teacher": s.teacher.path if s.teacher is not None else None}}
    manifest = shards.check_or_write_manifest(directory, identity(trainer, k, int(head.shape[1])), write=writer,
                                              record=record)
    finished = np.zeros(num_shards, bool)
    finished[[i for i in shards.finished_shards(directory) if i < num_shards]] = True
    done = set(np.flatnonzero(multihost.process0_decides(finished)).tolist())  # one decision for all processes
    topk = jax.jit(functools.partial(teacher_topk, k=k, temperature=s.loss.temperature, chunk_size=s.loss.chunk_size))
    if done:
        log.info("offline targets: %d of %d shards already in %s; resuming", len(done & set(range(num_shards))),
                 num_shards, directory)
    per_shard = dict(manifest["counts"].get("rows_per_shard", {}))
    for i in done:  # a shard finished just before a kill, its count not yet in the manifest
        if str(i) not in per_shard:
            per_shard[str(i)] = len(shards.read_shard(directory, i)) if writer else 0
    with trainer._usable_prompts():
        data = trainer.task.prompt_iterator(s.seed)
        for _ in range(first_step):
            data.next(s.train.batch_size)
        for i in range(num_shards):
            examples = data.next(s.train.batch_size)  # replayed for finished shards: the order stays the step's
            if i in done:
                continue
            start = time.perf_counter()
            t = trainer.distill_targets(first_step + i, examples, {})
            tokens, mask = t.batch.targets, t.batch.response_mask
            if multihost.multi_process():  # host rows, the same on every process -> global arrays split over rows
                tokens, mask = (multihost.to_global(x, batch_sharding(trainer.mesh)) for x in (tokens, mask))
            targets = topk(t.scored.hidden, head, tokens, mask)
            row_examples = [ex for ex in examples for _ in range(s.rollout.n)]
            rows = _rows(t, targets, row_examples)  # every process: to_host gathers collectively
            if not writer:
                continue
            shards.write_shard(directory, i, rows, k=k)
            per_shard[str(i)] = len(rows)
            shards.update_counts(directory, manifest, shards=len(per_shard), rows=sum(per_shard.values()),
                                 rows_per_shard=per_shard)
            log.info("offline targets: shard %d/%d, %d rows, %.1f s", i + 1, num_shards, len(rows),
                     time.perf_counter() - start)
    return manifest
