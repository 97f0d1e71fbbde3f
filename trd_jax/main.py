"""Command line: python -m trd_jax.main --config configs/<name>.py --workdir DIR [--config.a.b=value ...]

config.mode "train" distils (resuming from DIR's latest checkpoint), evaluates and exports; "eval" only
evaluates the student. A bad flag or config value prints one line naming the key and exits with code 2
before any work starts.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file with get_config(), e.g. configs/default.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evals, export, summary.json.")

USAGE_ERROR = 2
TRAINING_ERROR = 3  # training ran but cannot be reported as a success (errors.TrainingError)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _unknown_override(argv: list[str]) -> str | None:
    """The first --config.<key> override naming a key that no config has, with a suggestion."""
    import difflib

    from trd_jax.config import base_config

    known = base_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node = known
        for depth, part in enumerate(key.split(".")):
            if not hasattr(node, "keys") or part not in node:
                options = list(node.keys()) if hasattr(node, "keys") else []
                near = difflib.get_close_matches(part, options, n=1)
                prefix = ".".join(key.split(".")[:depth])
                hint = f" (did you mean {'.'.join(filter(None, [prefix, near[0]]))}?)" if near else ""
                return f"config.{key}: unknown key{hint}"
            node = node[part]
    return None


def _flag_error_line(message: str) -> str:
    """One line for a flag error. A recipe file that raised while loading comes with the traceback inside the
    message: keep its first line, the recipe's own line number and the exception at the end."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Traceback (most recent call last):" not in lines:
        return lines[0] if lines else message
    head = lines[0].rstrip(":")
    recipe = head.split("=", 1)[1].split(":", 1)[0] if "=" in head else ""
    where = [line for line in lines if line.startswith("File ") and recipe and f'"{recipe}"' in line]
    at = f" ({where[-1].split(', in ')[0].replace('File ', '')})" if where else ""
    return f"{head}{at}: {lines[-1]}"


def _check_workdir(workdir: str) -> None:
    """The run folder must be a folder this process can create or write into."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(f"--workdir {workdir}: is a file, not a folder")
    parent = path
    while not os.path.exists(parent):  # the nearest existing ancestor must take new folders
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        _fail(f"--workdir {workdir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"--workdir {workdir}: {parent} is not writable")


def parse(argv: list[str]):
    """Parses flags and loads the config file; every problem becomes one line on stderr and exit code 2."""
    try:
        FLAGS(argv)
        cfg = _CONFIG.value
        if cfg is not None:
            cfg.keys()  # config_flags reports a config file that failed to load only on first use
    except flags.Error as e:
        _fail(_flag_error_line(str(e)))
    except (KeyError, AttributeError) as e:  # an override naming a missing key
        _fail(_unknown_override(argv) or f"{type(e).__name__}: {e}".replace("\n", " "))
    except (OSError, TypeError, ValueError, SyntaxError, ImportError) as e:  # the recipe file itself
        _fail(" ".join(str(e).split()))
    if _CONFIG.value is None:
        _fail("--config is required (e.g. --config configs/default.py)")
    if not _WORKDIR.value:
        _fail("--workdir is required")
    _check_workdir(_WORKDIR.value)
    return _CONFIG.value, _WORKDIR.value


def main(argv: list[str] | None = None) -> int:
    cfg, workdir = parse(list(sys.argv if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from trd_jax.config import ConfigError, resolve
    from trd_jax.errors import CheckpointError, TrainingError
    from trd_jax.distributed import maybe_initialize

    try:
        settings = resolve(cfg)  # the only resolution of this run: the Trainer takes these settings as they are
    except ConfigError as e:
        _fail(str(e))
    maybe_initialize()
    import jax

    from trd_jax import compile_cache

    compile_cache.enable()

    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # host-0-only logging

    from trd_jax.controller import Trainer
    from trd_jax.reports import print_run_report

    try:
        trainer = Trainer(cfg, os.path.abspath(workdir), settings=settings)
        if cfg.mode == "eval":
            summary = trainer.evaluate_only()
        elif cfg.mode == "generate":
            from trd_jax.offline.generate import generate_targets
            from trd_jax.offline.teacher_job import serve_rounds

            o = settings.offline
            manifests = serve_rounds(trainer) if o.teacher_job else [
                generate_targets(trainer, os.path.abspath(o.dir), k=o.top_k)]
            counts = [m["counts"] for m in manifests]
            if jax.process_index() == 0:
                print(f"offline targets in {o.dir}: {len(manifests)} round(s), {sum(c['shards'] for c in counts)} "
                      f"shards, {sum(c['rows'] for c in counts)} rows, k={manifests[0]['identity']['k']}")
            return 0
        else:
            summary = trainer.run()
    except (ConfigError, CheckpointError) as e:
        _fail(str(e))
    except TrainingError as e:
        if jax.process_index() == 0 and e.summary:
            print_run_report(e.summary, workdir)
        print(f"error: {e}", file=sys.stderr)
        return TRAINING_ERROR
    if jax.process_index() == 0:
        print_run_report(summary, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
