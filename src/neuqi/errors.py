"""Exception types raised by neuqi.

Every error a user can cause is one of these, with a message that says what to change.
"""

from __future__ import annotations


class NeuqiError(Exception):
    """Base class of all neuqi errors."""


class ConfigError(NeuqiError, ValueError):
    """A bad option: unsupported bit width, a group size that does not divide, an unknown method, ..."""


class WeightError(NeuqiError, ValueError):
    """A weight that cannot be quantized, e.g. one holding NaN or Inf."""


class DataError(NeuqiError, FileNotFoundError):
    """A missing or unreadable data file or data set."""


class ModelError(NeuqiError, ValueError):
    """A model that cannot be found, loaded or mapped onto decoder layers and linears."""


class CheckpointError(NeuqiError, ValueError):
    """A directory that is not a valid neuqi checkpoint, or whose tensors disagree with its config."""


class NumericalError(NeuqiError, RuntimeError):
    """A numerical failure that retries could not fix (e.g. a Hessian that stays indefinite after damping)."""
