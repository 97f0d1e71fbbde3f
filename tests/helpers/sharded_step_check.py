"""Run by test_steps.py in a process with 8 fake CPU devices: one update step on a 1-device mesh and
on a data=2 x fsdp=2 x tensor=2 mesh must give the same loss, gradient norm and parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trd_jax.layouts import distill_batch
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.sharding import MeshConfig, make_mesh, param_shardings
from trd_jax.losses import LossConfig
from trd_jax.steps import TeacherSignal, UpdateBatch, init_sharded_state, jit_score, jit_update, to_micro_batches

assert len(jax.devices()) == 8, jax.devices()
V = 64
STUDENT = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8)
TEACHER = STUDENT.replace(hidden_size=48, num_heads=4, num_kv_heads=4, head_dim=12)
rng = np.random.default_rng(0)
batch = distill_batch([list(rng.integers(1, V, n)) for n in rng.integers(2, 9, 8)],
                      [list(rng.integers(1, V, n)) for n in rng.integers(1, 12, 8)],
                      [list(rng.integers(1, V, n)) for n in rng.integers(2, 20, 8)])
s_graph, s_params = nnx.split(Transformer(STUDENT, rngs=nnx.Rngs(0)))
t_graph, t_params = nnx.split(Transformer(TEACHER, rngs=nnx.Rngs(1)))
# Plain SGD with lr 1: each step subtracts the gradient itself, so the parameters compare gradients.
# (Adam would divide near-zero gradients by their own magnitude and amplify float noise.)
optimizer = optax.sgd(1.0)
loss = LossConfig("forward_kl", chunk_size=8)


def run(mesh):
    s_sh, t_sh = param_shardings(s_params, mesh), param_shardings(t_params, mesh)
    state = init_sharded_state(jax.device_put(s_params, s_sh), s_sh, optimizer, mesh)
    teacher = jax.device_put(t_params, t_sh)
    seq = lambda l: jax.tree.map(jnp.asarray, l)  # noqa: E731
    targets, mask = jnp.asarray(batch.targets), jnp.asarray(batch.response_mask)
    scored = jit_score(t_graph, t_sh, mesh, chunk_size=8)(
        teacher, seq(batch.teacher), targets, mask)
    head = nnx.merge(t_graph, teacher).lm_head_weight()
    step = jit_update(s_graph, optimizer, loss, jax.tree.map(lambda x: x.sharding, state), mesh)
    micro = to_micro_batches((seq(batch.student), targets, mask, scored.hidden, scored.logp), 2, mesh)
    for _ in range(2):  # two steps: the second sees updated params and optimizer moments
        seq_m, targets_m, mask_m, hidden_m, logp_m = micro
        state, metrics = step(state, UpdateBatch(seq_m, targets_m, mask_m), TeacherSignal(hidden_m, head, logp_m))
    print(mesh.shape, "param sharding of q_proj:", state.params["layers"][0]["attn"]["q_proj"][...].sharding.spec)
    return float(metrics.loss), float(metrics.grad_norm), jax.tree.map(np.asarray, state.params)


one = run(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
eight = run(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
print("loss", one[0], eight[0], "grad_norm", one[1], eight[1])
np.testing.assert_allclose(one[0], eight[0], rtol=1e-5)
np.testing.assert_allclose(one[1], eight[1], rtol=1e-5)
for a, b in zip(jax.tree.leaves(one[2]), jax.tree.leaves(eight[2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
print("MATCH")
