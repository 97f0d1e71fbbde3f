"""The persistent compilation cache's switch: which folder TRD_JAX_COMPILATION_CACHE names, and that 'off' and an
unwritable folder disable it without failing the run."""

import os

import jax

from trd_jax import compile_cache


def test_cache_dir_reads_the_environment(tmp_path):
    assert compile_cache.cache_dir({}) == os.path.expanduser(os.path.join("~", ".cache", "trd_jax", "xla"))
    assert compile_cache.cache_dir({compile_cache.ENV: str(tmp_path / "x")}) == str(tmp_path / "x")
    assert compile_cache.cache_dir({compile_cache.ENV: "  rel/dir "}) == os.path.abspath("rel/dir")
    for off in ("off", "OFF", "0", "false", "none"):
        assert compile_cache.cache_dir({compile_cache.ENV: off}) is None


def test_enable_points_jax_at_the_folder_and_survives_an_unwritable_one(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        target = tmp_path / "cache"
        assert compile_cache.enable(str(target)) == str(target) and target.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(target)
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        assert compile_cache.enable(str(blocker / "sub")) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
