"""TFDS array_record builders for local dataset files, and the grain reader (trd_jax.data.builders,
trd_jax.data.grain_source): exact contents, validation errors, no half-built datasets, deterministic
shuffling and exact resume."""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trd_jax.data.builders import MathTrain, build, dataset_dir
from trd_jax.data.builders.__main__ import main as builders_cli
from trd_jax.data.builders.math_sets import DAPO_PREFIX, DAPO_SUFFIX
from trd_jax.data.grain_source import GrainPromptIterator, load_examples, open_split
from trd_jax.data.task import Example, PromptIterator


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def manual(tmp_path, name="manual"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return d


def built_versions(data_dir, builder_name: str, name: str) -> list[str]:
    """What a failed build left under <data_dir>/<builder>/<name>/: nothing, or a finished dataset."""
    d = os.path.join(data_dir, builder_name, name)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ---------------------------------------------------------------------------------------------- math


DEEPSCALER = [
    {"problem": "Compute $1+1$.", "answer": "2", "solution": "We add: $\\boxed{2}$."},
    {"problem": "Résoudre $x^2=4$, $x>0$.", "answer": " 2 ", "solution": ""},
    {"problem": "How many primes below 10?", "answer": 4},  # integer answer, no solution
]


def test_deepscaler_jsonl_exact_contents(tmp_path):
    m = manual(tmp_path)
    write_jsonl(m / "train.jsonl", DEEPSCALER)
    path = build("math_train", name="deepscaler", manual_dir=str(m), data_dir=str(tmp_path / "data"))
    assert path == dataset_dir(MathTrain, "deepscaler", str(tmp_path / "data"))
    assert any(f.startswith("math_train-train.array_record") for f in os.listdir(path))
    assert load_examples(path, "train") == [
        Example("train-0", "Compute $1+1$.", "2", "We add: $\\boxed{2}$."),
        Example("train-1", "Résoudre $x^2=4$, $x>0$.", "2", None),
        Example("train-2", "How many primes below 10?", "4", None),
    ]
    raw = open_split(path, "train")[1]  # the stored features themselves: reference "" when absent
    assert raw == {"id": b"train-1", "problem": "Résoudre $x^2=4$, $x>0$.".encode(), "answer": b"2",
                   "reference": b""}
    assert "tensorflow" not in sys.modules  # the whole build and read ran without TensorFlow


def test_parquet_and_json_array_and_named_splits(tmp_path):
    m = manual(tmp_path)
    write_parquet(m / "part-0.parquet", DEEPSCALER[:2])
    (m / "part-1.json").write_text(json.dumps([DEEPSCALER[2]]))  # DeepScaleR ships a JSON array
    write_jsonl(m / "held_out.jsonl", [{"problem": "p", "answer": "a", "id": 7}])
    path = build("math_train", name="mixed", manual_dir=str(m), data_dir=str(tmp_path / "data"),
                 splits={"train": ["part-*"], "dev": ["held_out.jsonl"]})
    train = load_examples(path, "train")
    assert [(e.id, e.answer) for e in train] == [("part-0-0", "2"), ("part-0-1", "2"), ("part-1-0", "4")]
    assert train[0].reference == "We add: $\\boxed{2}$."
    assert load_examples(path, "dev") == [Example("7", "p", "a", None)]
    with pytest.raises(ValueError, match="no split 'test'"):
        load_examples(path, "test")


def test_plain_tfds_api(tmp_path):
    """The builders are ordinary TFDS builders: a config (or none: train*/test* files) and a manual dir."""
    import tensorflow_datasets as tfds

    from trd_jax.data.builders import LocalFilesConfig, MathEval

    m = manual(tmp_path)
    write_jsonl(m / "test-aime.jsonl", [{"problem": "p", "answer": "1"}])
    dl = tfds.download.DownloadConfig(manual_dir=str(m))
    b = MathEval(data_dir=str(tmp_path / "d"), file_format="array_record")  # no config: default splits
    b.download_and_prepare(download_config=dl)
    assert os.fspath(b.data_dir) == str(tmp_path / "d" / "math_eval" / "1.0.0")
    assert b.as_data_source(split="test")[0]["problem"] == b"p"
    config = LocalFilesConfig(name="aime", splits={"aime": ["test-aime.jsonl"]})
    b = MathEval(data_dir=str(tmp_path / "d"), config=config, file_format="array_record")
    b.download_and_prepare(download_config=dl)
    assert load_examples(os.fspath(b.data_dir), "aime") == [Example("test-aime-0", "p", "1", None)]


def dapo_row(problem: str, answer: str, index: str, wrap: bool = True) -> dict:
    content = DAPO_PREFIX + problem + DAPO_SUFFIX if wrap else problem
    return {"data_source": "math_dapo", "prompt": [{"content": content, "role": "user"}], "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


def test_dapo_nested_parquet(tmp_path):
    m = manual(tmp_path)
    rows = [dapo_row("Find $a+b$.", "34", "uuid-a"), dapo_row("Find $n$.", "7", "uuid-b"),
            dapo_row("Find $a+b$.", "34", "uuid-a"),  # the real file repeats each problem: dropped
            dapo_row("Unwrapped problem.", "1", "uuid-c", wrap=False)]
    write_parquet(m / "dapo-math-17k.parquet", rows)
    kw = dict(manual_dir=str(m), splits={"train": ["dapo-math-17k.parquet"]})
    path = build("math_train", name="dapo", data_dir=str(tmp_path / "a"), **kw)
    assert load_examples(path, "train") == [Example("uuid-a", "Find $a+b$.", "34", None),
                                            Example("uuid-b", "Find $n$.", "7", None),
                                            Example("uuid-c", "Unwrapped problem.", "1", None)]
    # kept, the repeat's id clashes with its first copy's
    with pytest.raises(ValueError, match=r"row 2, field 'id': id 'uuid-a' already used by .*row 0"):
        build("math_train", name="dapo", data_dir=str(tmp_path / "b"), drop_duplicates=False, **kw)
    assert built_versions(str(tmp_path / "b"), "math_train", "dapo") == []
    wrapped = build("math_train", name="dapo", data_dir=str(tmp_path / "c"), strip_dapo_instruction=False, **kw)
    assert load_examples(wrapped, "train")[0].problem == DAPO_PREFIX + "Find $a+b$." + DAPO_SUFFIX


def test_eval_aliases_keep_file_order(tmp_path):
    m = manual(tmp_path)
    write_jsonl(m / "aime.jsonl", [
        {"ID": "2024-I-1", "Problem": "AIME one", "Answer": 204},  # AIME 2024 style, integer answer
        {"question": "AIME25 one", "answer": "70"},  # opencompass style
        {"problem_idx": 3, "problem": "HMMT", "final_answer": "\\frac{1}{2}"},
        {"unique_id": "test/x.json", "problem": "MATH-500", "solution": "So $\\boxed{\\frac{\\pi}{2}}$ and "
                                                                   "then \\boxed{ 9 }."},  # last box wins
    ])
    path = build("math_eval", name="aime", manual_dir=str(m), data_dir=str(tmp_path / "data"),
                 splits={"test": "aime.jsonl"})
    got = load_examples(path, "test")
    assert [(e.id, e.problem, e.answer) for e in got] == [
        ("2024-I-1", "AIME one", "204"), ("aime-1", "AIME25 one", "70"), ("3", "HMMT", "\\frac{1}{2}"),
        ("test/x.json", "MATH-500", "9")]
    assert got[3].reference.startswith("So $")


def test_default_splits_discovered_and_duplicate_ids(tmp_path):
    m = manual(tmp_path)
    write_jsonl(m / "train.jsonl", [{"problem": "a", "answer": "1"}])
    write_jsonl(m / "test.jsonl", [{"problem": "b", "answer": "2", "id": "x"},
                                   {"problem": "c", "answer": "3", "id": "x"}])
    with pytest.raises(ValueError, match=r"test\.jsonl, line 2, field 'id': id 'x' already used by .*line 1"):
        build("math_train", name="d", manual_dir=str(m), data_dir=str(tmp_path / "data"))
    assert built_versions(str(tmp_path / "data"), "math_train", "d") == []  # train alone was not kept
    write_jsonl(m / "test.jsonl", [{"problem": "b", "answer": "2", "id": "x"}])
    path = build("math_train", name="d", manual_dir=str(m), data_dir=str(tmp_path / "data"))
    assert [e.problem for e in load_examples(path, "test")] == ["b"]
    assert [e.problem for e in load_examples(path, "train")] == ["a"]


def test_reuse_and_stale_inputs(tmp_path):
    m = manual(tmp_path)
    write_jsonl(m / "train.jsonl", [{"problem": "a", "answer": "1"}])
    kw = dict(name="r", manual_dir=str(m), data_dir=str(tmp_path / "data"))
    path = build("math_train", **kw)
    mtime = os.path.getmtime(os.path.join(path, "dataset_info.json"))
    assert build("math_train", **kw) == path  # same files: reused, not rebuilt
    assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == mtime
    with pytest.raises(ValueError, match="overwrite=True"):  # other options are other data, too
        build("math_train", drop_duplicates=False, **kw)
    write_jsonl(m / "train.jsonl", [{"problem": "b", "answer": "2"}])
    with pytest.raises(ValueError, match="overwrite=True"):
        build("math_train", **kw)
    # a failed overwrite keeps the old dataset (and no staging folder); a successful one replaces it
    write_jsonl(m / "train.jsonl", [{"problem": "b"}])
    with pytest.raises(ValueError, match="'answer'"):
        build("math_train", overwrite=True, **kw)
    assert [e.problem for e in load_examples(path, "train")] == ["a"]
    assert not [f for f in os.listdir(tmp_path / "data") if f.startswith(".")]
    write_jsonl(m / "train.jsonl", [{"problem": "b", "answer": "2"}])
    assert build("math_train", overwrite=True, **kw) == path
    assert [e.problem for e in load_examples(path, "train")] == ["b"]


def test_cli(tmp_path, capsys):
    m = manual(tmp_path)
    write_jsonl(m / "aime24.jsonl", [{"problem": "p", "answer": "1"}])
    builders_cli(["math_eval", "--name", "aime24", "--manual-dir", str(m), "--data-dir", str(tmp_path / "d"),
                  "--split", "aime24=aime24.jsonl"])
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert load_examples(path, "aime24") == [Example("aime24-0", "p", "1", None)]


# ---------------------------------------------------------------------------------------------- code


def test_code_sets_mbpp_taco_humaneval(tmp_path):
    m = manual(tmp_path)
    write_jsonl(m / "mbpp.jsonl", [
        {"task_id": 11, "text": "Remove first and last occurrence.", "code": "def f(s):\n    return s",
         "test_list": ["assert f('a') == 'a'", "assert f('') == ''"], "test_setup_code": "",
         "challenge_test_list": []},
        {"task_id": 12, "prompt": "Sanitized.", "code": "import math\ndef g():\n    return math.pi",
         "test_imports": ["import math"], "test_list": ["assert g() == math.pi"]},
    ])
    taco_io = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
    write_parquet(m / "taco.parquet", [
        {"question": "Add two numbers.", "solutions": json.dumps(["print(sum(map(int, input().split())))"]),
         "input_output": json.dumps(taco_io), "starter_code": "", "difficulty": "EASY"},
        {"question": "Call-based.", "solutions": "[]", "starter_code": "def add(a, b):",
         "input_output": json.dumps({"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}),
         "difficulty": "EASY"},
    ])
    write_jsonl(m / "humaneval.jsonl", [
        {"task_id": "HumanEval/0", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n",
         "canonical_solution": "    return x + 1\n", "entry_point": "inc",
         "test": "def check(candidate):\n    assert candidate(1) == 2\n"}])
    path = build("code_problems", name="code", manual_dir=str(m), data_dir=str(tmp_path / "data"),
                 splits={"train": ["mbpp.jsonl", "taco.parquet"], "test": ["humaneval.jsonl"]})
    src = open_split(path, "train")
    rows = [{k: v.decode() for k, v in src[i].items()} for i in range(len(src))]
    assert [r["test_style"] for r in rows] == ["mbpp", "mbpp", "taco", "taco"]
    assert [r["id"] for r in rows] == ["11", "12", "taco-0", "taco-1"]
    assert json.loads(rows[0]["tests"]) == {"asserts": ["assert f('a') == 'a'", "assert f('') == ''"], "setup": ""}
    assert json.loads(rows[1]["tests"]) == {"asserts": ["assert g() == math.pi"], "setup": "import math"}
    assert rows[1]["problem"] == "Sanitized."
    assert json.loads(rows[2]["tests"]) == {**taco_io, "fn_name": None, "starter_code": ""}
    assert rows[2]["reference"] == "print(sum(map(int, input().split())))"
    assert json.loads(rows[3]["tests"]) == {"inputs": [[1, 2]], "outputs": [3], "fn_name": "add",
                                            "starter_code": "def add(a, b):"}
    assert rows[3]["reference"] == ""
    (he,) = load_examples(path, "test")
    assert he.id == "HumanEval/0" and he.reference == "def inc(x):\n    \"\"\"x + 1\"\"\"\n    return x + 1\n"
    assert json.loads(he.answer) == {"test": "def check(candidate):\n    assert candidate(1) == 2\n",
                                     "entry_point": "inc"}
    assert load_examples(path, "train")[0].answer == rows[0]["tests"]  # the grader's tests are the answer


# ------------------------------------------------------------------------------------ malformed input


def _bad_jsonl(m, rows):
    return write_jsonl(m / "train.jsonl", rows)


GOOD = {"problem": "p", "answer": "1"}
MALFORMED = {
    "missing field": ("math_train", lambda m: _bad_jsonl(m, [GOOD, {"problem": "p", "solution": "no box"}]),
                      ["line 2", "field 'answer'", "missing"]),
    "null": ("math_train", lambda m: write_parquet(m / "train.parquet", [GOOD, GOOD, {"problem": None, "answer": "1"}]),
             ["row 2", "field 'problem'", "null"]),
    "wrong type": ("math_train", lambda m: _bad_jsonl(m, [GOOD, GOOD, GOOD, {"problem": "p", "answer": 1.5}]),
                   ["line 4", "field 'answer'", "expected a string or an integer, got float"]),
    "nested null": ("math_train", lambda m: write_parquet(m / "train.parquet", [
        dapo_row("q", "1", "a"), {**dapo_row("q2", "1", "b"), "reward_model": None}]),
        ["row 1", "field 'reward_model'", "null"]),
    "two user messages": ("math_train", lambda m: _bad_jsonl(m, [
        {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "answer": "1"}]),
        ["line 1", "field 'prompt'", "exactly one user message"]),
    "bad json line": ("math_train", lambda m: _bad_jsonl(m, [GOOD, GOOD, '{"problem": "p", "answer": ']),
                      ["line 3", "invalid JSON"]),
    "json line not an object": ("math_train", lambda m: _bad_jsonl(m, [GOOD, "[1, 2]"]),
                                ["line 2", "expected a JSON object"]),
    "csv": ("math_train", lambda m: (m / "train.csv").write_text("problem,answer\np,1\n"),
            ["train.csv", "unsupported file format '.csv'"]),
    "csv named parquet": ("math_train", lambda m: (m / "train.parquet").write_text("problem,answer\np,1\n"),
                          ["train.parquet", "not a readable parquet file"]),
    "code missing tests": ("code_problems", lambda m: _bad_jsonl(m, [{"text": "t", "code": "c"}]),
                           ["line 1", "field 'tests'", "test_list"]),
    "mbpp assert not a string": ("code_problems", lambda m: _bad_jsonl(m, [{"text": "t", "test_list": ["a", 3]}]),
                                 ["line 1", "field 'test_list[1]'", "expected a string"]),
    "taco io not json": ("code_problems", lambda m: _bad_jsonl(m, [{"question": "q", "input_output": "{bad"}]),
                         ["line 1", "field 'input_output'", "invalid JSON string"]),
    "taco io lengths": ("code_problems", lambda m: _bad_jsonl(m, [
        {"question": "q", "input_output": json.dumps({"inputs": ["1"], "outputs": []})}]),
        ["line 1", "field 'input_output.outputs'"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_names_file_row_field_and_leaves_nothing(tmp_path, case):
    builder, make, expected = MALFORMED[case]
    m = manual(tmp_path)
    make(m)
    data = tmp_path / "data"
    with pytest.raises(ValueError) as e:
        build(builder, name="bad", manual_dir=str(m), data_dir=str(data))
    message = str(e.value)
    file = next(p for p in os.listdir(m))
    assert os.path.join(str(m), file) in message, message
    for part in expected:
        assert part in message, message
    assert built_versions(str(data), builder, "bad") == []  # no dataset, no incomplete.* folder


def test_truncated_parquet(tmp_path):
    m = manual(tmp_path)
    p = write_parquet(m / "train.parquet", [GOOD] * 50)
    with open(p, "rb") as f:
        blob = f.read()
    with open(p, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=rf"{p}: not a readable parquet file"):
        build("math_train", name="t", manual_dir=str(m), data_dir=str(tmp_path / "data"))
    assert built_versions(str(tmp_path / "data"), "math_train", "t") == []


def test_missing_files(tmp_path):
    m = manual(tmp_path)
    write_jsonl(m / "other.jsonl", [GOOD])
    with pytest.raises(FileNotFoundError, match="train\\*"):
        build("math_train", name="x", manual_dir=str(m), data_dir=str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="no file matches 'nope.jsonl'"):
        build("math_train", name="x", manual_dir=str(m), data_dir=str(tmp_path / "d"), splits={"train": ["nope.jsonl"]})


# --------------------------------------------------------------------------------------------- grain


@pytest.fixture(scope="module")
def seven(tmp_path_factory) -> str:
    """A built split of 7 problems: batches of 3 cross an epoch boundary in most epochs."""
    root = tmp_path_factory.mktemp("seven")
    m = manual(root)
    write_jsonl(m / "train.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(7)])
    return build("math_train", name="seven", manual_dir=str(m), data_dir=str(root / "data"))


def ids(batch: list[Example]) -> list[str]:
    return [e.id for e in batch]


def test_grain_shuffle_is_deterministic(seven):
    def order(seed, shuffle=True, n=21):
        return ids(GrainPromptIterator.from_dataset(seven, "train", seed=seed, shuffle=shuffle).next(n))

    a = order(0)
    assert a == order(0)
    assert a != order(1)
    epochs = [a[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == [f"train-{i}" for i in range(7)] for e in epochs)  # each epoch: a permutation
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    assert order(0, shuffle=False, n=9) == [f"train-{i}" for i in list(range(7)) + [0, 1]]


def test_grain_restore_reproduces_following_batches(seven):
    uninterrupted = GrainPromptIterator.from_dataset(seven, "train", seed=5)
    batches, states = [], []
    for _ in range(8):  # 24 examples: three epoch boundaries, two inside a batch
        states.append(json.loads(json.dumps(uninterrupted.state())))  # as a checkpoint stores it
        batches.append(ids(uninterrupted.next(3)))
    for k, state in enumerate(states):
        resumed = GrainPromptIterator.from_dataset(seven, "train", seed=5)
        resumed.restore(state)
        assert [ids(resumed.next(3)) for _ in range(k, 8)] == batches[k:], k
        assert resumed.state() == uninterrupted.state()
    assert states[3] == {"iterator": "grain", "epoch": 1, "index": 2, "records": 7, "seed": 5, "shuffle": True}


def test_grain_restore_rejects_other_states(seven):
    it = GrainPromptIterator.from_dataset(seven, "train", seed=5)
    it.next(4)
    other_seed = GrainPromptIterator.from_dataset(seven, "train", seed=6)
    with pytest.raises(ValueError, match="does not match"):
        other_seed.restore(it.state())
    prompt_iterator = PromptIterator(load_examples(seven, "train"), seed=5)
    with pytest.raises(ValueError, match="does not match"):  # the two iterators' orders differ
        it.restore(prompt_iterator.state())
    with pytest.raises(ValueError, match="does not match"):
        prompt_iterator.restore(it.state())
    with pytest.raises(ValueError, match="out of range"):
        it.restore({**it.state(), "index": 7})
