"""Recipes: the default and every method of the reproduction resolve to valid settings."""

import pytest

from trd_jax.config import resolve
from trd_jax.recipes import METHODS, default_config, method_config, parse_overrides


@pytest.mark.parametrize("setting", ["opd", "opsd"])
def test_every_method_resolves(setting):
    for method in METHODS:
        s = resolve(method_config(method, setting, seed=3))
        assert s.mode == setting and s.seed == 3
        assert s.trajectory == ("y_r" if method.startswith("trd") else "y_o")
        assert s.teacher_context == ("refine" if method == "trd_refine_context" else "vanilla")
    assert dict(resolve(method_config("jsd0.5", setting, 0)).loss.params) == {"beta": 0.5}
    assert dict(resolve(method_config("reverse_kl_top32", setting, 0)).loss.params) == {"k": 32}


def test_default_is_trd_with_bootstrap():
    cfg = default_config()
    s = resolve(cfg)
    assert cfg.bootstrap.enabled and s.trajectory == "y_r" and s.loss.name == "forward_kl" and s.mode == "opd"


def test_parse_overrides():
    assert parse_overrides(["a.b=3", "c=x", "d=true", "e=0.5"]) == {"a.b": 3, "c": "x", "d": True, "e": 0.5}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(["novalue"])
