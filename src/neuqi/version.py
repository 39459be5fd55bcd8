"""The version of neuqi (the same as in pyproject.toml), importable from any layer without the package root."""

__version__ = "0.1.0"
