"""config.mode "generate" (trd_jax/offline/generate.py, shards.py): one call writes the targets of train.steps
steps as atomic shards with a manifest; the rows are the online step's (trajectories, grades) with the
teacher's top-k targets at each response position, equal to scoring the stored rows anew; a killed
generation resumes without duplicating or losing a row; a folder from other settings is refused."""

import json
import os

import numpy as np
import pytest

from helpers.tiny_run import tiny_config
from trd_jax.controller import Trainer
from trd_jax.layouts import distill_batch
from trd_jax.offline import shards
from trd_jax.offline.generate import generate_targets
from trd_jax.offline.topk import teacher_topk

K = 8


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    # Vanilla-context scoring: for OPD the teacher's context is the prompt itself, so a test can score a
    # stored row anew from what the shard holds.
    trainer = Trainer(tiny_config(**{"train.steps": 3, "log.diagnostics": False,
                                     "distill.teacher_context": "vanilla"}), str(root / "run"))
    out = str(root / "targets")
    manifest = generate_targets(trainer, out, k=K)
    return trainer, out, manifest


def test_shards_hold_every_trained_row_with_its_targets(generated):
    trainer, out, manifest = generated
    assert shards.finished_shards(out) == [0, 1, 2]
    rows = list(shards.iter_rows(out))
    assert manifest["counts"]["shards"] == 3 and manifest["counts"]["rows"] == len(rows) > 0
    on_disk = json.load(open(f"{out}/manifest.json"))
    assert on_disk["identity"]["k"] == K and on_disk["counts"]["rows"] == len(rows)
    assert on_disk["config"]["train"]["steps"] == 3 and set(on_disk["models"]) == {"student", "teacher"}
    for row in rows:
        n = len(row["response"])
        assert row["topk_ids"].shape == (n, K) and row["topk_logp"].shape == (n, K)
        assert row["tail"].shape == row["token_logp"].shape == (n,)
        assert np.all(np.diff(row["topk_logp"], axis=1) <= 1e-6)  # most probable first
        assert row["source"] in ("y_r", "y_o") and 0 <= row["y_o_reward"] <= 1
        mass = np.exp(row["topk_logp"]).sum(-1) + np.exp(row["tail"])
        np.testing.assert_allclose(mass, 1.0, atol=1e-4)
    # Each shard is a TFDS dataset that TFDS itself opens from its folder, typed.
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(shards.shard_path(out, 0))
    assert builder.name == "trd_targets" and builder.info.features["topk_logp"].shape == (None, K)
    source = builder.as_data_source(split="train")
    assert len(source) == manifest["counts"]["rows_per_shard"]["0"]
    # The targets of shard 0 equal the teacher's scores of its stored rows computed anew.
    first = shards.read_shard(out, 0)
    assert source[0]["response"].tolist() == first[0]["response"].tolist()
    batch = distill_batch([r["prompt"].tolist() for r in first], [r["response"].tolist() for r in first], pad_id=0)
    params = trainer._teacher_params()
    scored = trainer._score("teacher", params, batch.teacher, batch.targets, batch.response_mask)
    anew = teacher_topk(scored.hidden, trainer.roles.teacher_head(params), batch.targets, batch.response_mask, k=K,
                        temperature=trainer.s.loss.temperature)
    for b, row in enumerate(first):
        n = len(row["response"])
        assert np.asarray(anew.ids)[b, :n].tolist() == row["topk_ids"].tolist()
        np.testing.assert_allclose(np.asarray(anew.logp)[b, :n], row["topk_logp"], atol=1e-5)
        np.testing.assert_allclose(np.asarray(anew.tail)[b, :n], row["tail"], atol=1e-5)
        np.testing.assert_allclose(np.asarray(anew.token_logp)[b, :n], row["token_logp"], atol=1e-5)


def test_a_killed_generation_resumes_without_duplicates(generated, tmp_path):
    trainer, out, manifest = generated
    again = str(tmp_path / "targets")
    generate_targets(trainer, again, k=K, num_shards=1)  # "killed" after shard 0
    cut = os.path.join(os.path.dirname(shards.shard_path(again, 1)), "incomplete.X1Y2Z3_1.0.0")  # TFDS's folder
    os.makedirs(cut)  # of a write cut short
    open(os.path.join(cut, "trd_targets-train.array_record-00000-of-00001"), "wb").write(b"half a shard")
    assert shards.finished_shards(again) == [0]
    resumed = generate_targets(trainer, again, k=K)
    assert shards.finished_shards(again) == [0, 1, 2]
    first, second = list(shards.iter_rows(out)), list(shards.iter_rows(again))
    assert [r["example_id"] for r in first] == [r["example_id"] for r in second]
    for a, b in zip(first, second):
        assert a["response"].tolist() == b["response"].tolist()
        np.testing.assert_allclose(a["topk_logp"], b["topk_logp"], atol=1e-6)
    assert resumed["counts"]["rows"] == len(second)
    with pytest.raises(ValueError, match="k differ"):
        generate_targets(trainer, again, k=K + 1)


def test_a_shard_whose_rows_were_all_dropped_is_finished_and_empty(tmp_path):
    shards.write_shard(str(tmp_path), 4, [], k=K)
    assert shards.finished_shards(str(tmp_path)) == [4] and shards.read_shard(str(tmp_path), 4) == []
    with pytest.raises(ValueError, match="shard 2: a row lacks"):
        shards.write_shard(str(tmp_path), 2, [{"prompt": np.zeros(2, np.int32)}], k=K)
    assert shards.finished_shards(str(tmp_path)) == [4]


def test_generate_mode_needs_a_folder():
    from trd_jax.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="offline.dir"):
        resolve(tiny_config(**{"mode": "generate"}))
    resolve(tiny_config(**{"mode": "generate", "offline.dir": "/tmp/x"}))  # accepted


def _metrics(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("loss", ["forward_kl", "k3"])
def test_training_from_targets_matches_the_online_step_without_a_teacher(tmp_path, loss):
    """OPD on y_o (no rows dropped): shard 0 is step 0's batch, with the whole distribution stored (k >= V). A run
    on the shard trains its first step on the same rows (one shard, one step's rows: grain's shuffle only
    reorders them) with no teacher loaded, and its loss equals the online step's."""
    overrides = {"train.steps": 1, "log.diagnostics": False, "distill.trajectory": "y_o",
                 "distill.teacher_context": "vanilla", "loss.name": loss, "eval.initial": False,
                 "eval.teacher": False}
    online = Trainer(tiny_config(**overrides), str(tmp_path / "online"))
    online_summary = online.run()
    generator = Trainer(tiny_config(**overrides), str(tmp_path / "gen"))
    generate_targets(generator, str(tmp_path / "targets"), k=4096)
    offline = Trainer(tiny_config(**overrides, **{"offline.dir": str(tmp_path / "targets")}),
                      str(tmp_path / "offline"))
    assert offline.roles.teacher_mode == "offline" and offline.roles.frozen_teacher is None
    summary = offline.run()
    assert summary["memory"]["bytes"]["teacher"] == 0 and online_summary["memory"]["bytes"]["teacher"] > 0
    (a,), (b,) = _metrics(tmp_path / "online"), _metrics(tmp_path / "offline")
    assert a["tokens"] == b["tokens"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)


def test_training_needs_generated_targets(tmp_path):
    from trd_jax.config import ConfigError

    with pytest.raises(ConfigError, match="offline.dir.*manifest"):
        Trainer(tiny_config(**{"offline.dir": str(tmp_path / "none")}), str(tmp_path / "run"))


@pytest.mark.slow
def test_rounds_regenerate_with_the_current_student_and_resume_exactly(tmp_path):
    """offline.rounds=2 x steps_per_round=1: round 1's targets come from the student after step 0 (another
    student hash in its manifest); a run halted after step 1 and resumed ends with the weights of an
    uninterrupted one, bit for bit."""
    import jax

    from trd_jax.offline.rounds import round_dir

    overrides = {"train.steps": 2, "log.diagnostics": False, "eval.initial": False, "eval.teacher": False,
                 "offline.rounds": 2, "offline.steps_per_round": 1, "offline.top_k": 16}
    whole = Trainer(tiny_config(**overrides, **{"offline.dir": str(tmp_path / "a")}), str(tmp_path / "run_a"))
    whole.run()
    ids = [shards.read_manifest(round_dir(str(tmp_path / "a"), r))["identity"]["student_sha256"] for r in (0, 1)]
    assert ids[0] != ids[1]
    cfg = tiny_config(**overrides, **{"offline.dir": str(tmp_path / "b")})
    Trainer(cfg, str(tmp_path / "run_b"), halt_after=1).run()
    resumed = Trainer(cfg, str(tmp_path / "run_b"))
    resumed.run()
    for x, y in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    from trd_jax.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="offline.rounds"):
        resolve(tiny_config(**{**overrides, "train.steps": 3, "offline.dir": "x"}))
