"""Register neuqi checkpoints with ``transformers.AutoModelForCausalLM.from_pretrained``, explicitly.

transformers (≥ 4.46; checked against 5.x) lets third parties add a quantization method with
``transformers.quantizers.register_quantization_config(name)`` (a ``QuantizationConfigMixin`` subclass,
built from config.json's ``quantization_config`` when its ``quant_method`` is ``name``) and
``register_quantizer(name)`` (an ``HfQuantizer`` subclass). For a pre-quantized checkpoint, transformers
builds the model on the meta device, calls ``_process_model_before_weight_loading`` (we swap in empty
QuantLinear layers there) and then loads the safetensors into the module's parameters *and* buffers,
casting each tensor to the dtype of the empty one (so our fp16 scales and zero-points stay fp16 even when
the model is loaded in bf16).

Nothing happens at ``import neuqi``: registration imports ``transformers.quantizers`` (about 3 s) and adds
to transformers' global registry, so it is left to the caller, once, before ``from_pretrained``::

    neuqi.register_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained("runs/smollm2-w3g64")

Without it transformers only warns "Unknown quantization type, got neuqi" and builds plain, randomly initialised
linears. ``neuqi.load`` needs no registration. ``register`` never raises: if the API is missing or differs, it logs
why, returns False, and ``neuqi.load`` remains the way to load a checkpoint.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def register() -> bool:
    """Register the "neuqi" quantization method with transformers, once; True if it is registered.

    Public as ``neuqi.register_transformers()``. False (with a logged warning) when this transformers has no
    usable quantizer registry.
    """
    try:
        return _register()
    except Exception as exc:  # API drift must not break the caller: neuqi.load still works
        log.warning(
            "neuqi: transformers quantizer registration unavailable (%s: %s); use neuqi.load()",
            type(exc).__name__,
            exc,
        )
        return False


def _register() -> bool:
    from transformers.quantizers.auto import (
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .checkpoint import QUANT_METHOD, check_quantized_values, module_specs, replace_linears

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        log.debug("neuqi: quantization method already registered with transformers")
        return True

    @register_quantization_config(QUANT_METHOD)
    class NeuqiConfig(QuantizationConfigMixin):
        """config.json's ``quantization_config`` for neuqi checkpoints, kept verbatim."""

        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)
            self.quant_method = QUANT_METHOD

    @register_quantizer(QUANT_METHOD)
    class NeuqiHfQuantizer(HfQuantizer):
        """Loads pre-quantized neuqi checkpoints (QuantLinear layers); cannot quantize on the fly."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            replace_linears(model, module_specs(self.quantization_config.to_dict()), device="meta")
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            check_quantized_values(model, getattr(model, "name_or_path", "the checkpoint"))
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    log.debug("neuqi: registered quantization method %r with transformers", QUANT_METHOD)
    return True
