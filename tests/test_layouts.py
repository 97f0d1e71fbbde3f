"""Student x + y and teacher c + y layouts: position t of both predicts the same response token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trd_jax.layouts import build_layout, distill_batch, response_slice

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]
RESPONSES = [[20, 21, 22, 23], [24], []]
# Teacher contexts of other lengths than the prompts (e.g. refine prompts), longer and shorter.
CONTEXTS = [[30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], [41, 42], [43]]


def test_targets_and_masks():
    b = distill_batch(PROMPTS, RESPONSES, CONTEXTS, pad_id=0)
    for i, y in enumerate(RESPONSES):
        assert b.targets[i, :len(y)].tolist() == y
        assert b.response_mask[i].tolist() == [r < len(y) for r in range(b.targets.shape[1])]
        assert (b.targets[i, len(y):] == 0).all()
    for layout, ctx in ((b.student, PROMPTS), (b.teacher, CONTEXTS)):
        c = layout.context_width
        for i in range(len(ctx)):
            real = layout.tokens[i][layout.mask[i]].tolist()
            assert real == ctx[i] + RESPONSES[i]
            # positions count real tokens from 0: the first real token sits at position 0
            assert layout.positions[i][layout.mask[i]].tolist() == list(range(len(real)))
            # the column before response token r holds the token that predicts it
            for r in range(len(RESPONSES[i])):
                assert layout.tokens[i, c + r] == RESPONSES[i][r]


def log_probs(lm, tokens, positions, mask):
    hidden, _ = lm.model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(jax.nn.log_softmax(lm.model.logits(hidden), axis=-1))


@pytest.mark.parametrize("name", ["qwen3", "llama"])
@pytest.mark.slow
def test_alignment_against_unpadded_sequences(tiny_lms, name):
    """The log-prob of target r read from each side's response slice equals the log-prob of the same
    token computed on the unpadded sequence (context + response) alone."""
    lm = tiny_lms[name]
    b = distill_batch(PROMPTS, RESPONSES, CONTEXTS, pad_id=0)
    for layout, contexts in ((b.student, PROMPTS), (b.teacher, CONTEXTS)):
        lp = response_slice(log_probs(lm, layout.tokens, layout.positions, layout.mask), layout)
        chosen = np.take_along_axis(lp, b.targets[..., None], axis=-1)[..., 0]
        for i, y in enumerate(RESPONSES):
            seq = np.array([contexts[i] + y])
            if not y:
                continue
            ref = log_probs(lm, seq, np.arange(seq.shape[1])[None], np.ones_like(seq, bool))[0]
            expected = [ref[len(contexts[i]) - 1 + r, tok] for r, tok in enumerate(y)]
            np.testing.assert_allclose(chosen[i, :len(y)], expected, atol=1e-5)


def test_same_context_gives_identical_sides():
    b = distill_batch(PROMPTS, RESPONSES, pad_id=0)
    for f in ("tokens", "mask", "positions"):
        assert np.array_equal(getattr(b.student, f), getattr(b.teacher, f))


def test_errors_name_the_row():
    with pytest.raises(ValueError, match=r"teacher_contexts\[1\]: 2 tokens exceed the context width 1"):
        build_layout([[1], [1, 2]], [[3], [4]], context_width=1, response_width=2, name="teacher_contexts")
    with pytest.raises(ValueError, match=r"responses\[0\]: 3 tokens exceed"):
        build_layout([[1]], [[3, 4, 5]], context_width=4, response_width=2)
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty"):
        distill_batch([[1], []], [[2], [3]])
    with pytest.raises(ValueError, match=r"teacher_contexts: 1 rows, expected 2"):
        distill_batch([[1], [2]], [[2], [3]], [[4]])


def test_pad_id_outside_the_vocabulary_never_reaches_the_model():
    """A tokenizer's pad id may lie outside the embedding: model inputs pad with 0, targets with pad_id."""
    b = distill_batch(PROMPTS, RESPONSES, CONTEXTS, pad_id=10_000)
    for layout in (b.student, b.teacher):
        assert layout.tokens.max() < 100 and (layout.tokens[~layout.mask] == 0).all()
    assert (b.targets[~b.response_mask] == 10_000).all()
    assert (b.targets[b.response_mask] < 100).all()
