"""docs/configuration.md: every configuration key with its default and the comment that explains it, read from
trd_jax/config_defaults.py (its syntax tree for the keys, its comments for what they mean), so that the reference
cannot drift from the defaults.

    python -m trd_jax.tools.config_reference [--out docs/configuration.md] [--check]

--check exits 1 when the file differs from what the defaults give (tests/test_config_reference.py runs it).
A key's text is the comment on its line plus the comment lines right above it; keys that share a line share it;
a section's text is the comment above its `cfg.<section> = ...` line.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import sys
import tokenize

from trd_jax import config_defaults

SOURCE = config_defaults.__file__
MODEL_SECTIONS = ("student", "teacher")  # both built by _model_fields()


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """(line -> comment text, lines holding nothing but a comment)."""
    text, alone = {}, set()
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    alone = {line for line in text if line not in code_lines}
    return text, alone


def _describe(line: int, comments: dict[int, str], alone: set[int]) -> str:
    above = []
    up = line - 1
    while up in alone:
        above.insert(0, comments[up])
        up -= 1
    inline = [] if line in alone else [comments[line]] if line in comments else []
    return " ".join(above + inline)


def _keywords(call: ast.Call, prefix: str, comments, alone, out: dict[str, str], owner_line: int = 0,
              nested: bool = False) -> None:
    """The keyword arguments of a dict(...) call (recursing into nested dict(...) values), by dotted key. A key on
    owner_line (its section's own line, or its parent key's) takes only its inline comment: the comment above
    that line describes the section or the parent."""
    for kw in call.keywords:
        key = prefix + kw.arg
        if kw.lineno == owner_line:
            out[key] = comments.get(kw.lineno, "") if kw.lineno not in alone else ""
        else:
            out[key] = _describe(kw.lineno, comments, alone)
        if not out[key] and nested:  # a field of a nested dict: its parent's comment says what it is
            out[key] = f"see `{prefix[:-1]}`"
        value = kw.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "dict":
            _keywords(value, key + ".", comments, alone, out, owner_line=kw.lineno, nested=True)


def _dict_call(node: ast.AST) -> ast.Call | None:
    """ml_collections.ConfigDict(dict(...)) or dict(...) -> the dict(...) call."""
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "ConfigDict" and node.args:
        node = node.args[0]
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict":
        return node
    return None


def descriptions(source: str) -> tuple[dict[str, str], dict[str, str]]:
    """(dotted key -> text, section -> text) from config_defaults' source."""
    comments, alone = _comments(source)
    tree = ast.parse(source)
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    model: dict[str, str] = {}
    for node in ast.walk(functions["_model_fields"]):
        if isinstance(node, ast.Return) and (call := _dict_call(node.value)) is not None:
            _keywords(call, "", comments, alone, model)
    keys, sections = {}, {}
    for stmt in functions["base_config"].body:
        if not (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Attribute)):
            continue
        name = stmt.targets[0].attr
        text = _describe(stmt.lineno, comments, alone)
        if name in MODEL_SECTIONS:
            sections[name] = text
            keys.update({f"{name}.{k}": v.replace("see `", f"see `{name}.") for k, v in model.items()})
        elif (call := _dict_call(stmt.value)) is not None:
            sections[name] = text
            _keywords(call, name + ".", comments, alone, keys, owner_line=stmt.lineno)
        else:
            keys[name] = text
    return keys, sections


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    with open(SOURCE) as f:
        keys, sections = descriptions(f.read())
    values = _flatten(config_defaults.base_config().to_dict())
    missing = sorted(set(values) - set(keys))
    if missing:
        raise ValueError(f"config_defaults: keys the reference cannot place: {missing}")
    lines = ["# Configuration reference", "",
             "Every key of a run's configuration (`trd_jax/config_defaults.py`), its default and what it does. "
             "Recipes in configs/ start from these defaults; any key can be overridden on the command line, e.g. "
             "`--config.rollout.continuous_slots=64`. Generated by `python -m trd_jax.tools.config_reference`; "
             "a test fails when it falls behind the defaults.", "",
             "| key | default | meaning |", "|---|---|---|"]
    for k, text in keys.items():  # a nested dict's fields carry their parent's comment
        if text.startswith("see `"):
            parent = text[5:-1]
            keys[k] = f"`{parent}`: {keys[parent]}" if keys.get(parent) else f"a field of `{parent}`"
    top = [k for k in values if "." not in k]
    for k in top:
        lines.append(f"| `{k}` | `{_cell(json.dumps(values[k]))}` | {_cell(keys[k])} |")
    for section, text in sections.items():
        lines += ["", f"## {section}", ""]
        if text:
            lines += [text, ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for k, v in values.items():
            if k.startswith(section + "."):
                lines.append(f"| `{k}` | `{_cell(json.dumps(v))}` | {_cell(keys[k])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("docs", "configuration.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from the defaults' reference")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        current = open(a.out).read() if os.path.isfile(a.out) else ""
        if current != text:
            print(f"{a.out} is out of date: run python -m trd_jax.tools.config_reference", file=sys.stderr)
            return 1
        return 0
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
