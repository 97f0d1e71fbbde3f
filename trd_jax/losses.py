"""Per-token distillation losses (TRD_SPEC.md §3-4): full-vocabulary divergences, sampled-token
estimators, aggregation, and a fused path that never materialises f32[B, T, V].

Notation at one position: p = softmax(z_student / τ), q = softmax(z_teacher / τ), τ the temperature
(applied to both). Divergences are named by direction, never by a bare beta:

    forward_kl = KL(q || p) = Σ_v q (log q - log p)   mass-covering; TRD's loss on y_r
    reverse_kl = KL(p || q) = Σ_v p (log p - log q)   mode-seeking; the OPD objective

Conventions
- Every per-token function returns f32 values of one position each (f32[B, T] for [B, T, V] logits)
  BEFORE masking; `aggregate` reduces them. Math is float32 whatever the input dtype.
- The teacher is a constant: every function wraps its teacher inputs in stop_gradient.
- Masked positions. `aggregate` selects with `where`, so NaN/inf in `values` at masked positions never
  reach the loss or the gradient of `values`. That is not enough when the *inputs* are non-finite there
  (an all -inf row, or q = 0 where p > 0): the backward pass of the divergence itself then computes
  0 * inf = NaN for that row, which a matmul would spread to the whole lm_head gradient. Every per-token
  function therefore also takes `mask=`: it replaces the inputs at masked positions by zeros with
  `where` (whose transpose drops anything that comes back), so those rows have value 0 and exactly
  zero, finite gradients.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from functools import partial
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_sg = jax.lax.stop_gradient
_F32 = jnp.float32


# ----------------------------------------------------------------------------------- small helpers

def _masked(x: Array, mask: Array | None) -> Array:
    """x [B, T, ...] with the positions where mask bool[B, T] is False replaced by zeros."""
    if mask is None:
        return x
    mask = jnp.asarray(mask, bool)
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x, jnp.zeros((), x.dtype))


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_pair(student: Array, teacher: Array) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits {student.shape} and teacher_logits {teacher.shape} differ in shape: "
                         "full-vocabulary losses need the same positions and the same token->id map")


def _log_probs(logits: Array, temperature) -> Array:
    """f32[..., V] log softmax(logits / temperature)."""
    return jax.nn.log_softmax(logits.astype(_F32) / temperature, axis=-1)


def _weighted_log_ratio(log_w: Array, log_other: Array) -> Array:
    """w (log w - log other) per entry, w = exp(log_w), and 0 where w == 0 (0 log 0 = 0).

    The `where` sits on the log-ratio, not on the product: the unselected branch then receives a zero
    cotangent and nothing multiplies a -inf, so -inf logits give zero gradients instead of NaN."""
    w = jnp.exp(log_w)
    return w * jnp.where(w > 0, log_w - log_other, 0.0)


# ---------------------------------------------- full-vocabulary divergences: per-vocab-entry terms

# Each divergence is Σ_v terms(log p, log q)[v], optionally followed by a per-token `finish`. The same
# (terms, finish) pair serves the plain functions and the vocabulary-tiled fused path, which only needs
# the two log-normalisers first.

def _forward_terms(logp: Array, logq: Array) -> Array:
    return _weighted_log_ratio(logq, logp)


def _reverse_terms(logp: Array, logq: Array) -> Array:
    return _weighted_log_ratio(logp, logq)


def _jsd_terms(logp: Array, logq: Array, *, beta: float) -> Array:
    # The ends are special: the mixture formula is identically 0 at beta = 0 and 1 (M = p or M = q).
    if beta == 0.0:
        return _forward_terms(logp, logq)
    if beta == 1.0:
        return _reverse_terms(logp, logq)
    # M = beta q + (1 - beta) p. Where p = q = 0 (both -inf, e.g. vocabulary padding) logaddexp's gradient
    # is NaN even under a zero cotangent, so those entries go through it as 0 and come out as -inf.
    both_zero = (logp == -jnp.inf) & (logq == -jnp.inf)
    log_m = jnp.logaddexp(jnp.where(both_zero, 0.0, logq) + math.log(beta),
                          jnp.where(both_zero, 0.0, logp) + math.log1p(-beta))
    log_m = jnp.where(both_zero, -jnp.inf, log_m)
    return beta * _weighted_log_ratio(logq, log_m) + (1.0 - beta) * _weighted_log_ratio(logp, log_m)


def _clip_above(values: Array, *, clip: float) -> Array:
    # A constant on clipped tokens (not jnp.minimum, whose tie-breaking splits the gradient): zero gradient.
    return jnp.where(values >= clip, jnp.asarray(clip, _F32), values)


def _check_beta(beta) -> float:
    try:
        beta = float(beta)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError("jsd: beta must be a Python number (it selects the formula at 0 and 1)") from None
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    return beta


_Plan = tuple[Callable[[Array, Array], Array], Callable[[Array], Array] | None]


def _vocab_plan(name: str, params: dict) -> _Plan:
    """(terms, finish) of a full-vocabulary divergence other than reverse_kl_topk."""
    if name == "forward_kl":
        return _forward_terms, None
    if name == "reverse_kl":
        return _reverse_terms, None
    if name == "jsd":
        return partial(_jsd_terms, beta=_check_beta(params["beta"])), None
    if name == "forward_kl_clipped":
        return _forward_terms, partial(_clip_above, clip=params["clip"])
    raise ValueError(f"no vocabulary plan for {name!r}")


def _full_vocab(student_logits, teacher_logits, temperature, mask, plan: _Plan) -> Array:
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    terms, finish = plan
    logp = _log_probs(_masked(student_logits, mask), temperature)
    logq = _log_probs(_sg(_masked(teacher_logits, mask)), temperature)
    values = jnp.sum(terms(logp, logq), axis=-1)
    return values if finish is None else finish(values)


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
               mask: Array | None = None) -> Array:
    """KL(teacher || student) = Σ_v q (log q - log p) per position: TRD's loss on y_r (TRD_SPEC §3a).

    student_logits, teacher_logits: [B, T, V] (any float dtype; any leading shape) -> f32[B, T].
    Gradient wrt the student logits: (p - q) / temperature. Entries with q = 0 contribute 0; p = 0 where
    q > 0 gives +inf (a genuine support mismatch)."""
    return _full_vocab(student_logits, teacher_logits, temperature, mask, _vocab_plan("forward_kl", {}))


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
               mask: Array | None = None) -> Array:
    """KL(student || teacher) = Σ_v p (log p - log q) per position, gradient through p in both factors
    (TRD_SPEC §4.3). [B, T, V] x2 -> f32[B, T]. Entries with p = 0 contribute 0."""
    return _full_vocab(student_logits, teacher_logits, temperature, mask, _vocab_plan("reverse_kl", {}))


def jsd(student_logits: Array, teacher_logits: Array, *, beta: float, temperature: float = 1.0,
        mask: Array | None = None) -> Array:
    """Generalized Jensen-Shannon divergence (OPSD, TRD_SPEC §4.7). [B, T, V] x2 -> f32[B, T].

        M = beta q + (1 - beta) p          (in log space: logaddexp)
        JSD_beta = beta KL(q || M) + (1 - beta) KL(p || M)

    beta = 0 is EXACTLY forward_kl = KL(q || p) and beta = 1 EXACTLY reverse_kl = KL(p || q): the mixture
    formula degenerates to 0 at both ends, so they are special-cased (beta must be a Python number).
    beta = 0.5 is the symmetric JSD. This is TRL's GKD convention (beta weights the teacher in M). EasyDeL's
    beta is reported to run the other way (its 0 would be our 1): check before porting a config from there."""
    return _full_vocab(student_logits, teacher_logits, temperature, mask, _vocab_plan("jsd", {"beta": beta}))


def forward_kl_clipped(student_logits: Array, teacher_logits: Array, *, clip: float = 0.1,
                       temperature: float = 1.0, mask: Array | None = None) -> Array:
    """min(KL(q || p), clip) per position (TRD_SPEC §4.5): tokens with KL >= clip contribute the constant
    `clip` and zero gradient. [B, T, V] x2 -> f32[B, T]."""
    plan = _vocab_plan("forward_kl_clipped", {"clip": clip})
    return _full_vocab(student_logits, teacher_logits, temperature, mask, plan)


def _topk_reverse_kl(student_top: Array, teacher_top: Array, temperature) -> Array:
    """Σ_{v in S} p̂ (log p̂ - log q̂) from the logits on S: [..., k] x2 -> f32[...]."""
    # A teacher -inf inside its own top-k (fewer than k allowed tokens) is not part of the support: the
    # student gets -inf there too, else p̂ > 0 = q̂ would make the loss infinite.
    student_top = jnp.where(teacher_top > -jnp.inf, student_top, -jnp.inf)
    return jnp.sum(_reverse_terms(_log_probs(student_top, temperature), _log_probs(teacher_top, temperature)), -1)


def reverse_kl_topk(student_logits: Array, teacher_logits: Array, *, k: int = 32, temperature: float = 1.0,
                    mask: Array | None = None) -> Array:
    """Reverse KL on the teacher's top-k support, both sides renormalised on it (TRD_SPEC §4.6):
    S = top-k(teacher logits), p̂ = softmax(z_s[S] / τ), q̂ = softmax(z_t[S] / τ),
    value Σ_{v in S} p̂ (log p̂ - log q̂).
    [B, T, V] x2 -> f32[B, T]. The gradient reaches only the k student logits on S; ties in the teacher's
    logits resolve to the lower token id (lax.top_k)."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    if not 0 < k <= student_logits.shape[-1]:
        raise ValueError(f"reverse_kl_topk: k={k} must be in [1, vocab={student_logits.shape[-1]}]")
    teacher = _sg(_masked(teacher_logits, mask)).astype(_F32)
    teacher_top, support = jax.lax.top_k(teacher, k)
    student_top = jnp.take_along_axis(_masked(student_logits, mask).astype(_F32), support, axis=-1)
    return _topk_reverse_kl(student_top, teacher_top, temperature)


def _bind(name: str, params: dict) -> dict:
    """The divergence's complete keyword parameters (defaults filled in, `mask` excluded), or a ValueError
    naming the unknown divergence or the unknown / missing parameters."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of {sorted(DIVERGENCES)}")
    sig = inspect.signature(DIVERGENCES[name]).parameters
    accepted = [p for p, s in sig.items() if s.kind is s.KEYWORD_ONLY and p != "mask"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"divergence {name!r} got unknown parameter(s) {unknown}; it accepts {accepted}")
    missing = [p for p in accepted if sig[p].default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"divergence {name!r} needs parameter(s) {missing}")
    return {p: params.get(p, sig[p].default) for p in accepted}


def divergence(name: str, student_logits: Array, teacher_logits: Array, *, mask: Array | None = None,
               **params) -> Array:
    """DIVERGENCES[name](student_logits, teacher_logits, **params): [B, T, V] x2 -> f32[B, T]."""
    params = _bind(name, params)  # before the lookup: a clear error for an unknown name
    return DIVERGENCES[name](student_logits, teacher_logits, mask=mask, **params)


# --------------------------------------------------------------------------- sampled-token estimators

def token_logprobs(logits: Array, tokens: Array, *, temperature: float = 1.0, mask: Array | None = None) -> Array:
    """log softmax(logits / temperature) at the given ids: logits [B, T, V], tokens int[B, T] -> f32[B, T]."""
    _check_temperature(temperature)
    z = _masked(logits, mask).astype(_F32) / temperature
    tokens = _masked(tokens, mask)  # padding ids may be out of range
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def k1_policy_gradient(student_logp: Array, teacher_logp: Array, *, old_logp: Array | None = None,
                       clip_eps: float = 0.2, dual_clip: float | None = 3.0, clamp: float = 10.0,
                       mask: Array | None = None) -> Array:
    """Reverse KL through the sampled-token k1 estimator in policy-gradient form (TRD_SPEC §4.1).

    student_logp f32[B, T] (carries the gradient), teacher_logp f32[B, T], old_logp f32[B, T] | None
    (log-prob of the token under the policy that sampled it) -> f32[B, T] surrogate values.

        k1 = clip(log π_b(y) - log q(y), -clamp, clamp),   A = -sg(k1)
        old_logp None:  L = -A log p(y)                                 (OPSD's "tinker" loss)
        old_logp given: ρ = exp(log p(y) - old_logp)
                        L = max(-A ρ, -A clip(ρ, 1 - eps, 1 + eps)), then min(L, -A dual_clip) where A < 0

    π_b, the policy in the advantage, is old_logp when given and the (detached) student otherwise: the
    advantage is the per-token reward of the trajectory as it was sampled, computed once at rollout time
    and fixed across PPO epochs over the batch like any PPO advantage; the ratio alone corrects for the
    student having moved since. On the first epoch old_logp == student_logp and both forms have the same
    gradient.

    Direction: with y ~ p, E[∇L] = Σ_y p(y)(log p(y) - log q(y)) ∇log p(y) = ∇ KL(p || q), the reverse-KL
    gradient. The *values* are surrogates, not KL estimates (report k1 itself as the metric). k1 used
    directly as a loss has ZERO expected gradient (E_p[∇log p] = 0): the estimator needs this PG form.
    dual_clip None disables the dual clip; the log-ratio is clamped to ±20 before exp (stale tokens must
    not overflow; the surrogate is clipped flat there anyway)."""
    student_logp = _masked(student_logp, mask).astype(_F32)
    teacher_logp = _sg(_masked(teacher_logp, mask)).astype(_F32)
    behaviour = student_logp if old_logp is None else _masked(old_logp, mask).astype(_F32)
    advantage = -_sg(jnp.clip(behaviour - teacher_logp, -clamp, clamp))
    if old_logp is None:
        return -advantage * student_logp
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"k1_policy_gradient: dual_clip must be > 1 (or None), got {dual_clip}")
    ratio = jnp.exp(jnp.clip(student_logp - _sg(behaviour), -20.0, 20.0))
    clipped = jnp.maximum(-advantage * ratio, -advantage * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))
    if dual_clip is None:
        return clipped
    return jnp.where(advantage < 0, jnp.minimum(clipped, -advantage * dual_clip), clipped)


def k3(student_logp: Array, teacher_logp: Array, *, clamp: float = 20.0, mask: Array | None = None) -> Array:
    """k3 estimator, r = min(log q(y) - log p(y), clamp) (clamped BEFORE both terms), k3 = e^r - 1 - r.

    student_logp, teacher_logp: f32[B, T] -> f32[B, T]. As a reward with y ~ p its expectation is
    KL(p || q). As a DIRECT loss (this function differentiated as is) its expected gradient is
    E_p[-(q/p - 1) ∇log p] = -Σ_v q ∇log p, i.e. on logits p - q: the FORWARD-KL gradient, not the
    reverse one (TRD_SPEC §4.2). Clamped tokens (r > clamp) get zero gradient."""
    student_logp = _masked(student_logp, mask).astype(_F32)
    teacher_logp = _sg(_masked(teacher_logp, mask)).astype(_F32)
    r = teacher_logp - student_logp
    r = jnp.where(r > clamp, jnp.asarray(clamp, _F32), r)
    return jnp.exp(r) - 1.0 - r


# ------------------------------------------------------------------------------------- aggregation

def aggregate(values: Array, mask: Array, mode: str = "token_mean", *, num_tokens=None, num_rows=None) -> Array:
    """values f32[B, T], mask bool[B, T] -> f32[] loss.

    token_mean: Σ values[mask] / max(count, 1), count = num_tokens if given else Σ mask. Pass the token
                count of a whole gradient-accumulation step as num_tokens and the micro-batch losses sum
                to the step's global token mean (not a mean of means).
    seq_mean:   mean over rows with >= 1 token of each row's token mean; the divisor is num_rows if given
                (the step's count of non-empty rows, for the same micro-batch reason) else this batch's.
    sum:        Σ values[mask].
    Each mode reads only its own count, so a caller may always pass both. Masked values are selected
    away with `where` (never multiplied), so NaN/inf there reach neither the loss nor the gradient; an
    all-False mask gives exactly 0 and zero gradients."""
    if values.shape != mask.shape:
        raise ValueError(f"aggregate: values {values.shape} and mask {mask.shape} differ in shape")
    mask = jnp.asarray(mask, bool)
    masked = jnp.where(mask, values.astype(_F32), 0.0)
    if mode == "token_mean":
        count = jnp.sum(mask) if num_tokens is None else num_tokens
        return jnp.sum(masked) / jnp.maximum(count, 1).astype(_F32)
    if mode == "seq_mean":
        per_row = jnp.sum(mask, axis=-1)
        row_means = jnp.sum(masked, axis=-1) / jnp.maximum(per_row, 1).astype(_F32)  # 0 for empty rows
        rows = jnp.sum(per_row > 0) if num_rows is None else num_rows
        return jnp.sum(row_means) / jnp.maximum(rows, 1).astype(_F32)
    if mode == "sum":
        return jnp.sum(masked)
    raise ValueError(f"aggregate: unknown mode {mode!r}; expected 'token_mean', 'seq_mean' or 'sum'")


# ------------------------------------------------------------ fused path: hidden states and lm_head
#
# Logits are hidden @ head in the operands' common dtype with a float32 result (Transformer.logits).
# Positions are flattened and processed chunk_size at a time; the vocabulary optionally vocab_chunk
# columns at a time. The full-vocabulary divergences and token log-probs go through one custom VJP:
#
#   forward, per chunk: log-normalisers lse_p, lse_q (a first pass over vocabulary tiles when tiled),
#       then raw = Σ_v terms(log p, log q) and G = Σ_v ∂terms/∂log p. Only these f32[C] vectors are saved.
#   backward, per chunk and tile: recompute the tile's logits, dz = ct (∂terms/∂log p - p G) / τ (the
#       chain rule through log softmax), dh += dz @ W_tileᵀ, dW[:, tile] += hᵀ @ dz.
#
# so no [C, V] array outlives its tile, the head is never copied, and its gradient is summed over chunks
# in one float32 [d, V] buffer (autodiff through a scan would carry it in the head's dtype, i.e. round a
# bf16 sum once per chunk). In low precision dz is cast to the compute dtype for the two backward
# matmuls (float32 accumulation), as the rest of a bf16 model's backward pass does.

def _matmul_f32(hidden: Array, head: Array, dtype) -> Array:
    """hidden [C, d] @ head [d, v] in `dtype` with a float32 result."""
    return jnp.einsum("cd,dv->cv", hidden.astype(dtype), head.astype(dtype), preferred_element_type=_F32)


def _check_fused(hidden: Array, head: Array, temperature, what: str) -> None:
    if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
        raise ValueError(f"{what}: hidden {hidden.shape} must be [B, T, d] and head {head.shape} [d, V]")
    if not isinstance(temperature, (int, float)):  # closed over by the custom VJP: must be static
        raise ValueError(f"{what}: temperature must be a Python number, got {type(temperature).__name__}")
    _check_temperature(temperature)


def position_chunks(x: Array, mask: Array | None, chunk_size: int) -> Array:
    """[B, T, ...] -> [num, C, ...]: masked positions zeroed, B * T flattened and zero-padded to num * C."""
    n = x.shape[0] * x.shape[1]
    c = max(1, min(chunk_size, n))
    num = -(-n // c)
    x = _masked(x, mask).reshape(n, *x.shape[2:])
    return jnp.pad(x, [(0, num * c - n)] + [(0, 0)] * (x.ndim - 1)).reshape(num, c, *x.shape[1:])


def unchunk(values: Array, shape: tuple[int, int]) -> Array:
    """[num, C] -> [B, T]: the inverse of position_chunks for per-position values."""
    return values.reshape(-1)[:shape[0] * shape[1]].reshape(shape)


def _vocab_tiling(vocab: int, vocab_chunk: int | None) -> tuple[int, np.ndarray, np.ndarray]:
    """(width, starts, firsts) of the vocabulary tiles. Every tile is `width` columns wide, so the last one
    slides left to stay in bounds (no padded copy of the head); it owns only the columns >= its `first`,
    the others are given logit -inf (probability 0, zero gradient)."""
    width = vocab if vocab_chunk is None else max(1, min(vocab_chunk, vocab))
    firsts = np.arange(-(-vocab // width)) * width
    return width, np.minimum(firsts, vocab - width), firsts


def _columns(head: Array, start, width: int) -> Array:
    if isinstance(start, (int, np.integer)):
        return head[:, start:start + width]  # static: the whole head when untiled
    return jax.lax.dynamic_slice_in_dim(head, start, width, axis=1)


def _fused_terms(terms, hidden: Array, head: Array, target: tuple, *, kind: str, temperature: float,
                 chunk_size: int, vocab_chunk: int | None, mask: Array | None) -> Array:
    """f32[B, T]: Σ_v terms(log p, log q) with p = softmax(hidden @ head / τ), hidden [B, T, d], head [d, V], and

        kind "teacher": target = (teacher_hidden [B, T, d'], teacher_head [d', V]), q = their softmax / τ
        kind "tokens":  target = (tokens int[B, T],), q = one-hot of the token (Σ_v q log p = log p(token))

    Gradients reach hidden and head only (custom VJP, see above)."""
    shape = hidden.shape[:2]
    vocab = head.shape[1]
    width, starts, firsts = _vocab_tiling(vocab, vocab_chunk)
    tiled = len(starts) > 1
    dtype = jnp.promote_types(hidden.dtype, head.dtype)
    t_dtype = jnp.promote_types(target[0].dtype, target[1].dtype) if kind == "teacher" else None

    def at(i):
        """(start, first) of tile i: Python ints when untiled (plain slices), traced in the tile loops."""
        if isinstance(i, int):
            return int(starts[i]), int(firsts[i])
        return jnp.asarray(starts)[i], jnp.asarray(firsts)[i]

    def tile(h, head, tgt, i):
        """Student logits / τ and the target's unnormalised log q on tile i: f32[C, width] each."""
        start, first = at(i)
        cols = start + jnp.arange(width)
        bias = jnp.where(cols >= first, 0.0, -jnp.inf).astype(_F32)
        zs = (_matmul_f32(h, _columns(head, start, width), dtype) + bias) / temperature
        if kind == "teacher":
            ht, head_t = tgt
            zq = (_matmul_f32(ht, _columns(head_t, start, width), t_dtype) + bias) / temperature
        else:
            (tok,) = tgt
            zq = jnp.where((cols == tok[:, None]) & (cols >= first), 0.0, -jnp.inf).astype(_F32)
        return zs, zq

    def term_grads(logp, logq):
        """terms and ∂terms/∂log p, both [C, width] (terms is elementwise)."""
        t, vjp = jax.vjp(lambda lp: terms(lp, logq), logp)
        return t, vjp(jnp.ones_like(t))[0]

    def chunk_forward(h, head, tgt):
        """-> raw f32[C] and the saved statistics (lse_p, lse_q, G), f32[C] each."""
        def sums(zs, zq, lse_p, lse_q):
            t, g = term_grads(zs - lse_p[:, None], zq - lse_q[:, None])
            return jnp.sum(t, -1), jnp.sum(g, -1)

        if not tiled:
            zs, zq = tile(h, head, tgt, 0)
            lse_p, lse_q = jax.nn.logsumexp(zs, -1), jax.nn.logsumexp(zq, -1)
            raw, g_sum = sums(zs, zq, lse_p, lse_q)
        else:
            def lse(i):
                return tuple(jax.nn.logsumexp(z, -1) for z in tile(h, head, tgt, i))
            lse_p, lse_q = (jax.nn.logsumexp(x, 0) for x in jax.lax.map(lse, jnp.arange(len(starts))))
            raw, g_sum = (jnp.sum(x, 0) for x in jax.lax.map(lambda i: sums(*tile(h, head, tgt, i), lse_p, lse_q),
                                                              jnp.arange(len(starts))))
        return raw, (lse_p, lse_q, g_sum)

    def chunk_backward(acc, h, head, tgt, stats, ct):
        """Adds this chunk's head gradient to acc f32[d, V]; returns (acc, d hidden [C, d])."""
        lse_p, lse_q, g_sum = stats

        def tile_grads(i, acc, dh):
            zs, zq = tile(h, head, tgt, i)
            logp = zs - lse_p[:, None]
            _, g = term_grads(logp, zq - lse_q[:, None])
            dz = (ct[:, None] / temperature) * (g - jnp.exp(logp) * g_sum[:, None])  # 0 on unowned columns
            dz = dz.astype(dtype)
            start = at(i)[0]
            w = _columns(head, start, width)
            dh = dh + jnp.einsum("cv,dv->cd", dz, w.astype(dtype), preferred_element_type=_F32)
            dw = jnp.einsum("cd,cv->dv", h.astype(dtype), dz, preferred_element_type=_F32)
            if isinstance(i, int):
                return acc + dw, dh
            return jax.lax.dynamic_update_slice_in_dim(acc, _columns(acc, start, width) + dw, start, axis=1), dh

        dh = jnp.zeros(h.shape, _F32)
        if not tiled:
            acc, dh = tile_grads(0, acc, dh)
        else:
            acc, dh = jax.lax.fori_loop(0, len(starts), lambda i, c: tile_grads(i, *c), (acc, dh))
        return acc, dh.astype(h.dtype)

    @jax.custom_vjp
    def run(h_chunks, head, tgt_chunks, tgt_shared):
        return fwd(h_chunks, head, tgt_chunks, tgt_shared)[0]

    def fwd(h_chunks, head, tgt_chunks, tgt_shared):
        raw, stats = jax.lax.map(lambda xs: chunk_forward(xs[0], head, (*xs[1], *tgt_shared)), (h_chunks, tgt_chunks))
        return raw, (h_chunks, head, tgt_chunks, tgt_shared, stats)

    def bwd(res, ct):
        h_chunks, head, tgt_chunks, tgt_shared, stats = res

        def step(acc, xs):
            h, tc, st, c = xs
            return chunk_backward(acc, h, head, (*tc, *tgt_shared), st, c)

        acc, dh = jax.lax.scan(step, jnp.zeros(head.shape, _F32), (h_chunks, tgt_chunks, stats, ct))
        return dh, acc.astype(head.dtype), None, None  # the target is a constant

    run.defvjp(fwd, bwd)
    if kind == "teacher":
        tgt_chunks, tgt_shared = (position_chunks(_sg(target[0]), mask, chunk_size),), (_sg(target[1]),)
    else:
        tgt_chunks, tgt_shared = (position_chunks(target[0].astype(jnp.int32), mask, chunk_size),), ()
    raw = run(position_chunks(hidden, mask, chunk_size), head, tgt_chunks, tgt_shared)
    return unchunk(raw, shape)


def fused_divergence(name: str, student_hidden: Array, student_head: Array, teacher_hidden: Array,
                     teacher_head: Array, *, chunk_size: int = 512, vocab_chunk: int | None = None,
                     mask: Array | None = None, **params) -> Array:
    """divergence(name, student_hidden @ student_head, teacher_hidden @ teacher_head, **params) without
    ever holding f32[B, T, V] (same values and gradients up to float rounding).

    student_hidden [B, T, d] (f32 or bf16), student_head [d, V], teacher_hidden [B, T, d'],
    teacher_head [d', V] -> f32[B, T]. temperature must be a Python number here.

    Positions go chunk_size at a time (lax.map / scan: compile time does not grow with T); the backward
    pass recomputes a chunk's logits rather than storing them, so the peak is O(chunk_size * V) plus one
    f32 [d, V] gradient buffer. With vocab_chunk, no array is wider than vocab_chunk either: the four
    full-vocabulary divergences take two passes over vocabulary tiles (log-normalisers, then terms),
    reverse_kl_topk keeps the teacher's top-k of each tile and takes the top-k of their union.
    reverse_kl_topk never forms the student's full logits (it gathers the k head columns of S); it uses
    plain autodiff under jax.checkpoint, its head gradient summed in float32 (a float32 copy of the head).
    The teacher inputs get no gradient. mask: see the module docstring.
    """
    params = _bind(name, params)
    temperature = params.pop("temperature")
    _check_fused(student_hidden, student_head, temperature, "fused_divergence student")
    _check_fused(teacher_hidden, teacher_head, temperature, "fused_divergence teacher")
    if student_head.shape[1] != teacher_head.shape[1] or student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"fused_divergence: student hidden {student_hidden.shape} / head {student_head.shape} and "
                         f"teacher hidden {teacher_hidden.shape} / head {teacher_head.shape} must share [B, T] and V")
    if name == "reverse_kl_topk":
        return _fused_topk(student_hidden, student_head, teacher_hidden, teacher_head, k=params["k"],
                           temperature=temperature, chunk_size=chunk_size, vocab_chunk=vocab_chunk, mask=mask)
    terms, finish = _vocab_plan(name, params)
    raw = _fused_terms(terms, student_hidden, student_head, (teacher_hidden, teacher_head), kind="teacher",
                       temperature=temperature, chunk_size=chunk_size, vocab_chunk=vocab_chunk, mask=mask)
    return raw if finish is None else finish(raw)


def _fused_topk(student_hidden, student_head, teacher_hidden, teacher_head, *, k, temperature, chunk_size,
                vocab_chunk, mask) -> Array:
    vocab = student_head.shape[1]
    if not 0 < k <= vocab:
        raise ValueError(f"reverse_kl_topk: k={k} must be in [1, vocab={vocab}]")
    s_dtype = jnp.promote_types(student_hidden.dtype, student_head.dtype)
    t_dtype = jnp.promote_types(teacher_hidden.dtype, teacher_head.dtype)
    head_s = student_head.astype(_F32)  # the scan sums a constant's gradient in its dtype: float32
    head_t = _sg(teacher_head)
    width, starts, firsts = _vocab_tiling(vocab, vocab_chunk)

    def chunk(hs, ht):
        if len(starts) == 1:
            teacher_top, support = jax.lax.top_k(_matmul_f32(ht, head_t, t_dtype), k)
        else:  # the top-k of each tile's top-k: the same set as the full top-k
            kt = min(k, width)

            def tile_top(start, first):
                cols = start + jnp.arange(width)
                z = _matmul_f32(ht, _columns(head_t, start, width), t_dtype)
                vals, pos = jax.lax.top_k(jnp.where(cols >= first, z, -jnp.inf), kt)
                return vals, start + pos
            vals, ids = jax.lax.map(lambda a: tile_top(*a), (jnp.asarray(starts), jnp.asarray(firsts)))
            vals = vals.transpose(1, 0, 2).reshape(ht.shape[0], -1)  # [C, tiles * kt]: tile order = id order
            ids = ids.transpose(1, 0, 2).reshape(ht.shape[0], -1)
            teacher_top, pos = jax.lax.top_k(vals, k)
            support = jnp.take_along_axis(ids, pos, axis=-1)
        columns = jnp.take(head_s, support, axis=1)  # [d, C, k]
        student_top = jnp.einsum("cd,dck->ck", hs.astype(s_dtype), columns.astype(s_dtype),
                                 preferred_element_type=_F32)
        return _topk_reverse_kl(student_top, teacher_top, temperature)

    chunks = tuple(position_chunks(x, mask, chunk_size) for x in (student_hidden, _sg(teacher_hidden)))
    values = jax.lax.map(jax.checkpoint(lambda xs: chunk(*xs), prevent_cse=False), chunks)
    return unchunk(values, student_hidden.shape[:2])


def _token_terms(logp: Array, logq: Array) -> Array:
    return jnp.where(logq == 0.0, logp, 0.0)  # logq: log one-hot, so Σ_v = log p(token)


def fused_token_logprobs(hidden: Array, head: Array, tokens: Array, *, chunk_size: int = 512,
                         temperature: float = 1.0, vocab_chunk: int | None = None,
                         mask: Array | None = None) -> Array:
    """token_logprobs(hidden @ head, tokens) chunked like fused_divergence (same custom VJP):
    hidden [B, T, d], head [d, V], tokens int[B, T] -> f32[B, T]."""
    _check_fused(hidden, head, temperature, "fused_token_logprobs")
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"fused_token_logprobs: tokens {tokens.shape} must be [B, T] = {hidden.shape[:2]}")
    return _fused_terms(_token_terms, hidden, head, (tokens,), kind="tokens", temperature=temperature,
                        chunk_size=chunk_size, vocab_chunk=vocab_chunk, mask=mask)


__all__ = [
    "DIVERGENCES", "aggregate", "divergence", "forward_kl", "forward_kl_clipped", "fused_divergence",
    "fused_token_logprobs", "jsd", "k1_policy_gradient", "k3", "reverse_kl", "reverse_kl_topk", "token_logprobs",
]


# ------------------------------------------------------------------------------------ the loss table

@dataclasses.dataclass(frozen=True)
class Loss:
    """One entry of LOSSES. kind: "full_vocab" (a divergence between the two distributions over the whole
    vocabulary, fused with the lm head; the teacher's hidden states and head are its inputs) or
    "sampled_token" (an estimator from the log-probs of the trained token; the teacher's log-prob is its
    input). fields: each keyword parameter of `fn` and the config field (under `loss.`) that sets it;
    unambiguous names, since "beta" alone would not say which distribution it weighs."""

    kind: str
    fn: Callable[..., Array]
    fields: dict[str, str]


# THE table of losses: config.resolve reads the names and fields, steps.update the kinds (via
# per_token_loss), the memory planner the kinds.
LOSSES: dict[str, Loss] = {
    "forward_kl": Loss("full_vocab", forward_kl, {}),
    "reverse_kl": Loss("full_vocab", reverse_kl, {}),
    "jsd": Loss("full_vocab", jsd, {"beta": "jsd_beta"}),
    "forward_kl_clipped": Loss("full_vocab", forward_kl_clipped, {"clip": "kl_clip"}),
    "reverse_kl_topk": Loss("full_vocab", reverse_kl_topk, {"k": "top_k"}),
    "k1_policy_gradient": Loss("sampled_token", k1_policy_gradient,
                               {"clip_eps": "pg_clip_eps", "dual_clip": "pg_dual_clip", "clamp": "pg_clamp"}),
    "k3": Loss("sampled_token", k3, {"clamp": "k3_clamp"}),
}
FULL_VOCAB_LOSSES = tuple(n for n, loss in LOSSES.items() if loss.kind == "full_vocab")
SAMPLED_TOKEN_LOSSES = tuple(n for n, loss in LOSSES.items() if loss.kind == "sampled_token")
DIVERGENCES = {n: LOSSES[n].fn for n in FULL_VOCAB_LOSSES}  # the full-vocabulary view `divergence` dispatches on


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """name: a key of LOSSES. params: the loss's own parameters as (key, value) pairs, e.g. (("beta", 0.5),)
    for jsd or (("clip", 0.1),) for forward_kl_clipped. chunk_size / vocab_chunk: the fused path's tiles."""

    name: str = "forward_kl"
    params: tuple[tuple[str, Any], ...] = ()
    temperature: float = 1.0
    aggregation: str = "token_mean"
    chunk_size: int = 512
    vocab_chunk: int | None = None

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss.name={self.name!r}: expected one of {tuple(LOSSES)}")

    @property
    def kind(self) -> str:
        return LOSSES[self.name].kind


def per_token_loss(cfg: LossConfig, hidden: Array, head: Array, *, targets: Array, mask: Array,
                   teacher_hidden: Array | None = None, teacher_head: Array | None = None,
                   teacher_logp: Array | None = None, old_logp: Array | None = None) -> Array:
    """The per-token values of cfg's loss at the student's response positions: hidden [B, T, d] and head
    [d, V] (the student's), targets int[B, T], mask bool[B, T] -> f32[B, T] (before aggregation).
    Full-vocabulary losses need the teacher's hidden [B, T, d'] and head [d', V]; sampled-token losses its
    log-prob of each target, f32[B, T] (and k1_policy_gradient optionally the behaviour policy's, old_logp)."""
    params = dict(cfg.params)
    if cfg.kind == "full_vocab":
        return fused_divergence(cfg.name, hidden, head, teacher_hidden, teacher_head, chunk_size=cfg.chunk_size,
                                vocab_chunk=cfg.vocab_chunk, temperature=cfg.temperature, mask=mask, **params)
    student_logp = fused_token_logprobs(hidden, head, targets, chunk_size=cfg.chunk_size,
                                        temperature=cfg.temperature, mask=mask)
    if old_logp is not None:
        params["old_logp"] = old_logp
    return LOSSES[cfg.name].fn(student_logp, teacher_logp, mask=mask, **params)
