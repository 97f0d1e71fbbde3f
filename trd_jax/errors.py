"""The error a bad configuration value raises. Its own module, so that data/, roles and tools can raise it
without importing config (and config can import them without a cycle)."""

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
