"""Host-side bookkeeping of one step's rows: prompts, rollouts y_o, refine prompts and rewrites y_r, grades,
and the training trajectory and teacher context chosen for each row.

A step has a fixed number of rows, batch_size * n (n samples per prompt, rows i*n .. i*n + n - 1 for
prompt i). A row dropped by a refine policy keeps its place with an empty response: its loss mask is
all false, so it contributes nothing, and the step's array shapes stay the same (no recompile, and no
branch that could deadlock SPMD programs, TRD_SPEC §7.7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from trd_jax.data.task import Example
from trd_jax.prompts import vanilla_teacher_context
from trd_jax.refine import (RefineConfig, RefinePrompts, RewriteVerdicts, build_refine_prompts, select_trajectories,
                            validate_rewrites)
from trd_jax.tokenization import Tokenizer


@dataclasses.dataclass
class StepRows:
    examples: list[Example]  # one per row
    prompts: list[list[int]]  # x ids, one per row
    y_o: list[list[int]]  # rollouts as sampled (EOS included when emitted)
    y_o_reward: np.ndarray  # f32[rows]
    y_o_capped: np.ndarray  # bool[rows]: hit the response budget without EOS
    refine_prompts: RefinePrompts | None = None
    verdicts: RewriteVerdicts | None = None
    y_r: list[list[int]] = dataclasses.field(default_factory=list)  # rewrites, in verdicts.rewrite_index order
    y_r_reward: np.ndarray | None = None  # f32[len(y_r)]
    responses: list[list[int]] = dataclasses.field(default_factory=list)  # trained trajectory per row ([] = dropped)
    sources: list[str] = dataclasses.field(default_factory=list)  # "y_r" | "y_o" | "dropped" per row
    teacher_contexts: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.examples)


def encode_prompts(tokenizer: Tokenizer, examples: Sequence[Example], prompt_mode: str,
                   max_tokens: int) -> list[list[int]]:
    """x ids per example; a prompt over ``max_tokens`` is an error naming the example."""
    out = []
    for ex in examples:
        ids = tokenizer.encode_prompt(ex.prompt(), prompt_mode)
        if len(ids) > max_tokens:
            raise ValueError(f"example {ex.id!r}: prompt of {len(ids)} tokens exceeds "
                             f"task.max_prompt_tokens={max_tokens}")
        out.append(ids)
    return out


def sampled_rows(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [tokens[i, : int(n)].tolist() for i, n in enumerate(lengths)]


def grade(task, tokenizer: Tokenizer, rows: Sequence[Sequence[int]], examples: Sequence[Example]) -> np.ndarray:
    """Rewards of decoded responses (special tokens skipped); in parallel where the task grades batches."""
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return np.asarray(task.grade_batch(texts, list(examples)), np.float32)


def capped(rows: Sequence[Sequence[int]], eos_ids: Sequence[int], budget: int) -> np.ndarray:
    eos = set(eos_ids)
    return np.array([len(r) >= budget and (not r or r[-1] not in eos) for r in rows], bool)


def refine(rows: StepRows, tokenizer: Tokenizer, cfg: RefineConfig,
           generate: Callable[[list[list[int]], list[list[int]]], list[list[int]]]) -> None:
    """Builds refine prompts from y_o (decoded without special tokens), lets ``generate(prompts, drafts)``
    write y_r for the rows sent (drafts: those rows' y_o token ids, for speculative refine), validates
    every rewrite before choosing any trajectory (TRD_SPEC §7.1), and fills rows.refine_prompts / verdicts
    / y_r / responses / sources. With ``cfg.rows == "wrong"`` only rows whose y_o was graded wrong
    (rows.y_o_reward < 0.5) are sent; the others train on y_o."""
    attempts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows.y_o]
    send = None if cfg.rows == "all" else (np.asarray(rows.y_o_reward) < 0.5).tolist()
    prompts = build_refine_prompts(tokenizer, [ex.problem for ex in rows.examples], attempts,
                                   [ex.reference for ex in rows.examples], cfg, send=send)
    y_r = generate(prompts.generate_ids, [rows.y_o[i] for i in prompts.generate_rows]) if prompts.generate_rows else []
    verdicts = validate_rewrites(y_r, tokenizer.eos_ids, cfg, tokenizer=tokenizer, prompts=prompts)
    chosen = select_trajectories(rows.y_o, y_r, verdicts)
    rows.refine_prompts, rows.verdicts, rows.y_r = prompts, verdicts, y_r
    picked = iter(zip(chosen.rows, chosen.sources))
    rows.responses, rows.sources = [], []
    for kept in chosen.kept:
        response, source = next(picked) if kept else ([], "dropped")
        rows.responses.append(response)
        rows.sources.append(source)


WRONG_REWRITE_COUNTERS = ("y_r_wrong_kept", "y_r_wrong_fallback", "y_r_wrong_dropped")


def apply_wrong_rewrites(rows: StepRows, policy: str) -> dict[str, int]:
    """After y_r is graded (rows.y_r_reward): each row training on a rewrite graded wrong (reward < 0.5)
    keeps it ("keep"), trains on its own y_o instead ("fallback") or is dropped ("drop": empty response,
    all-false mask). Returns the rows per outcome, WRONG_REWRITE_COUNTERS (the rows whose y_r is right
    or was never trained on are not counted)."""
    if policy not in ("keep", "fallback", "drop"):
        raise ValueError(f"on_wrong_rewrite={policy!r}: must be one of keep, fallback, drop")
    counts = dict.fromkeys(WRONG_REWRITE_COUNTERS, 0)
    for b, source in enumerate(rows.sources):
        if source != "y_r" or rows.y_r_reward[rows.verdicts.rewrite_index[b]] >= 0.5:
            continue
        if policy == "fallback":
            rows.responses[b], rows.sources[b] = list(rows.y_o[b]), "y_o"
        elif policy == "drop":
            rows.responses[b], rows.sources[b] = [], "dropped"
        counts[{"keep": "y_r_wrong_kept", "fallback": "y_r_wrong_fallback", "drop": "y_r_wrong_dropped"}[policy]] += 1
    return counts


def refine_outcomes(rows: StepRows, wrong: dict[str, int], eos_ids: Sequence[int],
                    rewrite_budget: int) -> tuple[dict[str, float], dict[str, float]]:
    """A refined step's (row counts, y_r metrics): refine prompts per status, rewrites per verdict, the outcomes
    of wrong rewrites (apply_wrong_rewrites), fallbacks to y_o, rewrites generated and graded right; and the
    rewrites' accuracy, length and share capped, and the mean length of the refine prompts sent."""
    counts: dict[str, float] = {f"refine_prompt_{k}": v for k, v in rows.refine_prompts.counts.items()}
    counts.update({f"rewrite_{k}": v for k, v in rows.verdicts.counts.items()})
    counts.update(wrong)
    lengths = [len(r) for r in rows.y_r]
    counts.update(fallback_to_y_o=sum(src == "y_o" for src in rows.sources), y_r_generated=len(lengths),
                  y_r_correct=float(rows.y_r_reward.sum()))
    sent = [n for n, st in zip(rows.refine_prompts.full_lengths, rows.refine_prompts.status) if st != "skipped"]
    metrics = {"accuracy/y_r": float(rows.y_r_reward.mean()) if lengths else 0.0,
               "length/y_r": float(np.mean(lengths)) if lengths else 0.0,
               "capped/y_r": float(capped(rows.y_r, eos_ids, rewrite_budget).mean()) if lengths else 0.0,
               "length/refine_prompt": float(np.mean(sent or [0]))}
    return counts, metrics


def use_rollouts(rows: StepRows) -> None:
    """Token-level baselines: every row trains on its own y_o."""
    rows.responses = [list(r) for r in rows.y_o]
    rows.sources = ["y_o"] * rows.num_rows


def vanilla_contexts(tokenizer: Tokenizer, examples: Sequence[Example], prompts: Sequence[list[int]], *, mode: str,
                     task_kind: str, prompt_mode: str) -> list[list[int]]:
    """The baselines' teacher context per row: x itself for OPD, x + y* for OPSD."""
    if mode == "opd":
        return [list(p) for p in prompts]
    return [vanilla_teacher_context(ex.problem, ex.reference, mode="opsd", task=task_kind, tokenizer=tokenizer,
                                    prompt_mode=prompt_mode) for ex in examples]


def choose_teacher_contexts(rows: StepRows, vanilla: Sequence[list[int]], teacher_context: str) -> None:
    """"refine": a row trained on y_r is scored under the refine prompt that produced it ([code-trd]); a row
    that fell back to y_o (or was dropped) has no usable refine prompt and is scored under the vanilla
    context. "vanilla": every row under the vanilla context."""
    rows.teacher_contexts = []
    for b, source in enumerate(rows.sources):
        if teacher_context == "refine" and source == "y_r":
            rows.teacher_contexts.append(list(rows.refine_prompts.ids[b]))
        else:
            rows.teacher_contexts.append(list(vanilla[b]))
