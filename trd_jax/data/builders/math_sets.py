"""Math problem sets: training (DeepScaleR-style flat rows, DAPO-Math-17k chat rows) and evaluation
(AIME / HMMT / MATH-500 style). Features: id, problem, answer, reference ("" when the source has none).

Fields are found through the alias lists below, first present alias wins (see ``fields``):

* problem: PROBLEM_FIELDS. A string, or a chat list [{"role": "user", "content": ...}, ...] with exactly
  one user message, whose content is the problem (DAPO's ``prompt``; other roles are ignored).
* answer: ANSWER_FIELDS (a string or an integer, e.g. AIME's int64 column); when none is present, the
  last \\boxed{...} of the reference solution.
* reference: REFERENCE_FIELDS, optional.
* id: ID_FIELDS (a string or an integer), else "<file stem>-<row index>".
"""

from __future__ import annotations

from typing import Any

from trd_jax.data.builders import fields
from trd_jax.data.builders.base import LocalFilesBuilder
from trd_jax.data.builders.files import Record
from trd_jax.rewards.answers import last_boxed

PROBLEM_FIELDS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "ground_truth", "reward_model.ground_truth",
                 "expected_answer")
REFERENCE_FIELDS = ("solution", "Solution", "reference", "reference_solution")
ID_FIELDS = ("id", "ID", "unique_id", "problem_id", "problem_idx", "idx", "extra_info.index")

# DAPO-Math-17k wraps each problem in this instruction (its answer format, "Answer: ..."). Stripped so that
# problems from every source are bare and the task's own instruction is the only one the student sees.
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of "
               "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def strip_dapo_instruction(problem: str) -> str:
    """``problem`` without DAPO's wrapper when both of its parts are there verbatim, else unchanged."""
    if problem.startswith(DAPO_PREFIX) and problem.endswith(DAPO_SUFFIX) \
            and len(problem) > len(DAPO_PREFIX) + len(DAPO_SUFFIX):
        return problem[len(DAPO_PREFIX):-len(DAPO_SUFFIX)]
    return problem


def _problem(record: Record) -> str:
    found = fields.find(record, PROBLEM_FIELDS)
    if found is None:
        raise record.error("problem", f"missing (looked for {', '.join(PROBLEM_FIELDS)})")
    alias, value = found
    if isinstance(value, list):
        return _user_message(record, alias, value)
    return fields.text(record, alias, value)


def _user_message(record: Record, alias: str, messages: list[Any]) -> str:
    users = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise record.error(f"{alias}[{i}]", "expected a chat message {\"role\": ..., \"content\": ...}")
        if m["role"] == "user":
            users.append(fields.text(record, f"{alias}[{i}].content", m.get("content")))
    if len(users) != 1:
        raise record.error(alias, f"expected exactly one user message, found {len(users)}")
    return users[0]


def parse_math_row(record: Record, *, strip_dapo: bool = True) -> dict[str, str]:
    """The features of one math row (a ValueError naming the file, row and field when it is invalid)."""
    problem = _problem(record)
    if strip_dapo:
        problem = strip_dapo_instruction(problem)
    reference = fields.optional_text(record, REFERENCE_FIELDS) or ""
    found = fields.find(record, ANSWER_FIELDS)
    if found is not None:
        answer = fields.text(record, found[0], found[1], allow_int=True).strip()
    else:
        boxed = last_boxed(reference)
        if not boxed:
            raise record.error("answer", f"missing (looked for {', '.join(ANSWER_FIELDS)}, then for a "
                                         f"\\boxed{{...}} in {', '.join(REFERENCE_FIELDS)})")
        answer = boxed
    return {"id": fields.row_id(record, ID_FIELDS), "problem": problem, "answer": answer,
            "reference": reference}


class MathTrain(LocalFilesBuilder, skip_registration=True):
    """Math training problems (DeepScaleR, DAPO-Math-17k, ...) from local JSONL/JSON/parquet files."""

    name = "math_train"
    FEATURES = ("id", "problem", "answer", "reference")

    def parse(self, record: Record) -> dict[str, str]:
        return parse_math_row(record, strip_dapo=self.config.strip_dapo_instruction)


class MathEval(MathTrain, skip_registration=True):
    """Math evaluation problems (AIME, HMMT, MATH-500, ...) from local JSONL/JSON/parquet files: the same
    rows as training sets; kept apart so that evaluation sets live in their own folder."""

    name = "math_eval"
