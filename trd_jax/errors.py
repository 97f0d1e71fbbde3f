"""The errors a run stops with: a bad configuration value (exit 2) and training that went wrong (exit 3).
Their own module, so that data/, roles and tools can raise them without importing config (and config can
import them without a cycle)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; ``key`` is its dotted path (e.g. "distill.mode")."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config.{key}: {message}")
        self.key = key


def config_error(section: str, error: ValueError, note: str = "") -> ConfigError:
    """A settings dataclass's ValueError "<Class or section>.<field>=<value>: <message>" as a ConfigError on
    "<section>.<field>"."""
    head, _, message = str(error).partition(": ")
    return ConfigError(f"{section}.{head.split('=')[0].split('.')[-1]}", message + note)


class TrainingError(RuntimeError):
    """Training that cannot be reported as a success (e.g. too many non-finite steps skipped). What was written
    before (checkpoints, metrics, summary.json with status "failed") is kept; `summary` is that summary."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


class CheckpointError(RuntimeError):
    """No checkpoint of a run's directory can be trusted (each fails verification); nothing was moved."""
