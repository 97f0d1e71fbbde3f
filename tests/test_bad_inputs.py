"""Bad inputs through the real command line: each exits 2 with one line on stderr that names the culprit (the
file, the config key, the path) and the cause, with no traceback, and leaves what was there untouched."""

import os
import shutil
import subprocess
import sys

import pytest

from trd_jax.data.arithmetic import ArithmeticTask
from trd_jax.data.local_task import build_split
from trd_jax.errors import ConfigError
from trd_jax.models.hf_io import save_hf
from trd_jax.models.transformer import init_for_tokenizer
from trd_jax.tokenization import Tokenizer

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
RECIPE = os.path.join(TESTS, "helpers", "tiny_recipe.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tok = ArithmeticTask(str(root / "task")).tokenizer_dir
    model = init_for_tokenizer(Tokenizer.from_dir(tok), seed=0, hidden_size=32, intermediate_size=64, num_layers=1,
                               num_heads=2, num_kv_heads=1, head_dim=16)
    good = save_hf(model, str(root / "good"), tokenizer_dir=tok)
    shutil.copytree(good, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(good, root / "bad_config")
    (root / "bad_config" / "config.json").write_text('{"hidden_size": 32,')
    (root / "a_file").write_text("x")
    (root / "recipe.py").write_text(
        f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom helpers.tiny_run import tiny_config\n\n\n"
        "def get_config():\n    cfg = tiny_config()\n    cfg.train.steps = 'ten'\n    return cfg\n")
    (root / "empty.jsonl").write_text("")
    return root


CASES = {
    "truncated safetensors": (["--config.student.source=path", "--config.student.path={root}/truncated"],
                              "config.student.path: {root}/truncated/model.safetensors: not a readable safetensors"),
    "malformed config.json": (["--config.student.source=path", "--config.student.path={root}/bad_config"],
                              "{root}/bad_config/config.json: not valid JSON (line 1, column 20"),
    "mesh the devices cannot form": (["--config.mesh.data=3"], "config.mesh: mesh: 1 devices are not divisible"),
    "every prompt over the budget": (["--config.task.max_prompt_tokens=2"],
                                     "config.task.max_prompt_tokens: PromptIterator: the split has no usable"),
    "workdir is a file": (["WORKDIR={root}/a_file"], "--workdir {root}/a_file: is a file, not a folder"),
    "a model the bootstrap would replace": (["RECIPE=" + os.path.join(ROOT, "configs", "default.py"),
                                             "--config.student.source=path", "--config.student.path={root}/good"],
                                            "config.student.source: 'path' (path '{root}/good') would be replaced"),
    "recipe sets a wrong type": (["RECIPE={root}/recipe.py"],
                                 '("{root}/recipe.py", line 8): TypeError: Could not override field \'steps\''),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, files, tmp_path):
    args, expected = CASES[case]
    workdir, recipe, extra = str(tmp_path / "run"), RECIPE, []
    for arg in (a.format(root=files) for a in args):
        if arg.startswith("WORKDIR="):
            workdir = arg[len("WORKDIR="):]
        elif arg.startswith("RECIPE="):
            recipe = arg[len("RECIPE="):]
        else:
            extra.append(arg)
    before = sorted(os.listdir(files))
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "trd_jax.main", "--config", recipe, "--workdir", workdir,
                           "--config.eval.initial=False", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected.format(root=files) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(files)) == before and (files / "a_file").read_text() == "x"


def test_an_empty_data_file_is_named(files, tmp_path):
    with pytest.raises(ConfigError, match=r"config\.task\.train_files: .*empty\.jsonl: no examples$"):
        build_split("math_train", str(files / "empty.jsonl"), name="local", data_dir=str(tmp_path), split="train",
                    key="task.train_files")
