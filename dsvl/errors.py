"""User-facing errors of the reference model package (light: no torch import)."""


class ConfigError(ValueError):
    """A user-facing configuration problem (bad preset, bad projector name...)."""


class LoadError(ValueError):
    """Weights or configs that cannot be loaded; the message says which and what to do."""
