"""Hook neuqi checkpoints into ``transformers.AutoModelForCausalLM.from_pretrained``.

transformers (≥ 4.46; checked against 5.x) lets third parties add a quantization method with
``transformers.quantizers.register_quantization_config(name)`` (a ``QuantizationConfigMixin`` subclass,
built from config.json's ``quantization_config`` when its ``quant_method`` is ``name``) and
``register_quantizer(name)`` (an ``HfQuantizer`` subclass). For a pre-quantized checkpoint, transformers
builds the model on the meta device, calls ``_process_model_before_weight_loading`` (we swap in empty
QuantLinear layers there) and then loads the safetensors into the module's parameters *and* buffers,
casting each tensor to the dtype of the empty one (so our fp16 scales and zero-points stay fp16 even when
the model is loaded in bf16).

``import neuqi`` calls ``register_on_import()``: registration needs ``transformers.quantizers`` (about 3 s
to import), so it runs at once if that module is already imported and otherwise right after transformers
imports it, via a one-shot import hook. It never raises: if the API is missing or differs, it logs why and
``neuqi.load`` remains the way to load a checkpoint.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_registered: bool | None = None
_TRIGGER = "transformers.quantizers.auto"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """One-shot finder: lets ``transformers.quantizers.auto`` load normally, then calls ``register()``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TRIGGER:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def register_on_import() -> None:
    """Register now if transformers' quantizer registry is loaded, else as soon as transformers loads it."""
    if _TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def register() -> bool:
    """Register the "neuqi" quantization method with transformers, once; True if it is (now) registered."""
    global _registered
    if _registered is not None:
        return _registered
    try:
        _registered = _register()
    except Exception as exc:  # any API drift must not break `import neuqi`
        log.info(
            "neuqi: transformers quantizer registration unavailable (%s: %s); use neuqi.load()",
            type(exc).__name__,
            exc,
        )
        _registered = False
    return _registered


def _register() -> bool:
    # import from the submodules: this may run while the transformers.quantizers package is still initialising
    from transformers.quantizers.auto import (
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .checkpoint import QUANT_METHOD, module_specs, replace_linears

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

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    log.debug("neuqi: registered quantization method %r with transformers", QUANT_METHOD)
    return True
