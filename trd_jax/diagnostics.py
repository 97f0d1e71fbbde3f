"""Prefix-failure diagnostics (TRD_SPEC §2): how the teacher's next-token distribution behaves along a
trajectory, measured without materialising f32[B, R, V].

Per response token (device, chunked over positions):
- entropy H(q_t) of the teacher: grows where the prefix has gone wrong and the teacher hesitates
  between continuing and repairing;
- top-2 mass gap q_(1) - q_(2): small when the teacher is bimodal;
- argmax mismatch: the teacher's most likely token is not the trajectory's token;
- teacher NLL -log q(y_t): compare on y_o and on y_r (a refined trajectory should be likelier).

Host summaries: means over valid tokens, a profile along the relative position, and the sign-flip
rate of per-token advantages log q - log p (fragmented gradients flip sign often). The plain flip rate
sits near 0.5 on any trajectory: near-certain tokens have advantages ~0 whose sign is noise. Two variants
discount them: flips weighted by the smaller |advantage| of the pair, and flips between successive tokens
where the teacher is uncertain (entropy above a threshold), the near-certain ones between them skipped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trd_jax.losses import position_chunks, unchunk
from trd_jax.token_selection import first_argmax

Array = jax.Array


class TokenStats(NamedTuple):
    entropy: Array  # f32[B, R]
    top2_gap: Array  # f32[B, R]
    argmax_mismatch: Array  # f32[B, R], 0 or 1
    nll: Array  # f32[B, R]


def _chunk_stats(h: Array, head: Array, tok: Array, temperature: float) -> tuple[Array, ...]:
    """h [C, d], tok [C] -> four f32[C]; top-2 from two max passes (XLA CPU's top_k is slow)."""
    z = jnp.einsum("cd,dv->cv", h, head, preferred_element_type=jnp.float32) / temperature
    logq = jax.nn.log_softmax(z, axis=-1)
    q = jnp.exp(logq)
    entropy = -jnp.sum(q * logq, axis=-1)
    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
    first = first_argmax(z)
    q1 = jnp.take_along_axis(q, first[:, None], axis=-1)[:, 0]
    q2 = jnp.max(jnp.where(iota == first[:, None], -1.0, q), axis=-1)
    nll = -jnp.take_along_axis(logq, tok[:, None], axis=-1)[:, 0]
    return entropy, q1 - q2, (first != tok).astype(jnp.float32), nll


def teacher_token_stats(hidden: Array, head: Array, targets: Array, mask: Array, *, chunk_size: int = 512,
                        temperature: float = 1.0) -> TokenStats:
    """hidden [B, R, d] (teacher states predicting each response token), head [d, V], targets i32[B, R],
    mask bool[B, R] -> TokenStats of f32[B, R], 0 where ~mask. Positions are processed chunk_size at a
    time so that only [chunk_size, V] logits exist at once."""
    chunks = (position_chunks(hidden, mask, chunk_size), position_chunks(targets, mask, chunk_size))
    stats = jax.lax.map(lambda xs: _chunk_stats(xs[0], head, xs[1], temperature), chunks)
    return TokenStats(*(jnp.where(mask, unchunk(s, mask.shape), 0.0) for s in stats))


# ------------------------------------------------------------------------------------------------
# Host summaries (numpy)


def masked_mean(values, mask) -> float:
    values, mask = np.asarray(values, np.float64), np.asarray(mask, bool)
    return float(values[mask].mean()) if mask.any() else 0.0


def position_profile(values, mask, bins: int = 10) -> list[float]:
    """Mean of values over valid tokens in each of `bins` equal slices of each row's relative position
    (token t of a row of length L falls in bin floor(bins * t / L)); empty bins are 0."""
    values, mask = np.asarray(values, np.float64), np.asarray(mask, bool)
    lengths = mask.sum(axis=1, keepdims=True)
    pos = np.cumsum(mask, axis=1) - 1
    which = np.floor(bins * pos / np.maximum(lengths, 1)).astype(int)
    out = []
    for k in range(bins):
        sel = mask & (which == k)
        out.append(float(values[sel].mean()) if sel.any() else 0.0)
    return out


def sign_flip_rate(advantages, mask) -> float:
    """Fraction of consecutive valid token pairs (within a row) whose advantages have opposite signs."""
    a, m = np.asarray(advantages, np.float64), np.asarray(mask, bool)
    pairs = m[:, 1:] & m[:, :-1]
    if not pairs.any():
        return 0.0
    flips = np.sign(a[:, 1:]) * np.sign(a[:, :-1]) < 0
    return float(flips[pairs].mean())


def _pairs(advantages, mask):
    """(a_t, a_{t+1}, both valid) over consecutive positions of each row: f64[B, T-1] x 2, bool[B, T-1].
    A pair straddling a masked position (a gap) is not a pair."""
    a, m = np.asarray(advantages, np.float64), np.asarray(mask, bool)
    return a[:, :-1], a[:, 1:], m[:, :-1] & m[:, 1:]


def weighted_sign_flip_rate(advantages, mask) -> float:
    """Sign-flip rate of consecutive valid pairs, each pair weighted by min(|a_t|, |a_{t+1}|):
    sum(w * [flip]) / sum(w) (0 when no pair has weight).

    Why the min: a flip only fragments the gradient when both sides push with some force; a pair where
    either token is near-certain (advantage ~0, sign arbitrary) counts ~nothing. The min is the size of
    the smaller push, so one large advantage cannot make a flip against a ~0 neighbour count."""
    a0, a1, pairs = _pairs(advantages, mask)
    w = np.where(pairs, np.minimum(np.abs(a0), np.abs(a1)), 0.0)
    total = w.sum()
    if total <= 0:
        return 0.0
    return float((w * (np.sign(a0) * np.sign(a1) < 0)).sum() / total)


def decision_sign_flip_rate(advantages, entropy, mask, threshold: float) -> float:
    """Sign-flip rate between successive *uncertain* tokens of a row (valid, teacher entropy > threshold nats),
    the near-certain tokens between them skipped; NaN when no row has two such tokens.

    Why successive rather than adjacent: uncertain tokens are the decision points (which value a step takes)
    and are rarely adjacent; the question is whether the pushes at successive decisions keep one direction or
    alternate, and an adjacent-pairs rate would be empty, not zero, almost everywhere."""
    a = np.asarray(advantages, np.float64)
    keep = np.asarray(mask, bool) & (np.asarray(entropy, np.float64) > threshold)
    flips = pairs = 0
    for row, k in zip(a, keep):
        signs = np.sign(row[k])
        flips += int((signs[1:] * signs[:-1] < 0).sum())
        pairs += max(len(signs) - 1, 0)
    return flips / pairs if pairs else float("nan")


def summarize(stats: TokenStats, mask, *, student_logp=None, teacher_logp=None, prefix: str = "",
              bins: int = 10, entropy_threshold: float = 0.1) -> dict:
    """Scalar metrics for the JSONL log: means, the entropy profile along the position, the fraction of
    valid tokens with teacher entropy > entropy_threshold (uncertain_token_fraction), and with both
    log-prob arrays the sign-flip rates of the advantages log q - log p: all pairs
    (advantage_sign_flip_rate), weighted by min |advantage| (..._weighted) and between successive uncertain
    tokens (..._decisions; NaN when there are none to compare)."""
    mask = np.asarray(mask, bool)
    uncertain = mask & (np.asarray(stats.entropy, np.float64) > entropy_threshold)
    out = {f"{prefix}teacher_entropy": masked_mean(stats.entropy, mask),
           f"{prefix}teacher_top2_gap": masked_mean(stats.top2_gap, mask),
           f"{prefix}teacher_argmax_mismatch": masked_mean(stats.argmax_mismatch, mask),
           f"{prefix}teacher_nll": masked_mean(stats.nll, mask),
           f"{prefix}uncertain_token_fraction": float(uncertain.sum() / mask.sum()) if mask.any() else 0.0}
    for k, v in enumerate(position_profile(stats.entropy, mask, bins)):
        out[f"{prefix}teacher_entropy_pos{k}"] = v
    if student_logp is not None and teacher_logp is not None:
        adv = np.asarray(teacher_logp, np.float64) - np.asarray(student_logp, np.float64)
        out[f"{prefix}advantage_sign_flip_rate"] = sign_flip_rate(adv, mask)
        out[f"{prefix}advantage_sign_flip_rate_weighted"] = weighted_sign_flip_rate(adv, mask)
        out[f"{prefix}advantage_sign_flip_rate_decisions"] = decision_sign_flip_rate(adv, stats.entropy, mask,
                                                                                     entropy_threshold)
    return out
