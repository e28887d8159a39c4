"""Exception types shared across layers (no dependencies, safe to import anywhere)."""

from __future__ import annotations


class InvalidConfig(ValueError):
    """A configuration value is wrong; ``key`` names it relative to its config object.

    The params loader prefixes ``key`` with the section path, so users see e.g.
    ``generator.init.resolution: must be a power of two between 8 and 1024, got 100``.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


def check_at_least(obj: object, minimum: float, *names: str) -> None:
    """Raises InvalidConfig for the first attribute of ``obj`` in ``names`` below ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise InvalidConfig(name, f"must be >= {minimum}, got {value}")
