"""How a run's phases call a sampler (rollout, refine, evaluation): the run's row groups and prompt lookup applied,
the outputs as token lists, and the cost of speculative calls as step metrics."""

from __future__ import annotations

from trd_jax import trajectories
from trd_jax.sampling import Sampler


def sample_rows(s, sampler: Sampler, params, prompts, max_new: int, sampling, n: int, key,
                max_prompt_len: int | None = None, drafts=None, draft_tokens: int = 0, kept: dict | None = None,
                lookup: bool = False, key_groups: list[int] | None = None) -> list[list[int]]:
    """s: the run's Settings. max_prompt_len: the longest prompt the phase allows (caps the sampler's prompt bucket
    and cache); rows go through the sampler at most rollout.max_rows_per_call at a time. drafts: speculative
    decoding against them (speculative.py). kept: a dict that receives the rows' final-layer states under
    "hidden" (score_reuse). lookup: draft from the prompts themselves (rollout.prompt_lookup_tokens). key_groups:
    consecutive groups of prompts, each sampled with its own key of `key` (Sampler's key_groups)."""
    mode = "aligned"
    if lookup and s.rollout.prompt_lookup_tokens:
        drafts, draft_tokens, mode = prompts, s.rollout.prompt_lookup_tokens, "lookup"
    out = sampler(params, prompts, max_new, sampling=sampling, n=n, key=key, max_prompt_len=max_prompt_len,
                  max_rows=s.rollout.max_rows_per_call, drafts=drafts, draft_tokens=draft_tokens, draft_mode=mode,
                  keep_hidden=kept is not None, key_groups=key_groups)
    if kept is not None:
        kept["hidden"] = out.hidden
    return trajectories.sampled_rows(out.tokens, out.lengths)


def draft_metrics(stats: dict, tokens: int, phase: str = "refine") -> dict[str, float]:
    """Speculative decoding's cost per step in a phase (refine: the y_o draft; rollout: prompt lookup): model
    passes, draft tokens proposed and accepted, accepted tokens per pass and passes per generated token
    (1.0: plain decoding's cost)."""
    passes = max(stats["passes"], 1)
    return {f"{phase}/passes": float(stats["passes"]), f"{phase}/draft_proposed": float(stats["proposed"]),
            f"{phase}/draft_accepted": float(stats["accepted"]),
            f"{phase}/accepted_per_pass": stats["accepted"] / passes,
            f"{phase}/passes_per_token": stats["passes"] / max(tokens, 1)}
