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


def test_a_program_compiled_in_one_process_is_loaded_by_the_next(tmp_path):
    """Two fresh interpreters compile the same function: the second finds the first's entry on disk (a cache
    hit) instead of compiling again, and the cache is bounded (eviction and its lock on) without tripping on
    an entry that an unbounded writer left."""
    import subprocess
    import sys

    script = ("import jax, jax.numpy as jnp, logging; from trd_jax import compile_cache; compile_cache.enable();"
              "logging.basicConfig(level=logging.DEBUG, format='%(message)s');"
              "logging.getLogger('jax._src.compilation_cache').setLevel(logging.DEBUG);"
              "assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES;"
              "print(jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).sum())")
    env = {**os.environ, compile_cache.ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "written-without-eviction-cache").write_bytes(b"x")  # no -atime file beside it
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout == runs[1].stdout
    assert any(p.name.endswith("-cache") for p in (tmp_path / "cache").iterdir())
    assert "cache hit" not in runs[0].stderr.lower() and "persistent compilation cache hit" in runs[1].stderr.lower()
    # The entry without an access time was stamped, so JAX's eviction pass did not fail the writes.
    assert (tmp_path / "cache" / "written-without-eviction-atime").exists()
    assert not any("error writing persistent compilation cache" in r.stderr.lower() for r in runs)


def test_a_child_given_child_environ_uses_the_cache_without_enabling_it(tmp_path):
    """A plain interpreter that never imports trd_jax, given child_environ's variables, writes the cache and the
    next one loads from it: what the suite's `python -c` scripts rely on."""
    import subprocess
    import sys

    assert compile_cache.child_environ(None) == {}
    script = ("import jax, jax.numpy as jnp, logging; logging.basicConfig(level=logging.DEBUG, format='%(message)s');"
              "logging.getLogger('jax._src.compilation_cache').setLevel(logging.DEBUG);"
              "print(jax.jit(lambda x: jnp.cos(x) * 5 - 2)(jnp.arange(9.0)).sum())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", **compile_cache.child_environ(str(tmp_path)))
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert "persistent compilation cache hit" not in runs[0].stderr.lower()
    assert "persistent compilation cache hit" in runs[1].stderr.lower()
