"""One exception hierarchy for every input problem memplan reports.

Each message is a single line that says what is wrong and how to fix it; the
CLI prints it as-is and exits with status 2.
"""

from __future__ import annotations

__all__ = [
    "MemplanError",
    "ConfigError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "SetupError",
    "UnknownGPUError",
    "ProfileError",
    "DeviceUnavailableError",
]


class MemplanError(Exception):
    """Base class: a problem with the user's input, never a bug in memplan."""


class ConfigError(MemplanError):
    """A model config is missing, malformed or has a missing field."""


class UnknownModelError(MemplanError):
    """A model name is neither in the catalog nor a path to a config."""


class UnsupportedArchitectureError(ConfigError):
    """The config's `model_type` is not one memplan can account for."""


class SetupError(MemplanError):
    """The training setup is impossible or contradictory (rank, batch, flags)."""


class UnknownGPUError(MemplanError):
    """A GPU name is not in the catalog."""


class ProfileError(MemplanError):
    """A profile record or campaign file is malformed."""


class DeviceUnavailableError(MemplanError):
    """The requested device (CUDA, NVML) cannot be used on this machine."""
