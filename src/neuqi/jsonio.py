"""Strict JSON for every file neuqi writes: no ``NaN``/``Infinity`` literals, which strict parsers reject.

A non-finite float (a loss that is not defined, a perplexity that overflowed) is written as ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``finite_or_none(obj)`` with ``allow_nan=False`` (keyword arguments as json.dumps)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
