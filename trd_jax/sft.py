"""Supervised fine-tuning (token cross-entropy on responses), used to bootstrap the embedded task's
teacher and student from scratch.

Data come as named sets of (context ids, response ids) with a sampling weight. Each batch is drawn from
one set, padded to that set's fixed widths (left-padded context, right-padded response, as in
trd_jax.layouts), so there is one compiled step per set and no recompilation in the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trd_jax import losses
from trd_jax.layouts import build_layout, response_columns
from trd_jax.models.transformer import Transformer
from trd_jax.shapes import bucket

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTSet:
    name: str
    contexts: Sequence[Sequence[int]]
    responses: Sequence[Sequence[int]]  # EOS included: the model learns to stop
    weight: float = 1.0

    def __post_init__(self):
        if len(self.contexts) != len(self.responses) or not self.contexts:
            raise ValueError(f"SFT set {self.name!r}: {len(self.contexts)} contexts for {len(self.responses)} "
                             "responses (need the same, non-zero number)")


def sft_loss(params, graphdef, tokens, positions, mask, targets, response_mask, *, context_width: int):
    """Mean negative log-likelihood of the response tokens (a token mean over the batch)."""
    model: Transformer = nnx.merge(graphdef, params)
    hidden, _ = model(tokens, positions, mask)
    hidden = response_columns(hidden, context_width, targets.shape[1])
    logp = losses.fused_token_logprobs(hidden, model.lm_head_weight(), targets, chunk_size=targets.shape[1],
                                       mask=response_mask)
    return -jnp.sum(jnp.where(response_mask, logp, 0.0)) / jnp.maximum(jnp.sum(response_mask), 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "context_width"), donate_argnums=(1, 2))
def sft_step(graphdef, params, opt_state, batch, *, optimizer, context_width: int):
    loss, grads = jax.value_and_grad(sft_loss)(params, graphdef, *batch, context_width=context_width)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _batch(s: SFTSet, rows: np.ndarray, widths: tuple[int, int]):
    layout = build_layout([s.contexts[i] for i in rows], [s.responses[i] for i in rows], context_width=widths[0],
                          response_width=widths[1], name=f"{s.name} contexts")
    response_mask = layout.mask[:, widths[0]:]
    targets = np.where(response_mask, layout.tokens[:, widths[0]:], 0).astype(np.int32)
    return layout.tokens, layout.positions, layout.mask, targets, response_mask


@functools.lru_cache(maxsize=16)
def _optimizer(learning_rate: float, steps: int, warmup_steps: int, weight_decay: float):
    """One optimizer object per setting: sft_step takes it as a static argument, so equal settings (a bootstrap
    rebuilt, each SFT phase of the same length) reuse its compiled steps instead of tracing them again."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1),
                                                  learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def train_sft(model: Transformer, sets: Sequence[SFTSet], *, steps: int, batch_tokens: int, learning_rate: float,
              seed: int, warmup_steps: int = 50, weight_decay: float = 0.01,
              on_log: Callable[[int, dict[str, float]], None] | None = None, log_every: int = 50) -> Transformer:
    """Trains ``model`` for ``steps`` Adam steps (warmup, cosine decay) and returns it with the new weights.
    A batch of a set has batch_tokens // (its padded row width) rows (at least 4), so long-context sets do
    not cost more per step than short ones. Deterministic for a seed."""
    graphdef, params = nnx.split(model)
    optimizer = _optimizer(learning_rate, steps, warmup_steps, weight_decay)
    params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)
    widths = [(bucket(max(map(len, s.contexts)), 16), bucket(max(map(len, s.responses)), 8)) for s in sets]
    rows_per_batch = [max(4, batch_tokens // (c + r)) for c, r in widths]
    weights = np.array([s.weight for s in sets], np.float64)
    rng = np.random.default_rng(seed)
    running: dict[str, list[float]] = {s.name: [] for s in sets}
    for step in range(steps):
        k = int(rng.choice(len(sets), p=weights / weights.sum()))
        rows = rng.integers(0, len(sets[k].contexts), rows_per_batch[k])
        batch = tuple(jnp.asarray(a) for a in _batch(sets[k], rows, widths[k]))
        params, opt_state, loss = sft_step(graphdef, params, opt_state, batch, optimizer=optimizer,
                                           context_width=widths[k][0])
        running[sets[k].name].append(loss)
        if on_log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(step + 1, {f"sft_loss/{name}": float(np.mean(jax.device_get(v)))
                              for name, v in running.items() if v})
            running = {s.name: [] for s in sets}
    return nnx.merge(graphdef, params)
