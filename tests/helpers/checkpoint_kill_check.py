"""Run by test_checkpointing.py as `python checkpoint_kill_check.py DIR MARKER`: saves step 1 and waits for
it, then starts an async save of step 2 that stalls inside orbax's finalize of the step directory (every
byte of step 2 written into its temporary directory, only the commit rename left), touches MARKER and
sleeps until the test SIGKILLs it. Stalling there makes the kill land mid-save on every run, at the
point where a non-atomic writer would be most tempted to have replaced step 1 already.

make_tree() also builds the test's own states (imported by path), so both processes agree bit for bit.
"""

import asyncio
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trd_jax.checkpointing import Checkpointer
from trd_jax.models.config import ModelConfig
from trd_jax.models.transformer import Transformer
from trd_jax.steps import init_state

CFG = ModelConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8)


def make_tree(seed: int, *, ema: bool = False):
    """(tree, meta) as the controller would save them: a TrainState one AdamW step in (non-trivial moments
    and count), a frozen bf16 teacher copy, the PRNG key as raw key data and as a typed key."""
    _, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(seed)))
    opt = optax.adamw(1e-2)
    state = init_state(params, opt, ema=ema)
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p + seed), params)
    updates, opt_state = opt.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ema_params = None if not ema else jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, new_params)
    state = state._replace(params=new_params, opt_state=opt_state, step=state.step + 1, ema_params=ema_params)
    key = jax.random.key(seed)
    tree = {"train": state, "teacher": jax.tree.map(lambda p: p.astype(jnp.bfloat16), params),
            "rng": jax.random.key_data(key), "typed_key": jax.random.fold_in(key, 1)}
    meta = {"step": seed, "data": {"epoch": 0, "position": 17 * seed}, "host_seeds": [seed, 2 * seed],
            "config_hash": "c0ffee", "metrics": {"loss": 0.25 * seed, "tokens": 1000 * seed}, "note": None}
    return tree, meta


def _stall_step_commit(step_name: str, marker: str):
    from orbax.checkpoint._src.path import atomicity

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        original = cls.finalize

        async def finalize(self, _original=original):
            if self.get_final().name == step_name:  # the step directory itself, after all its items
                await asyncio.to_thread(pathlib.Path(marker).touch)
                await asyncio.sleep(3600)
            return await _original(self)

        cls.finalize = finalize


def main(directory: str, marker: str) -> None:
    ckpt = Checkpointer(directory, save_every=1, keep=5, async_save=True)
    tree, meta = make_tree(1)
    assert ckpt.save(1, tree, meta)
    ckpt.wait()
    _stall_step_commit("2", marker)
    tree, meta = make_tree(2)
    assert ckpt.save(2, tree, meta)
    ckpt.wait()  # blocks in the stalled finalize until the kill
    sys.exit(3)  # not reached unless the stall failed


if __name__ == "__main__":
    main(*sys.argv[1:3])
