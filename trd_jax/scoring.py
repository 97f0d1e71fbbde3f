"""The score phase's forwards: one jitted score per side (student, teacher; steps.jit_score), compiled once per
context width, run in row groups of train.max_score_rows, on global arrays across processes; and the teacher's
scores of a step's trained batch, taken from the refine pass's states where they serve (score_reuse)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from trd_jax import diagnostics, multihost, row_groups, score_reuse
from trd_jax.layouts import DistillBatch, Layout, distill_batch
from trd_jax.sharding import batch_sharding
from trd_jax.steps import ScoreOutput, jit_score


class Scorer:
    """s: the run's Settings; roles: its Roles (graphs, shardings, the teacher's head); add_flops(phase, params,
    tokens): the run's FLOPs counter."""

    def __init__(self, s, roles, mesh, add_flops: Callable[[str, int, int], None]):
        self.s, self.roles, self.mesh, self.add_flops = s, roles, mesh, add_flops
        self._fns: dict = {}
        self._assemble = None  # score_reuse.assemble, compiled on first use
        self._head_size = 0
        self.stats_fn = jax.jit(diagnostics.teacher_token_stats, static_argnames=("chunk_size", "temperature"))

    def __call__(self, side: str, params, layout: Layout, targets, mask) -> ScoreOutput:
        if side not in self._fns:
            graph, shard = self.roles.graph_and_shardings(side)
            self._fns[side] = jit_score(graph, shard, self.mesh, temperature=self.s.loss.temperature,
                                        chunk_size=self.s.loss.chunk_size)
        fn, args, rows = self._fns[side], (layout, targets, mask), np.shape(targets)[0]
        if not self.s.train.max_score_rows or self.s.train.max_score_rows >= rows:
            return fn(params, *self._place(args))
        # train.max_score_rows: the forward's activations scale with the group, the output is assembled in place
        return row_groups.run_in_groups(lambda part: fn(params, *part), args, rows=rows,
                                        group=self.s.train.max_score_rows, mesh=self.mesh, place=self._place)

    def _place(self, args):
        if multihost.multi_process():  # host rows, the same on every process -> global arrays split over rows
            return jax.tree.map(lambda x: multihost.to_global(x, batch_sharding(self.mesh, np.ndim(x))), args)
        return args

    def batch(self, teacher_params, batch: DistillBatch, rows, kept: dict, metrics: dict) -> ScoreOutput:
        """The teacher's ScoreOutput of the trained batch: from the refine pass's states (kept["hidden"]) where
        they serve, by a forward of the teacher elsewhere. Counts the phase's FLOPs: a forward over the rows
        scored anew, the lm_head product over the reused ones."""
        if kept.get("hidden") is None:
            self.add_flops("score", self.roles.teacher_count, int(batch.teacher.mask.sum()))
            return self("teacher", teacher_params, batch.teacher, batch.targets, batch.response_mask)
        src = score_reuse.reused_rows(rows)
        index, slot = score_reuse.rows_to_recompute(src)
        recomputed = None
        if index.size:
            recomputed = self("teacher", teacher_params, *score_reuse.sub_batch(batch, index)).hidden
        if self._assemble is None:
            self._head_size = int(np.prod(self.roles.teacher_head(teacher_params).shape))  # FLOPs estimate
            self._assemble = score_reuse.jit_assemble(self.roles.teacher_graph, temperature=self.s.loss.temperature,
                                                      chunk_size=self.s.loss.chunk_size)
        metrics["score/reused_rows"] = int((src >= 0).sum())
        self.add_flops("score", self.roles.teacher_count, int(batch.teacher.mask[src < 0].sum()))
        self.add_flops("score", self._head_size, int(batch.response_mask[src >= 0].sum()))
        return self._assemble(teacher_params, score_reuse.pad_rows(kept["hidden"]), src, recomputed, slot,
                              batch.targets, batch.response_mask)

    def diagnostics(self, rows, batch: DistillBatch, scored: ScoreOutput, student_params, teacher_params, vanilla,
                    *, pad_id: int) -> dict[str, float]:
        """Prefix-failure diagnostics (trd_jax/diagnostics.py) on the trained batch and, for TRD, on the rollouts
        y_o under the vanilla teacher context: what token-level OPD would have trained on."""
        head = self.roles.teacher_head(teacher_params)

        def one(b: DistillBatch, teacher_out, prefix: str) -> dict:
            targets, mask = b.targets, b.response_mask
            if multihost.multi_process():
                targets, mask = (multihost.to_global(x, batch_sharding(self.mesh)) for x in (targets, mask))
            stats = self.stats_fn(teacher_out.hidden, head, targets, mask,
                                  chunk_size=self.s.loss.chunk_size, temperature=self.s.loss.temperature)
            student = self("student", student_params, b.student, b.targets, b.response_mask)
            return diagnostics.summarize(multihost.host_tree(stats), b.response_mask,
                                         student_logp=multihost.to_host(student.logp),
                                         teacher_logp=multihost.to_host(teacher_out.logp), prefix=prefix)

        metrics = one(batch, scored, "diag/trained/")
        if self.s.distill.trajectory == "y_o":
            metrics.update({k.replace("diag/trained/", "diag/y_o/"): v for k, v in metrics.items()})
        else:
            b_o = distill_batch(rows.prompts, rows.y_o, vanilla, pad_id=pad_id)
            metrics.update(one(b_o, self("teacher", teacher_params, b_o.teacher, b_o.targets, b_o.response_mask),
                               "diag/y_o/"))
        return metrics
