"""trd_jax.experiments.offline_vs_online for one step on one seed: three processes run (online, generate, offline),
and the results name each one's accuracy, seconds and peak memory, the offline run with no teacher bytes."""

import json

import pytest

from trd_jax.experiments import offline_vs_online


@pytest.mark.slow
def test_one_step_on_one_seed(tmp_path):
    out = str(tmp_path / "result")
    offline_vs_online.main(["--workdir", str(tmp_path / "work"), "--seeds", "3", "--out", out,
                            "--config.train.steps=1", "--config.eval.num_problems=4", "--config.eval.n=2",
                            "--config.eval.initial=false"])
    results = json.load(open(out + ".json"))
    seed = results["seeds"]["3"]
    assert set(seed) == {"online", "generate", "offline"}
    for name in ("online", "generate", "offline"):
        assert seed[name]["seconds"] > 0 and seed[name]["peak_rss_bytes"] > 50 * 2**20
    assert seed["offline"]["teacher_bytes"] == 0 < seed["online"]["teacher_bytes"]
    assert 0 <= seed["offline"]["final"]["avg_at_k"] <= 1 and seed["offline"]["final"]["num_problems"] == 4
    assert seed["generate"]["rows"] > 0 and seed["generate"]["tokens_per_s"] > 0
    text = open(out + ".md").read()
    assert "| 3 | offline |" in text and "peak RSS, offline training / online" in text
