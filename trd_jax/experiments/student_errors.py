"""What kind of mistakes trained students make: each given student (a run's export/, a Hugging Face folder) samples
held-out problems of the embedded task at the evaluation's settings, and every locally wrong step of its answers is
classified (trd_jax.data.arithmetic.error_kinds: a missing line, a wrong operation, a value not carried from the
line above, a wrong result on a wrapping or on a plain line).

    python -m trd_jax.experiments.student_errors --out FILE.json [--problems 256] \\
        --runs opd-trd=DIR/runs/b0/opd-trd-s0,DIR/runs/b0/opd-trd-s1 --runs opd-fkl=...

Runs given under one label are pooled (e.g. the seeds of one method). The bootstrap's own student is reported as
"initial". Prints a table (mistakes per 100 answers, by kind) and writes the figures to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import jax

from trd_jax import trajectories
from trd_jax.data.arithmetic import ERROR_KINDS, error_kinds
from trd_jax.phase_sampling import sample_rows
from trd_jax.recipes import apply_overrides, method_config, parse_overrides


def tally(texts: list[str], problems: list) -> dict:
    """Mistakes per answer by kind, answers with none, over the answers `texts` of `problems`."""
    counts = dict.fromkeys(ERROR_KINDS, 0)
    clean = 0
    for text, p in zip(texts, problems):
        kinds = error_kinds(text, p)
        clean += not kinds
        for k in kinds:
            counts[k] += 1
    n = max(len(texts), 1)
    return {"answers": len(texts), "without_mistakes": clean / n, "per_answer": {k: v / n for k, v in counts.items()}}


def measure(runs: dict[str, list[str]], problems: int, seed: int, overrides: dict | None = None) -> dict:
    from flax import nnx

    from trd_jax.controller import Trainer
    from trd_jax.models.hf_io import load_hf

    cfg = method_config("forward_kl", "opd", seed)
    apply_overrides(cfg, {"log.progress": False, **(overrides or {})})
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, workdir)
        tok, task, s = trainer.tok, trainer.task, trainer.s
        examples = list(task.split("eval"))[:problems]
        x = trajectories.encode_prompts(tok, examples, s.task.prompt_mode, s.task.max_prompt_tokens)
        probs = [task.problem_of(ex) for ex in examples]

        def answers(params, key) -> list[str]:
            rows = sample_rows(s, trainer.rollout_sampler, params, x, s.eval.max_new, s.eval.sampling, 1, key)
            return [tok.decode(r, skip_special_tokens=True) for r in rows]

        out = {"initial": tally(answers(trainer.state.params, jax.random.key(seed)), probs)}
        for label, dirs in runs.items():
            texts = []
            for i, d in enumerate(dirs):
                texts += answers(nnx.split(load_hf(d))[1], jax.random.key(seed + 1 + i))
            out[label] = {**tally(texts, probs * len(dirs)), "runs": dirs}
    return {"problems": len(examples), "sampling": {"temperature": s.eval.sampling.temperature,
                                                    "top_p": s.eval.sampling.top_p}, "students": out}


def report(result: dict) -> str:
    lines = [f"Mistakes per 100 answers on {result['problems']} held-out problems (one sample each per student, "
             f"temperature {result['sampling']['temperature']}, top-p {result['sampling']['top_p']}):", "",
             "| student | answers | without mistakes (%) | " + " | ".join(ERROR_KINDS) + " |",
             "|---|---:|---:|" + "---:|" * len(ERROR_KINDS)]
    for label, r in result["students"].items():
        lines.append(f"| {label} | {r['answers']} | {100 * r['without_mistakes']:.1f} | "
                     + " | ".join(f"{100 * r['per_answer'][k]:.1f}" for k in ERROR_KINDS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--runs", action="append", default=[], metavar="LABEL=DIR[,DIR...]",
                        help="students to pool under one label: run folders (their export/ is read) or HF folders")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runs = {}
    for item in args.runs:
        label, sep, dirs = item.partition("=")
        if not sep or not dirs:
            raise SystemExit(f"--runs {item!r}: expected LABEL=DIR[,DIR...]")
        runs[label] = [os.path.join(d, "export") if os.path.isdir(os.path.join(d, "export")) else d
                       for d in dirs.split(",")]
    result = measure(runs, args.problems, args.seed, parse_overrides(args.set))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
