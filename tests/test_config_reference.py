"""docs/configuration.md is generated from trd_jax/config_defaults.py (trd_jax/tools/config_reference.py): it must
match the defaults, list every key with its default, and carry each key's comment."""

import json

from trd_jax.config_defaults import base_config
from trd_jax.tools import config_reference


def test_the_reference_is_up_to_date():
    assert config_reference.main(["--check"]) == 0, "run: python -m trd_jax.tools.config_reference"


def test_every_key_with_its_default_and_comment():
    text = config_reference.render()
    flat = config_reference._flatten(base_config().to_dict())
    for key, value in flat.items():
        assert f"| `{key}` | `{json.dumps(value)}` |" in text.replace("\\|", "|"), key
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(flat) and all(not row.endswith("|  |") for row in rows)  # none without a meaning
    assert "| `rollout.kv_page_size` | `0` | A paged KV cache for continuous batching" in text
    assert "| `student.model.hidden_size` | `64` | `student.model`: Shape of a random initialisation" in text


def test_a_stale_reference_fails_the_check(tmp_path):
    out = tmp_path / "configuration.md"
    out.write_text(config_reference.render().replace("kv_page_size", "page_size"))
    assert config_reference.main(["--check", "--out", str(out)]) == 1
