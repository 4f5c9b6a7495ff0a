"""User-facing errors of the reference model package (light: no torch import)."""

from runtime.errors import UserError


class ConfigError(UserError):
    """A user-facing configuration problem (bad preset, bad projector name...)."""


class LoadError(UserError):
    """Weights or configs that cannot be loaded; the message says which and what to do."""
