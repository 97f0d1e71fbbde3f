"""bootstrap.teacher_from: a bootstrap that changes only the student's settings takes the teacher of another one
instead of training it, and only when that teacher was trained with the same teacher settings."""

import dataclasses
import hashlib
import json
import os

import pytest

from trd_jax.bootstrap import STUDENT_ONLY, bootstrap
from trd_jax.config import BootstrapConfig, ConfigError, ModelShape
from trd_jax.data.arithmetic import ArithmeticConfig, ArithmeticTask
from trd_jax.tokenization import Tokenizer

TINY = BootstrapConfig(teacher=ModelShape(32, 64, 1, 2, 1, 16), student=ModelShape(32, 64, 1, 2, 1, 16),
                       teacher_solve_steps=2, teacher_mixed_steps=2, student_solve_steps=2, student_mixed_steps=2,
                       batch_tokens=512)
# Every student-only setting changed: the teacher trained with these must be the same model.
STUDENT_CHANGED = dataclasses.replace(TINY, student=ModelShape(16, 32, 1, 2, 1, 8), student_solve_steps=1,
                                      student_mixed_steps=3, student_reference_weight=1.0, student_refine_weight=3.0)


def _sha(folder):
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    task = ArithmeticTask(str(tmp_path_factory.mktemp("task")), ArithmeticConfig(train_size=32, eval_size=4))
    return task, Tokenizer.from_dir(task.tokenizer_dir)


def test_the_student_only_settings_are_the_ones_the_teacher_does_not_read():
    changed = {f.name for f in dataclasses.fields(TINY) if getattr(TINY, f.name) != getattr(STUDENT_CHANGED, f.name)}
    assert changed == set(STUDENT_ONLY)


def test_a_student_only_change_reuses_the_teacher(task, tmp_path):
    task, tok = task
    first = bootstrap(task, tok, TINY, str(tmp_path / "a"), from_scratch=True)
    # Trained from scratch with the student's settings changed, the teacher comes out the same model ...
    fresh = bootstrap(task, tok, STUDENT_CHANGED, str(tmp_path / "b"), from_scratch=True)
    assert fresh["identity"] != first["identity"] and _sha(fresh["teacher"]) == _sha(first["teacher"])
    # ... so it is taken from the first bootstrap instead: copied, the student trained, the source recorded.
    source = os.path.dirname(first["teacher"])
    reused = bootstrap(task, tok, STUDENT_CHANGED, str(tmp_path / "c"), from_scratch=True, teacher_from=source)
    assert reused["identity"] == fresh["identity"] and reused["source"] == "trained"
    assert _sha(reused["teacher"]) == _sha(first["teacher"]) and _sha(reused["student"]) == _sha(fresh["student"])
    manifest = json.loads(open(os.path.join(os.path.dirname(reused["teacher"]), "bootstrap.json")).read())
    assert manifest["teacher_from"] == os.path.abspath(source) and manifest["seconds"]["teacher"] < 1.0
    # A teacher setting that differs is refused, naming it; so is a folder that holds no finished bootstrap.
    with pytest.raises(ConfigError, match=r"bootstrap.teacher_from: .*other teacher settings: repair_fraction, "
                                          r"teacher_mixed_steps"):
        bootstrap(task, tok, dataclasses.replace(STUDENT_CHANGED, teacher_mixed_steps=3, repair_fraction=0.2),
                  str(tmp_path / "d"), teacher_from=source)
    with pytest.raises(ConfigError, match="bootstrap.teacher_from: .* is not a finished bootstrap"):
        bootstrap(task, tok, STUDENT_CHANGED, str(tmp_path / "e"), teacher_from=str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "e")
