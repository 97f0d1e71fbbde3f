"""Training batches from stored target rows (offline.dir in train mode): the student's layout of each row's
prompt and trajectory, and the teacher's stored top-k targets placed at the same response columns."""

from __future__ import annotations

import numpy as np

from trd_jax.layouts import DistillBatch, distill_batch
from trd_jax.offline.topk import TopKTargets


def offline_batch(rows: list[dict], *, pad_id: int) -> tuple[DistillBatch, TopKTargets]:
    """(DistillBatch of prompt + response per row, host TopKTargets [B, R, k] zero past each response)."""
    batch = distill_batch([r["prompt"].tolist() for r in rows], [r["response"].tolist() for r in rows],
                          pad_id=pad_id)
    b, width = batch.targets.shape
    k = rows[0]["topk_ids"].shape[1]
    ids = np.zeros((b, width, k), np.int32)
    logp = np.zeros((b, width, k), np.float32)
    tail = np.zeros((b, width), np.float32)
    token = np.zeros((b, width), np.float32)
    for i, r in enumerate(rows):
        n = len(r["response"])
        if r["topk_ids"].shape != (n, k):
            raise ValueError(f"stored row {r['example_id']!r}: targets {r['topk_ids'].shape} for {n} response "
                             f"tokens and k={k}")
        ids[i, :n], logp[i, :n], tail[i, :n], token[i, :n] = r["topk_ids"], r["topk_logp"], r["tail"], r["token_logp"]
    return batch, TopKTargets(ids, logp, tail, token)
