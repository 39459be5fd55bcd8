"""QuantLinear: a linear layer stored as packed integer codes with fp16 scales and fp16 real zero-points.

Stored per layer (out = out_features, G = in_features // group_size, k = bits):

    qweight  uint8  (out, in·k/8)   codes packed along the input dim (neuqi.packing)
    scales   fp16   (out, G)        s
    zeros    fp16   (out, G)        Z, a real number (NeUQI), not an integer
    bias     model dtype (out,)     optional

and the layer computes y = x·Ŵᵀ + b with Ŵ = s·(q − Z) evaluated in fp32 exactly as grid.dequantize, then
cast to the activation dtype. In fp32 its output is bit-identical to an nn.Linear holding the fake-quantized
weight. Casting the module (``model.to(torch.bfloat16)``) casts the bias only: scales and zero-points stay fp16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..quant import grid
from ..quant.grid import QParams
from .packing import pack, packed_width, unpack


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Ŵ = s·(q − Z) in fp32, shape (out, in), from packed codes.

    Differentiable in ``scales`` and ``zeros`` (which may be fp32 trainable tensors): distillation trains
    them with the codes frozen.
    """
    return grid.dequantize(unpack(qweight, bits, in_features), scales, zeros, group_size)


class QuantLinear(nn.Module):
    """Packed k-bit linear layer; see the module docstring for the buffers and the formula.

    ``group_size`` is the effective group size (``in_features`` for channel-wise). Set
    ``cache_weight = True`` to keep the dequantized weight between calls (inference speed at the memory cost
    of a dense weight); the cache is bypassed whenever gradients may flow to ``scales``/``zeros`` and rebuilt
    when any stored tensor changes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = grid.check_bits(bits)
        self.group_size = grid.resolve_group_size(in_features, group_size)
        n_groups = in_features // self.group_size
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.cache_weight = False
        self._cache: tuple | None = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Build from uint8 codes (out, in) and (s, Z) of shape (out, G); s and Z are stored as fp16."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features,
            out_features,
            bits,
            group_size,
            bias=bias is not None,
            device=codes.device,
            dtype=None if bias is None else bias.dtype,
        )
        expected = (out_features, in_features // layer.group_size)
        if tuple(scale.shape) != expected or tuple(zero_point.shape) != expected:
            raise ModelError(
                f"scale {tuple(scale.shape)} / zero_point {tuple(zero_point.shape)} must be {expected} "
                f"for codes {tuple(codes.shape)} with group size {layer.group_size}"
            )
        s, z = grid.to_storage(scale, zero_point)
        with torch.no_grad():
            layer.qweight.copy_(pack(codes, bits))
            layer.scales.copy_(s.half())
            layer.zeros.copy_(z.half())
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        group_size: int,
        exact: bool = True,
    ) -> QuantLinear:
        """Quantize ``linear`` with q = clamp(round(w/s + Z), 0, M), (s, Z) rounded to fp16 first.

        With ``exact`` (the default) the weight must already lie on that grid (a fake-quantized linear): if
        the packed layer would not reproduce it bit for bit in the weight's dtype, raise ModelError.
        """
        weight = linear.weight.detach()
        s, z = grid.to_storage(scale.to(weight.device), zero_point.to(weight.device))
        codes = grid.quantize(weight, s, z, bits, group_size)
        if exact:
            w_hat = grid.dequantize(codes, s, z, group_size).to(weight.dtype)
            if not torch.equal(w_hat, weight):
                err = (w_hat.float() - weight.float()).abs().max().item()
                raise ModelError(
                    f"weight {tuple(weight.shape)} is not on the {bits}-bit grid of its scale/zero-point "
                    f"(max |error| {err:.3g}): it was not fake-quantized with these parameters"
                )
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_codes(codes, s, z, bits, group_size, bias)

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes, shape (out, in)."""
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ = s·(q − Z) in fp32, shape (out, in); differentiable in ``scales``/``zeros``."""
        return dequantize_packed(
            self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
        )

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        trainable = torch.is_grad_enabled() and (self.scales.requires_grad or self.zeros.requires_grad)
        if not self.cache_weight or trainable:
            return self.dequantized_weight().to(dtype)
        sources = (self.qweight, self.scales, self.zeros)
        try:
            key = (dtype, torch.is_inference_mode_enabled(), *(t._version for t in sources))
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return self.dequantized_weight().to(dtype)
        cache = self._cache
        if cache is None or cache[0] != key or any(a is not b for a, b in zip(cache[1], sources)):
            # holding the source tensors means a replaced buffer can never alias a stale entry
            cache = self._cache = (key, sources, self.dequantized_weight().to(dtype).detach())
        return cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._weight(x.dtype), bias)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding Ŵ (cast to ``dtype``, default fp32) and the bias."""
        weight = self.dequantized_weight().detach()
        dtype = dtype or weight.dtype
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.to(dtype))
        return linear

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        """Casts (``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``.float()``) leave ``scales`` and ``zeros`` in fp16,
        since a bf16 cast would round them; device moves reach them as usual."""
        kept = {name: self._buffers.pop(name) for name in ("scales", "zeros")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        self._cache = None
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def pack_model(model: nn.Module, qparams: dict[str, QParams]) -> nn.Module:
    """Replace each fake-quantized nn.Linear named in ``qparams`` by a QuantLinear, in place.

    Raises ModelError if a name is not an nn.Linear or its weight is not on the grid of its parameters.
    """
    for name, qp in qparams.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise ModelError(f"the model has no module {name!r} to pack") from exc
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"{name!r} is a {type(linear).__name__}, not an nn.Linear; cannot pack it")
        try:
            layer = QuantLinear.from_float(linear, qp.scale, qp.zero_point, qp.bits, qp.group_size)
        except ModelError as exc:
            raise ModelError(f"{name}: {exc}") from exc
        _set_submodule(model, name, layer)
    return model


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(qualified name, QuantLinear) for every packed layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def quantized_tensor_keys(model: nn.Module) -> dict[str, QuantLinear]:
    """{state-dict key of every packed tensor (``qweight``, ``scales``, ``zeros``): its QuantLinear}."""
    return {f"{name}.{s}": layer for name, layer in quantized_linears(model) for s in ("qweight", "scales", "zeros")}


def set_weight_cache(model: nn.Module, enabled: bool) -> None:
    """Turn the dequantized-weight cache of every QuantLinear on or off (off frees the cached weights)."""
    for _, layer in quantized_linears(model):
        layer.cache_weight = enabled
        layer._cache = None


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding Ŵ in ``dtype`` (default fp32), in place."""
    for name, layer in list(quantized_linears(model)):
        _set_submodule(model, name, layer.to_linear(dtype))
    return model
