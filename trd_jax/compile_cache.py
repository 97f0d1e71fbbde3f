"""XLA's persistent compilation cache: runs and tests with the shapes of an earlier one load its compiled
programs from disk instead of compiling again (on 2 CPU cores a run's compilation is several seconds, a
reproduction repeats it hundreds of times, and the test suite's subprocesses each start cold).

TRD_JAX_COMPILATION_CACHE: the cache folder (default ~/.cache/trd_jax/xla); "off" disables it.
"""

from __future__ import annotations

import logging
import os

ENV = "TRD_JAX_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "trd_jax", "xla")
# Every program is cached: on 2 CPU cores even small ones take a noticeable fraction of a second.
MIN_COMPILE_SECONDS = 0.0
# A size bound turns on JAX's least-recently-used eviction, and with it a file lock around every read and
# write: parallel reproduction workers and test workers share the folder, and without the lock one process
# could read an entry another is still writing.
MAX_BYTES = 2 * 1024**3

log = logging.getLogger(__name__)


def cache_dir(environ=os.environ) -> str | None:
    """The folder TRD_JAX_COMPILATION_CACHE names (or the default); None when it says off."""
    value = environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "none"):
        return None
    return os.path.abspath(os.path.expanduser(value or DEFAULT_DIR))


def enable(directory: str | None = None) -> str | None:
    """Points JAX at the cache folder (creating it); returns it, or None when disabled. A folder that cannot
    be created only costs the cache, never the run."""
    import jax

    directory = directory or cache_dir()
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache disabled: cannot create %s (%s); set %s=off to silence this", directory,
                    e, ENV)
        return None
    _add_missing_access_times(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory


def child_environ(directory: str | None) -> dict[str, str]:
    """JAX's own environment variables for what enable() sets: a Python process started with them (a test's
    `python -c` script, a helper) uses the cache from its first compile without importing trd_jax. Empty when
    the cache is off."""
    if directory is None:
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": directory,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_SECONDS),
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "JAX_COMPILATION_CACHE_MAX_SIZE": str(MAX_BYTES)}


def _add_missing_access_times(directory: str) -> None:
    """JAX's eviction reads an access-time file beside every entry and fails every later write (a warning per
    program) when one is missing, which happens to entries written with eviction off (an older trd_jax, or
    plain JAX pointed at the same folder). Such entries get one stamped now."""
    import time

    stamp = time.time_ns().to_bytes(8, "little")
    for name in os.listdir(directory):
        if name.endswith("-cache"):
            atime = os.path.join(directory, name[: -len("-cache")] + "-atime")
            if not os.path.exists(atime):
                try:
                    with open(atime, "wb") as f:
                        f.write(stamp)
                except OSError:
                    return
