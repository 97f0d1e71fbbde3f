"""TRD's refine prompts, the baselines' vanilla teacher prompts, and the validation of rewrites.

One TRD step on the host, around the jitted sampler (TRD_SPEC.md §3a-3b):

    prompts = build_refine_prompts(tok, problems, attempts, references, cfg)   # attempts: decoded y_o
    out = sampler(teacher, prompts.generate_ids, cfg.rewrite_budget)           # y_r for the sent rows
    verdicts = validate_rewrites(out, tok.eos_ids, cfg, tokenizer=tok, prompts=prompts)
    chosen = select_trajectories(y_o_ids, out, verdicts)                       # rows, sources, kept

Every row ends in exactly one action (keep y_r, fall back to y_o, drop) and every non-ok row is
counted (`prompts.counts`, `verdicts.counts`), so no row disappears silently. All rewrites are
validated before any training row is built (TRD_SPEC §7.1); nothing here mutates its inputs.

The prompt texts themselves live in prompts.py.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from trd_jax.prompts import (MODES, TASKS, TRUNCATION_NOTICE,
                             refine_prompt_text)
from trd_jax.tokenization import PROMPT_MODES, Tokenizer

PROMPT_POLICIES = ("drop", "error", "truncate", "fallback")
EMPTY_POLICIES = ("error", "drop", "fallback")
CAPPED_POLICIES = ("keep", "drop", "fallback", "error")
ROW_SELECTIONS = ("all", "wrong")
WRONG_REWRITE_POLICIES = ("keep", "fallback", "drop")

@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """How refine prompts are built and budgeted and what happens to rows that fail a check."""

    mode: str = "opd"  # "opd" (separate teacher, no reference) | "opsd" (teacher sees the reference y*)
    task: str = "math"  # "math" (ends with the \boxed{} instruction) | "code" (one ```python block)
    prompt_mode: str = "chat"  # rendering of the refine prompt; chat template by default (TRD_SPEC §7.4)
    # Max refine-prompt tokens after rendering: ~ prompt + response + reserve (TRD_SPEC §7.3).
    # [code-trd]: 18432 for OPD, 22528 for OPSD (the reference adds up to 4096 tokens).
    prompt_budget: int = 18432
    rewrite_budget: int = 16384  # max new tokens of y_r, passed explicitly to the sampler (TRD_SPEC §7.4)
    # Refine prompt over prompt_budget: "drop" the row ([code-trd] filters them, §3a) | "error"
    # ([code-ob], §3b) | "truncate" (tail of y_o, then of y*, §7.3) | "fallback" (train on y_o).
    on_prompt_over_budget: str = "drop"
    # y_r with no tokens but EOS (or only whitespace): "error" (both reference repos, §3a-3b) | "drop" | "fallback".
    on_empty_rewrite: str = "error"
    # y_r that hit rewrite_budget without EOS: "keep" as is ([code-trd], §3a) | "drop" | "fallback" | "error".
    on_capped_rewrite: str = "keep"
    truncation_margin: int = 16  # tokens left free under the budget when truncating ([code-trd], §7.3)
    # Rows sent to the teacher: "all" ([code-trd]: every rollout is refined) | "wrong" (an ablation: only
    # rollouts graded wrong, reward < 0.5; a correct y_o is trained on as is, costs no refine tokens, and is
    # scored in the vanilla context).
    rows: str = "all"
    # A rewrite graded wrong (reward < 0.5): "keep" ([code-trd] has no correctness filter) | "fallback" (the
    # row trains on its y_o) | "drop" (the row). Applied after grading y_r (trajectories.apply_wrong_rewrites).
    on_wrong_rewrite: str = "keep"
    # Speculative refine (speculative.py): each teacher pass verifies the next draft_tokens tokens of the
    # row's own y_o; greedy y_r are plain decoding's token for token, sampled ones equal in distribution.
    speculative: bool = False
    draft_tokens: int = 8
    # Refine-context scoring (distill.teacher_context=refine) takes y_r's teacher states from the refine pass
    # instead of a second forward (score_reuse.py); equal within float rounding. One process only.
    reuse_states: bool = True

    def __post_init__(self):
        choices = {"mode": MODES, "task": TASKS, "prompt_mode": PROMPT_MODES,
                   "on_prompt_over_budget": PROMPT_POLICIES, "on_empty_rewrite": EMPTY_POLICIES,
                   "on_capped_rewrite": CAPPED_POLICIES, "rows": ROW_SELECTIONS,
                   "on_wrong_rewrite": WRONG_REWRITE_POLICIES}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"RefineConfig.{name}={getattr(self, name)!r}: must be one of {', '.join(valid)}")
        for name in ("speculative", "reuse_states"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RefineConfig.{name}={getattr(self, name)!r}: must be a bool")
        for name, low in (("prompt_budget", 1), ("rewrite_budget", 1), ("truncation_margin", 0), ("draft_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"RefineConfig.{name}={value!r}: must be an int >= {low}")


# ------------------------------------------------------------------------------------------------
# Refine prompts with budgets


class RefinePrompts(NamedTuple):
    """Per batch row: ``ids`` the rendered refine prompt (None when the row is not sent to the
    teacher), ``status`` "ok" | "truncated" (sent) | "dropped" | "fallback" (over budget, not sent) |
    "skipped" (not chosen for refinement, e.g. refine.rows="wrong" and y_o graded correct; not rendered),
    and ``full_lengths`` the rendered token count before any truncation (0 for skipped rows)."""

    ids: tuple[list[int] | None, ...]
    status: tuple[str, ...]
    full_lengths: tuple[int, ...]

    @property
    def generate_rows(self) -> tuple[int, ...]:
        """Batch rows sent to the teacher, in order; rewrites come back in this order."""
        return tuple(i for i, ids in enumerate(self.ids) if ids is not None)

    @property
    def generate_ids(self) -> list[list[int]]:
        return [self.ids[i] for i in self.generate_rows]

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(self.status)
        return {s: c[s] for s in ("ok", "truncated", "dropped", "fallback", "skipped")}


def _cut(tok: Tokenizer, ids: list[int], keep: int, text: str) -> str:
    """The text of the first ``keep`` of ``ids`` plus the notice; ``text`` itself when nothing is cut."""
    if keep >= len(ids):
        return text
    head = tok.decode(ids[:keep]).rstrip("\ufffd").rstrip()  # a cut inside a UTF-8 char decodes to U+FFFD
    return f"{head}\n{TRUNCATION_NOTICE}" if head else TRUNCATION_NOTICE


def _truncate(tok: Tokenizer, cfg: RefineConfig, row: int, problem: str, attempt: str,
              reference: str | None, full: list[int]) -> list[int]:
    """Trims the tail of the attempt block, then of the reference block, until the rendered prompt is
    within budget. Re-renders after each cut: tokens do not add up exactly across block boundaries."""
    blocks = [(attempt, tok.encode(attempt))] + ([(reference, tok.encode(reference))] if cfg.mode == "opsd" else [])
    keep = [len(ids) for _, ids in blocks]
    ids = full
    for _ in range(8):
        need = len(ids) - cfg.prompt_budget + cfg.truncation_margin
        for b in range(len(blocks)):
            cut = min(need, keep[b])
            keep[b] -= cut
            need -= cut
        texts = [_cut(tok, ids_, k, text) for (text, ids_), k in zip(blocks, keep)]
        ids = tok.encode_prompt(refine_prompt_text(problem, texts[0], texts[1] if len(texts) > 1 else None,
                                                   mode=cfg.mode, task=cfg.task), cfg.prompt_mode)
        if len(ids) <= cfg.prompt_budget:
            return ids
        if need > 0:  # both blocks are down to the notice: the problem and template alone are too long
            break
    raise ValueError(f"refine prompt row {row}: cannot truncate {len(full)} tokens to prompt_budget "
                     f"{cfg.prompt_budget}; the problem and template alone need {len(ids)} tokens")


def build_refine_prompts(tokenizer: Tokenizer, problems: Sequence[str], attempts: Sequence[str],
                         references: Sequence[str | None] | None, cfg: RefineConfig,
                         send: Sequence[bool] | None = None) -> RefinePrompts:
    """Renders one refine prompt per row (problem x, attempt y_o decoded without special tokens,
    reference y* for OPSD) and applies ``cfg.prompt_budget`` per ``cfg.on_prompt_over_budget``.
    ``send`` (bool per row, default all true): rows marked false are not rendered nor sent (status
    "skipped"); they train on their y_o."""
    n = len(problems)
    if len(attempts) != n:
        raise ValueError(f"attempts: {len(attempts)} rows, expected {n} (one per problem)")
    send = [True] * n if send is None else [bool(v) for v in send]
    if len(send) != n:
        raise ValueError(f"send: {len(send)} rows, expected {n} (one per problem)")
    if references is None:
        references = [None] * n
    elif len(references) != n:
        raise ValueError(f"references: {len(references)} rows, expected {n} (one per problem)")
    ids_out, status, full_lengths = [], [], []
    for i, (x, y_o, ref) in enumerate(zip(problems, attempts, references)):
        if not send[i]:
            ids_out.append(None)
            status.append("skipped")
            full_lengths.append(0)
            continue
        ref = ref if cfg.mode == "opsd" else None  # the reference is privileged: OPSD only
        if cfg.mode == "opsd" and not (ref and ref.strip()):
            raise ValueError(f"references[{i}]: OPSD refine prompts need a reference solution, got {ref!r}")
        ids = tokenizer.encode_prompt(refine_prompt_text(x, y_o, ref, mode=cfg.mode, task=cfg.task), cfg.prompt_mode)
        full_lengths.append(len(ids))
        if len(ids) <= cfg.prompt_budget:
            row_status = "ok"
        elif cfg.on_prompt_over_budget == "error":
            ref_len = len(tokenizer.encode(ref)) if ref is not None else 0
            raise ValueError(f"refine prompt row {i}: {len(ids)} tokens > prompt_budget {cfg.prompt_budget} "
                             f"(problem {len(tokenizer.encode(x))}, initial solution {len(tokenizer.encode(y_o))}, "
                             f"reference {ref_len} tokens); on_prompt_over_budget='error'")
        elif cfg.on_prompt_over_budget == "truncate":
            ids, row_status = _truncate(tokenizer, cfg, i, x, y_o, ref, ids), "truncated"
        else:  # drop | fallback: not sent to the teacher
            ids, row_status = None, "dropped" if cfg.on_prompt_over_budget == "drop" else "fallback"
        ids_out.append(ids)
        status.append(row_status)
    return RefinePrompts(tuple(ids_out), tuple(status), tuple(full_lengths))


# ------------------------------------------------------------------------------------------------
# Rewrite validation and selection


def _as_rows(rows: Any, name: str) -> list[list[int]]:
    """Token rows from a list of id lists, a ``(tokens i32[N, W], lengths i32[N])`` pair, or anything
    with ``.tokens`` and ``.lengths`` (trd_jax.sampling.SampleOutput). Always fresh lists."""
    if hasattr(rows, "tokens") and hasattr(rows, "lengths"):
        rows = (rows.tokens, rows.lengths)
    if isinstance(rows, tuple) and len(rows) == 2 and np.ndim(rows[0]) == 2:
        tokens, lengths = np.asarray(rows[0]), np.asarray(rows[1])
        if lengths.shape != (tokens.shape[0],) or (lengths < 0).any() or (lengths > tokens.shape[1]).any():
            raise ValueError(f"{name}: lengths {lengths.shape} must be one per row of tokens {tokens.shape}, "
                             f"each in [0, {tokens.shape[1]}]")
        return [tokens[i, : int(lengths[i])].tolist() for i in range(tokens.shape[0])]
    return [[int(t) for t in row] for row in rows]


class RewriteVerdicts(NamedTuple):
    """Per batch row: ``reasons`` "ok" | "empty" | "capped" | "prompt_over_budget" (no rewrite was
    generated) | "not_sent" (the row was skipped, see RefinePrompts), ``actions`` "keep" (train on y_r) |
    "fallback" (train on y_o; a not_sent row always) | "drop",
    ``rewrite_index`` the row's index among the rewrites (-1 when none) and ``lengths`` its tokens."""

    reasons: tuple[str, ...]
    actions: tuple[str, ...]
    rewrite_index: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def kept(self) -> np.ndarray:
        """bool[B]: rows that yield a training trajectory (y_r or the y_o fallback)."""
        return np.array([a != "drop" for a in self.actions], bool)

    @property
    def counts(self) -> dict[str, int]:
        """Rows per reason and per action. Under one config each reason maps to one action, so these
        say how many rows were dropped or fell back, and why."""
        r, a = Counter(self.reasons), Counter(self.actions)
        return {**{k: r[k] for k in ("ok", "empty", "capped", "prompt_over_budget", "not_sent")},
                **{k: a[k] for k in ("keep", "fallback", "drop")}}


def validate_rewrites(rewrites: Any, eos_ids: Sequence[int], cfg: RefineConfig, *,
                      tokenizer: Tokenizer | None = None, prompts: RefinePrompts | None = None) -> RewriteVerdicts:
    """Classifies each rewrite y_r (as sampled: ids up to and including the EOS) and picks its action.

    - empty: no token other than EOS (or, with ``tokenizer``, only whitespace once decoded) ->
      ``cfg.on_empty_rewrite``;
    - capped: ``cfg.rewrite_budget`` tokens and no EOS -> ``cfg.on_capped_rewrite``; a row that is
      empty and capped counts as empty.
    A row longer than the budget, one that stops early without EOS (aborted) or has an EOS before its
    end is inconsistent input and raises. With ``prompts``, the rewrites are those of
    ``prompts.generate_rows`` and the verdicts cover the whole batch: rows whose prompt was dropped or
    fell back get reason "prompt_over_budget", skipped rows reason "not_sent" (action "fallback").
    """
    rows = _as_rows(rewrites, "rewrites")
    eos = {int(e) for e in eos_ids}
    if not eos:
        raise ValueError("eos_ids: empty; rewrites cannot be checked for an EOS")
    if prompts is None:
        batch_rows, sent = list(range(len(rows))), list(range(len(rows)))
    else:
        batch_rows, sent = list(range(len(prompts.status))), list(prompts.generate_rows)
        if len(rows) != len(sent):
            raise ValueError(f"rewrites: {len(rows)} rows, expected {len(sent)} (one per prompt sent to the teacher)")
    index = dict(zip(sent, range(len(rows))))
    reasons, actions, rewrite_index, lengths = [], [], [], []
    for b in batch_rows:
        j = index.get(b, -1)
        if j < 0:  # not sent (trains on y_o), or the refine prompt was over budget: dropped, or falls back to y_o
            skipped = prompts.status[b] == "skipped"
            reasons.append("not_sent" if skipped else "prompt_over_budget")
            actions.append("drop" if prompts.status[b] == "dropped" else "fallback")
            rewrite_index.append(-1)
            lengths.append(0)
            continue
        row = rows[j]
        n, ends_eos = len(row), bool(row) and row[-1] in eos
        if n > cfg.rewrite_budget:
            raise ValueError(f"rewrite row {b}: {n} tokens > rewrite_budget {cfg.rewrite_budget} "
                             "(sampled with a different max_new_tokens?)")
        if any(t in eos for t in row[:-1]):
            raise ValueError(f"rewrite row {b}: EOS before the end of the row (rows must stop at their first EOS)")
        if not ends_eos and n < cfg.rewrite_budget:
            raise ValueError(f"rewrite row {b}: {n} tokens without EOS, under rewrite_budget "
                             f"{cfg.rewrite_budget}: generation was aborted")
        body = row[:-1] if ends_eos else row
        empty = not body or (tokenizer is not None and not tokenizer.decode(body, skip_special_tokens=True).strip())
        if empty:
            reason, policy, field = "empty", cfg.on_empty_rewrite, "on_empty_rewrite"
        elif not ends_eos:
            reason, policy, field = "capped", cfg.on_capped_rewrite, "on_capped_rewrite"
        else:
            reason, policy, field = "ok", "keep", ""
        if policy == "error":
            raise ValueError(f"rewrite row {b}: {reason} ({n} tokens, rewrite_budget {cfg.rewrite_budget}); "
                             f"{field}='error'")
        reasons.append(reason)
        actions.append(policy)
        rewrite_index.append(j)
        lengths.append(n)
    return RewriteVerdicts(tuple(reasons), tuple(actions), tuple(rewrite_index), tuple(lengths))


class Selection(NamedTuple):
    """``rows``: the trajectories to train on, for the kept batch rows in order; ``sources``: "y_r" or
    "y_o" for each of them; ``kept``: bool[B] over the batch (np.flatnonzero(kept) gives their rows)."""

    rows: list[list[int]]
    sources: tuple[str, ...]
    kept: np.ndarray


def select_trajectories(y_o: Any, y_r: Any, verdicts: RewriteVerdicts) -> Selection:
    """Per batch row, y_r (keep), y_o (fallback) or nothing (drop). ``y_o`` has one row per batch row,
    ``y_r`` the rewrites as given to :func:`validate_rewrites`; both are copied, never mutated."""
    y_o, y_r = _as_rows(y_o, "y_o"), _as_rows(y_r, "y_r")
    if len(y_o) != len(verdicts.actions):
        raise ValueError(f"y_o: {len(y_o)} rows, expected {len(verdicts.actions)} (one per batch row)")
    expected = sum(j >= 0 for j in verdicts.rewrite_index)
    if len(y_r) != expected:
        raise ValueError(f"y_r: {len(y_r)} rows, expected {expected} (the rewrites that were validated)")
    rows, sources = [], []
    for b, (action, j) in enumerate(zip(verdicts.actions, verdicts.rewrite_index)):
        if action == "keep":
            if len(y_r[j]) != verdicts.lengths[b]:
                raise ValueError(f"y_r row {b}: {len(y_r[j])} tokens, but {verdicts.lengths[b]} were validated")
            rows.append(y_r[j])
            sources.append("y_r")
        elif action == "fallback":
            rows.append(y_o[b])
            sources.append("y_o")
    return Selection(rows, tuple(sources), verdicts.kept)
