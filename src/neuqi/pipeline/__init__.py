"""The layer-wise quantization run: configuration, model loading and calibration data, the architecture adapters,
and the walker that quantizes one decoder layer at a time (replaying finished sub-blocks)."""

from .config import QuantConfig
from .walker import quantize_model

__all__ = ["QuantConfig", "quantize_model"]
