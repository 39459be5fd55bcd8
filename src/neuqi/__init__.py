"""neuqi: low-bit post-training quantization with near-optimal scales and floating-point zero-points (NeUQI).

Public API::

    scale, zero_point = neuqi.init_params(weight, bits=3, group_size=64, method="neuqi", hessian_diag=h)
    w_hat = neuqi.fake_quantize(weight, scale, zero_point, bits=3, group_size=64)
    model = neuqi.load("out/ckpt")            # packed checkpoint → ready model (QuantLinear layers)
    tokenizer = neuqi.load_tokenizer("out/ckpt")
    neuqi.register_transformers()             # then AutoModelForCausalLM.from_pretrained("out/ckpt") works too
    summary = neuqi.quantize_model(model, tokens, neuqi.QuantConfig(bits=3, group_size=64))  # in place
    summary = neuqi.quantize_checkpoint("fp_dir", tokens, neuqi.QuantConfig(), "out")  # layer by layer from disk
    history = neuqi.distill(model, teacher, tokens, neuqi.DistillConfig(loss="mse"))  # trains s, Z in place
"""

from __future__ import annotations

# eager, not lazy: the function `distill` shares its name with the submodule, which would otherwise shadow it
from .distill import DistillConfig, distill
from .formats.hf import register as register_transformers
from .pipeline import QuantConfig, quantize_model
from .pipeline.stream import StreamConfig, quantize_checkpoint
from .quant.grid import QParams, dequantize, fake_quantize, quantize
from .quant.init import available_init_methods, init_params
from .version import __version__

_CHECKPOINT_API = ("load", "load_tokenizer", "save_quantized", "size_report")

__all__ = ["QParams", "dequantize", "fake_quantize", "quantize", "__version__", *_CHECKPOINT_API]
__all__ += ["DistillConfig", "distill"]
__all__ += ["QuantConfig", "quantize_model", "StreamConfig", "quantize_checkpoint"]
__all__ += ["available_init_methods", "init_params"]
__all__ += ["register_transformers"]


def __getattr__(name: str):  # lazy: neuqi.load etc. without importing the checkpoint code up front
    if name in _CHECKPOINT_API:
        from .formats import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'neuqi' has no attribute {name!r}")
