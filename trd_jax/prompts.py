"""The prompt texts of TRD and its baselines: the answer-format instructions task prompts end with, the
refine prompt's user message (TRD_SPEC §3a-3b) and the baselines' vanilla teacher context. Plain strings in,
plain strings out: data pipelines, teacher SFT and refine.py all build their text here, and nothing here
imports a task, a model or the sampler.

Templates are our own wording. Their section markers (`**Problem:**`, `**Reference Solution:**`,
`**Your Initial Solution:**`, `**Instructions:**`) delimit the blocks that budget truncation trims.
"""

from __future__ import annotations

import re

from trd_jax.tokenization import Message, Tokenizer

MODES = ("opd", "opsd")
TASKS = ("math", "code")

# The answer-format sentence math prompts end with; data pipelines may import it to build x.
MATH_ANSWER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_ANSWER_INSTRUCTION = "Give your final program in a single ```python code block."
TRUNCATION_NOTICE = "[... truncated ...]"

PROBLEM, REFERENCE, ATTEMPT, INSTRUCTIONS = (
    "**Problem:**", "**Reference Solution:**", "**Your Initial Solution:**", "**Instructions:**")

# A trailing sentence that asks for a \boxed{} answer (empty braces: an instruction, not an answer).
_BOXED_TAIL = re.compile(r"\s*[^\n.?!]*\\boxed\{\}[^\n]*\s*$")

_HEADER = {
    ("opd", "math"): "Here is a math problem and a solution you wrote for it earlier. "
                     "Rewrite that solution, repairing whatever is wrong with it.",
    ("opsd", "math"): "Here is a math problem, a reference solution, and a solution you wrote for it "
                      "earlier. Rewrite your solution, using the reference as your guide.",
    ("opd", "code"): "Here is a programming problem and a program you wrote for it earlier. "
                     "Rewrite that program so that it solves the problem correctly.",
    ("opsd", "code"): "Here is a programming problem, a reference program, and a program you wrote for "
                      "it earlier. Rewrite your program, using the reference as your guide.",
}
_STEPS = {
    ("opd", "math"): ("Follow the same overall plan and line of reasoning as your initial solution.",
                      "Find any arithmetic or logical mistakes and correct them.",
                      "Leave the intermediate steps that are already right as they are.",
                      "Reply with the rewritten solution only, without commenting on what you changed."),
    ("opsd", "math"): ("Work through the reference solution until you understand its method and reasoning.",
                       "Bring your own solution into agreement with that reasoning.",
                       "Keep whatever is useful in the structure and style of your own solution.",
                       "Reply with the rewritten solution only, without commenting on what you changed."),
    ("opd", "code"): ("Fix any bugs, faulty logic and unhandled edge cases.",
                      "Keep the parts of your original approach that work.",
                      "Reply with only the corrected Python in one ```python block."),
    ("opsd", "code"): ("Study the reference program until you understand its approach.",
                       "Fix any bugs, faulty logic and unhandled edge cases in your program.",
                       "Keep the parts of your original approach that work.",
                       "Reply with only the corrected Python in one ```python block."),
}
_VANILLA_OPSD = {
    "math": "Read the reference solution until you understand it, then solve the problem yourself, "
            "with your own approach.",
    "code": "Read the reference program until you understand it, then solve the problem yourself, "
            "with your own approach.",
}

def strip_answer_instruction(problem: str) -> str:
    """``problem`` without a trailing answer-format instruction (a sentence asking for ``\\boxed{}``, or
    CODE_ANSWER_INSTRUCTION), so that templates can append their own exactly once."""
    text = problem.rstrip()
    if text.endswith(CODE_ANSWER_INSTRUCTION):
        return text[: -len(CODE_ANSWER_INSTRUCTION)].rstrip()
    return _BOXED_TAIL.sub("", text)


def _fence(code: str) -> str:
    """Code in a closed python fence (a reference that brings its own fence keeps it)."""
    code = code.strip()
    if not code.startswith("```"):
        return f"```python\n{code}\n```"
    return code if code.endswith("```") and len(code) > 3 else f"{code}\n```"  # closes a truncated fence


def _check_mode_task(mode: str, task: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
    if task not in TASKS:
        raise ValueError(f"task={task!r}: must be one of {', '.join(TASKS)}")


def refine_prompt_text(problem: str, attempt: str, reference: str | None = None, *, mode: str, task: str) -> str:
    """The refine prompt's user message. ``attempt``: y_o decoded without special tokens;
    ``reference``: y* (used by OPSD only, required there)."""
    _check_mode_task(mode, task)
    if mode == "opsd" and not (reference and reference.strip()):
        raise ValueError("OPSD refine prompt needs a reference solution")
    blocks = [_HEADER[mode, task], f"{PROBLEM}\n{strip_answer_instruction(problem)}"]
    if mode == "opsd":
        blocks.append(f"{REFERENCE}\n{_fence(reference) if task == 'code' else reference.strip()}")
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(_STEPS[mode, task], 1))
    blocks += [f"{ATTEMPT}\n{attempt.strip()}", f"{INSTRUCTIONS}\n{steps}"]
    if task == "math":
        blocks.append(MATH_ANSWER_INSTRUCTION)
    return "\n\n".join(blocks)


def vanilla_teacher_context(problem: str, reference: str | None = None, *, mode: str, task: str,
                            tokenizer: Tokenizer | None = None, prompt_mode: str = "chat") -> list[Message] | list[int]:
    """The baselines' teacher context c: OPD, x itself (the student's own prompt, unchanged); OPSD, x
    plus the reference y* and an instruction to understand it and then solve with its own approach.

    Returns one user message, or its prompt ids when ``tokenizer`` is given (rendered in ``prompt_mode``).
    """
    _check_mode_task(mode, task)
    if mode == "opd":
        content = problem
    else:
        if not (reference and reference.strip()):
            raise ValueError("OPSD teacher context needs a reference solution")
        ref = _fence(reference) if task == "code" else reference.strip()
        answer = MATH_ANSWER_INSTRUCTION if task == "math" else CODE_ANSWER_INSTRUCTION
        content = "\n\n".join([f"{PROBLEM}\n{strip_answer_instruction(problem)}", f"{REFERENCE}\n{ref}",
                               f"{INSTRUCTIONS}\n{_VANILLA_OPSD[task]}", answer])
    messages = [{"role": "user", "content": content}]
    return messages if tokenizer is None else tokenizer.encode_prompt(messages, prompt_mode)
