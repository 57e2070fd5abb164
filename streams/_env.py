"""Reading numbers from the environment the same way in every process: unset or empty means the
default."""

from __future__ import annotations

import os


def env_float(name: str, default: float) -> float:
    """The variable as a float, or `default` when it is unset or empty."""
    value = os.environ.get(name)
    return float(value) if value else default


def env_int(name: str, default: int) -> int:
    """The variable as an int, or `default` when it is unset or empty."""
    value = os.environ.get(name)
    return int(value) if value else default
