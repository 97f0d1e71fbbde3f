"""An exported SmolLM2 student, loaded with transformers alone (no trd_jax model code), answering held-out
problems of the recipe's mini_math eval split with the recipe's one-shot chat prompt, greedily.

    pip install torch==2.13.0   # transformers' PyTorch backend, CPU build
    python -m trd_jax.experiments.smollm2_answer --model runs/smollm2/opd-trd/export [--problems 0,1,2]

Prints each problem, the model's answer, the reference answer and the grade (math-verify on the last boxed
answer, as in training). --model may also be the untouched SmolLM2 folder (workdir/models/...) to compare.
"""

from __future__ import annotations

import argparse
import tempfile

from trd_jax.config import resolve
from trd_jax.data.registry import make_task
from trd_jax.recipes import smollm2_config


def answer(model_dir: str, indices: list[int], max_new_tokens: int = 96) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = resolve(smollm2_config("opd"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as scratch:
        task = make_task(s.task, scratch, student_dir=model_dir)
        problems = task.split("eval")
        out = []
        try:
            for i in indices:
                example = problems[i]
                prompt = example.prompt()
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
                with torch.no_grad():
                    generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
                text = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                out.append({"index": i, "problem": example.problem, "response": text, "answer": example.answer,
                            "correct": task.grade(text, example) == 1.0})
        finally:
            task.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face folder (a run's export/)")
    p.add_argument("--problems", default="0,1,2", help="indices into the eval split")
    a = p.parse_args(argv)
    for r in answer(a.model, [int(i) for i in a.problems.split(",")]):
        print(f"### eval problem {r['index']} ({'correct' if r['correct'] else 'wrong'}; reference {r['answer']})")
        print(r["problem"].strip(), "\n---", r["response"].strip(), "\n", sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
