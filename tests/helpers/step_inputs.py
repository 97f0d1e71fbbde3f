"""The device arrays of a distillation batch and the teacher's scoring of it, shared by the step tests."""

import jax
import jax.numpy as jnp
from flax import nnx

from trd_jax.steps import score


def step_inputs(batch, teacher_graph, teacher_params) -> dict:
    """student / teacher Layouts (device arrays), targets, mask, the teacher's ScoreOutput (`scored`) and lm
    head (`head`)."""

    def seqs(layout):
        return jax.tree.map(jnp.asarray, layout)

    student, teacher = seqs(batch.student), seqs(batch.teacher)
    targets, mask = jnp.asarray(batch.targets), jnp.asarray(batch.response_mask)
    scored = jax.jit(score, static_argnums=0)(
        teacher_graph, teacher_params, teacher, targets, mask)
    head = nnx.merge(teacher_graph, teacher_params).lm_head_weight()
    return dict(student=student, teacher=teacher, targets=targets, mask=mask, scored=scored, head=head)
