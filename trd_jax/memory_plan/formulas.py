"""Analytical per-device bytes of activations, KV caches and the fused loss, as formulas of the model shape."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from trd_jax.models.config import ModelConfig
from trd_jax.losses import LossConfig

_F32 = 4  # bytes of the float32 buffers the model and the loss keep whatever the compute dtype

# Counting convention: a decoder layer on `tokens` positions (rows x length) and `entries` attention scores
# (rows x heads x T x S). b is the compute dtype's size. Without remat, autodiff keeps per layer:
#   b x tokens x (x, normed x: 2d | q, k, v before and after qk-norm / rope: 2(H + 2K)hd | attention
#                 output: H hd | residual and normed x: 2d | gate, up, silu(gate) * up: 3m)
#   entries x (f32 softmax output + its compute-dtype cast, which the p @ v backward reads): 4 + b
# and the backward of one layer adds its cotangents: b x tokens x (2d + (H + 2K)hd + 2m) and two f32
# score-sized buffers (d probs, d scores). Against XLA:CPU's compiled update step (memory-minimising
# scheduler, tests/test_plan.py) this lands within -7% / +16% on small models for remat none and full, and
# overestimates dots by up to 40% on the smallest ones (conservative); TPU and GPU fuse at least as well.


def _b(cfg: ModelConfig) -> int:
    return jnp.dtype(cfg.dtype).itemsize


def _tile(cfg: ModelConfig, rows: int, queries: int, keys: int) -> int:
    """Score entries of one blockwise tile: rows x heads x block_q x block_k."""
    return rows * cfg.num_heads * min(cfg.attention_block, queries) * min(cfg.attention_block, keys)


def layer_residuals(cfg: ModelConfig, tokens: int, entries: int) -> int:
    """Bytes autodiff keeps for the backward pass of one layer without remat."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    per_token = b * (4 * d + 2 * (h + 2 * k) * hd + h * hd + 3 * m)
    if cfg.attention != "dense":  # blockwise / fused (flash) saves the output (counted above) and a f32 log-sum-exp
        return tokens * (per_token + _F32 * h)
    return tokens * per_token + entries * (_F32 + b)


def layer_saved(cfg: ModelConfig, tokens: int, entries: int, remat: str) -> int:
    """Bytes kept per layer between the forward and the backward pass under a remat policy."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    if remat == "none":
        return layer_residuals(cfg, tokens, entries)
    if remat == "full":  # the layer input only
        return tokens * b * d
    # dots: the input and the outputs of the matmuls without batch dimensions that the backward reads: q, k,
    # v, o_proj (the residual x + attn is recomputed from it), gate and up (down_proj's output only feeds an
    # add, whose backward does not read it)
    return tokens * b * (2 * d + (h + 2 * k) * hd + 2 * m)


def layer_backward(cfg: ModelConfig, tokens: int, entries: int, remat: str, tile: int = 0) -> int:
    """Transient bytes of one layer's backward: cotangents, plus the recomputed residuals under remat. `tile`:
    score entries of one blockwise tile (the backward holds scores, p, dp and ds of one tile, and f32 dq, dk,
    dv accumulators)."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    work = tokens * b * (2 * d + (h + 2 * k) * hd + 2 * m)
    if cfg.attention == "dense":
        work += entries * 2 * _F32
    else:
        work += tile * 4 * _F32 + tokens * _F32 * (h + 2 * k) * hd
    recompute = 0 if remat == "none" else layer_residuals(cfg, tokens, entries) - layer_saved(
        cfg, tokens, entries, remat)
    return work + max(recompute, 0)


def forward_transient(cfg: ModelConfig, rows: int, length: int, keys: int | None = None) -> int:
    """Peak bytes of a forward pass without gradient (score, prefill) over rows x length tokens attending to
    `keys` slots (default length): the widest layer's live set plus the model-level arrays."""
    d, m, h, k, hd, b = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         _b(cfg))
    keys = length if keys is None else keys
    tokens = rows * length
    live = tokens * b * (2 * d + 2 * (h + 2 * k) * hd + h * hd)
    if cfg.attention != "dense":  # log-sum-exp per query, one tile's scores / probabilities and accumulator
        attn = tokens * _F32 * h + _tile(cfg, rows, length, keys) * 3 * _F32
    else:
        attn = rows * h * length * keys * (2 * _F32 + b)
    mlp = tokens * b * 3 * m
    return live + max(attn, mlp) + _model_level(cfg, rows, length, keys)


def _model_level(cfg: ModelConfig, rows: int, length: int, keys: int) -> int:
    """Embeddings, residual stream, final norm, rope tables and (dense) the boolean mask [rows, T, S]."""
    tokens = rows * length
    mask = rows * length * keys if cfg.attention == "dense" else 0
    return tokens * (3 * cfg.hidden_size * _b(cfg) + cfg.head_dim * _F32) + mask


def loss_buffers(student: ModelConfig, teacher_hidden: int, rows: int, response: int, loss: LossConfig) -> int:
    """The fused loss (losses._fused_terms) on rows x response positions: per chunk two f32 [chunk, vocab tile]
    logits (student, teacher; XLA:CPU measures 1.5 at chunk 1024), the f32 [d, V] head gradient it sums
    into, and the chunked copies of both hidden states and of the hidden gradient."""
    width = student.vocab_size if loss.vocab_chunk is None else min(loss.vocab_chunk, student.vocab_size)
    positions = rows * response
    chunk = min(loss.chunk_size, positions)
    b = _b(student)
    logits = (2 if loss.kind == "full_vocab" else 1) * chunk * width * _F32 + chunk * width * b
    head_grad = student.hidden_size * student.vocab_size * _F32
    if loss.name == "reverse_kl_topk":  # gathers student head columns from a float32 copy of the head
        head_grad *= 2
    hidden = positions * b * (2 * student.hidden_size + teacher_hidden)
    return logits + head_grad + hidden


def full_logits_bytes(vocab: int, rows: int, response: int) -> int:
    """One unfused f32 [rows, R, V] logits array (an unfused loss holds several: both models' logits and
    their log-softmax)."""
    return rows * response * vocab * _F32


@dataclasses.dataclass(frozen=True)
class UpdateBreakdown:
    """One device's transient bytes of the update step for one micro-batch (on top of its arguments)."""

    saved: int  # all layers' saved activations
    layer_backward: int  # one layer's backward working set
    model_level: int
    loss: int  # fused loss working set (chunk buffers, head gradient, hidden chunks)
    gradients: int  # the accumulator carried across micro-batches + this micro-batch's gradient
    optimizer: int  # AdamW's temporaries after the micro-batch scan
    gathered: int  # FSDP / tensor all-gathers: two layers' weights and the student and teacher heads

    @property
    def activations(self) -> int:
        """Peak of the backward pass: saved activations, gradients, then the larger of the loss's working set
        (the loss runs after the forward pass) and one layer's backward."""
        return self.saved + self.model_level + self.gradients + self.gathered + max(self.loss, self.layer_backward)

    @property
    def total(self) -> int:
        return max(self.activations, self.gradients + self.optimizer)


def update_activations(student: ModelConfig, *, rows: int, context: int, response: int, loss: LossConfig,
                       teacher_hidden: int, params_bytes: int, remat: str = "none",
                       gathered: int = 0) -> UpdateBreakdown:
    """Analytical transient memory of steps.update for one micro-batch of `rows` rows on one device, each
    context + response tokens; `params_bytes`: the student's parameters per device."""
    length = context + response
    tokens, entries = rows * length, rows * student.num_heads * length * length
    return UpdateBreakdown(
        saved=student.num_layers * layer_saved(student, tokens, entries, remat),
        layer_backward=layer_backward(student, tokens, entries, remat, _tile(student, rows, length, length)),
        model_level=_model_level(student, rows, length, length),
        loss=loss_buffers(student, teacher_hidden, rows, response, loss),
        gradients=2 * params_bytes,
        # clipping scales, adam's new moments and the update before they alias into the donated state
        optimizer=2 * params_bytes,
        gathered=gathered)


def kv_cache_bytes(cfg: ModelConfig, rows: int, length: int, *, kv_shards: int = 1) -> int:
    """init_cache: per layer k and v [rows, kv_heads, length, head_dim] in the compute dtype."""
    heads = cfg.num_kv_heads // kv_shards if cfg.num_kv_heads % kv_shards == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * rows * heads * length * cfg.head_dim * _b(cfg)


def decode_transient(cfg: ModelConfig, rows: int, lm_head_per_device: int) -> int:
    """Per decode step: f32 logits and select_tokens' vocabulary-wide temporaries (tempered logits, weights,
    ordered keys, filter masks: about six [rows, V] buffers), plus the lm_head the loop carries."""
    return 6 * rows * cfg.vocab_size * _F32 + lm_head_per_device
