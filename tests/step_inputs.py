"""The device arrays of a distillation batch and the teacher's scoring of it, shared by the step tests."""

import jax
import jax.numpy as jnp
from flax import nnx

from trd_jax.steps import Sequences, score


def step_inputs(batch, teacher_graph, teacher_params) -> dict:
    """student / teacher Sequences, targets, mask, the teacher's ScoreOutput (`scored`) and lm head (`head`)."""

    def seqs(layout):
        return Sequences(jnp.asarray(layout.tokens), jnp.asarray(layout.positions), jnp.asarray(layout.mask))

    student, teacher = seqs(batch.student), seqs(batch.teacher)
    targets, mask = jnp.asarray(batch.targets), jnp.asarray(batch.response_mask)
    scored = jax.jit(score, static_argnums=0, static_argnames=("context_width",))(
        teacher_graph, teacher_params, teacher, targets, mask, context_width=batch.teacher.context_width)
    head = nnx.merge(teacher_graph, teacher_params).lm_head_weight()
    return dict(student=student, teacher=teacher, targets=targets, mask=mask, scored=scored, head=head)
