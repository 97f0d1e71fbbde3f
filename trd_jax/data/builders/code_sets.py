"""Code problem sets (MBPP, TACO / APPS, HumanEval style). Features: id, problem, reference (a complete
solution, "" when the source has none), tests (a JSON string) and test_style, which says how to read tests:

* "mbpp" (a row with ``test_list``): {"asserts": [assert statements], "setup": code to run first}, the
  setup being ``test_imports`` (sanitized MBPP) and ``test_setup_code`` joined by newlines.
* "taco" (a row with ``input_output``, a JSON string or object): {"inputs": [...], "outputs": [...],
  "fn_name": name or null, "starter_code": str}. Without fn_name each input is a program's stdin and each
  output its stdout; with it, inputs are argument lists of that function. Reference: the first of
  ``solutions`` (a JSON string or list of programs).
* "humaneval" (a row with ``test`` and ``entry_point``): {"test": code defining check(candidate),
  "entry_point": the function to pass to it}. Reference: ``prompt`` + ``canonical_solution``.

problem: CODE_PROBLEM_FIELDS (MBPP "text", sanitized MBPP / HumanEval "prompt", TACO "question");
id: CODE_ID_FIELDS, else "<file stem>-<row index>".
"""

from __future__ import annotations

import json
from typing import Any

from trd_jax.data.builders import fields
from trd_jax.data.builders.base import LocalFilesBuilder
from trd_jax.data.builders.files import Record

CODE_PROBLEM_FIELDS = ("problem", "question", "text", "prompt")
CODE_ID_FIELDS = ("id", "ID", "task_id", "problem_id")
MBPP_REFERENCE_FIELDS = ("code", "solution", "reference")
TEST_STYLES = ("mbpp", "taco", "humaneval")


def _tests_json(tests: dict[str, Any]) -> str:
    # sorted keys: identical sources give identical bytes (and duplicate detection sees equal strings)
    return json.dumps(tests, ensure_ascii=False, sort_keys=True)


def _mbpp(record: Record) -> tuple[dict[str, Any], str]:
    asserts = fields.string_list(record, "test_list", record.data["test_list"])
    setup_parts = []
    if "test_imports" in record.data:
        setup_parts += fields.string_list(record, "test_imports", record.data["test_imports"], allow_empty=True)
    if "test_setup_code" in record.data:
        setup_parts.append(fields.text(record, "test_setup_code", record.data["test_setup_code"], allow_empty=True))
    setup = "\n".join(p for p in setup_parts if p.strip())
    reference = fields.optional_text(record, MBPP_REFERENCE_FIELDS) or ""
    return {"asserts": asserts, "setup": setup}, reference


def _taco(record: Record) -> tuple[dict[str, Any], str]:
    io = fields.json_value(record, "input_output", record.data["input_output"])
    if not isinstance(io, dict):
        raise record.error("input_output", f"expected an object with inputs and outputs, got {type(io).__name__}")
    for key in ("inputs", "outputs"):
        if not isinstance(io.get(key), list) or not io[key]:
            raise record.error(f"input_output.{key}", "missing or not a non-empty list")
    if len(io["inputs"]) != len(io["outputs"]):
        raise record.error("input_output", f"{len(io['inputs'])} inputs but {len(io['outputs'])} outputs")
    fn_name = io.get("fn_name")
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.strip()):
        raise record.error("input_output.fn_name", "expected a non-empty string")
    starter = fields.optional_text(record, ("starter_code",)) or ""
    reference = ""
    if "solutions" in record.data:
        solutions = fields.json_value(record, "solutions", record.data["solutions"])
        reference = (fields.string_list(record, "solutions", solutions, allow_empty=True) or [""])[0]
    return {"inputs": io["inputs"], "outputs": io["outputs"], "fn_name": fn_name, "starter_code": starter}, reference


def _humaneval(record: Record, problem: str) -> tuple[dict[str, Any], str]:
    test = fields.text(record, "test", record.data["test"])
    entry_point = fields.text(record, "entry_point", record.data["entry_point"]).strip()
    body = fields.optional_text(record, ("canonical_solution",))
    # canonical_solution is only the body of the function the prompt opens: the full program needs both
    reference = problem + body if body else ""
    return {"test": test, "entry_point": entry_point}, reference


def parse_code_row(record: Record) -> dict[str, str]:
    """The features of one code row (a ValueError naming the file, row and field when it is invalid)."""
    problem = fields.required_text(record, "problem", CODE_PROBLEM_FIELDS)
    if "test_list" in record.data:
        style, (tests, reference) = "mbpp", _mbpp(record)
    elif "input_output" in record.data:
        style, (tests, reference) = "taco", _taco(record)
    elif "test" in record.data and "entry_point" in record.data:
        style, (tests, reference) = "humaneval", _humaneval(record, problem)
    else:
        raise record.error("tests", "missing (looked for test_list (MBPP), input_output (TACO/APPS), "
                                    "test + entry_point (HumanEval))")
    return {"id": fields.row_id(record, CODE_ID_FIELDS), "problem": problem, "reference": reference,
            "tests": _tests_json(tests), "test_style": style}


class CodeProblems(LocalFilesBuilder, skip_registration=True):
    """Code problems with tests (MBPP, TACO, APPS, HumanEval) from local JSONL/JSON/parquet files."""

    name = "code_problems"
    FEATURES = ("id", "problem", "reference", "tests", "test_style")

    def parse(self, record: Record) -> dict[str, str]:
        return parse_code_row(record)
