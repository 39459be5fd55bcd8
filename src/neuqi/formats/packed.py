"""QuantLinear: a linear layer stored as packed integer codes with fp16 scales and fp16 real zero-points.

Stored per layer (out = out_features, G = in_features // group_size, k = bits):

    qweight  uint8  (out, in·k/8)   codes packed along the input dim (neuqi.packing)
    scales   fp16   (out, G)        s
    zeros    fp16   (out, G)        Z, a real number (NeUQI), not an integer
    bias     model dtype (out,)     optional

and the layer computes y = x·Ŵᵀ + b with Ŵ = s·(q − Z) evaluated in fp32 exactly as grid.dequantize, then
cast to the activation dtype. In fp32 its output is bit-identical to an nn.Linear holding the fake-quantized
weight. Casting the module (``model.to(torch.bfloat16)``) casts the bias only: scales and zero-points stay fp16.

Inference runs through neuqi.formats.kernels (``QuantLinear.kernel``): ``"auto"`` (default) sends decode-sized
bf16 calls (≤ kernels.INT4_MAX_ROWS rows) of ≤ 4-bit layers to torch's int4 weight-only matmul (a kernel layout
built on first use, 4 bits per weight, not saved) and everything else to an exact, cache-free fast
dequantize-then-matmul; ``"dequant"`` never uses the int4 kernel; ``"int4"`` uses it whenever it can;
``"reference"`` is the plain ``F.linear(x, Ŵ.to(dtype))``. Training (trainable scales/zeros) always takes the
reference path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..quant import grid
from ..quant.grid import QParams
from . import kernels
from .packing import pack, packed_width, unpack

KERNELS = ("auto", "int4", "dequant", "reference")


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
    return grid._dequantize(unpack(qweight, bits, in_features), scales, zeros, group_size)  # hot path: unchecked


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
        self.kernel = "auto"
        self._cache: tuple | None = None
        self._int4: tuple | None = None

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

    def int4_weight(self, dtype: torch.dtype) -> kernels.Int4Weight | None:
        """The int4-kernel layout for activations of ``dtype`` (built once, rebuilt if the buffers change), or
        None when the kernel cannot run this layer (kernels.int4_unsupported says why)."""
        device = self.qweight.device
        if kernels.int4_unsupported(self.out_features, self.in_features, self.bits, self.group_size, device, dtype):
            return None
        sources = (self.qweight, self.scales, self.zeros)
        try:
            key = (device, dtype, *(t._version for t in sources))
        except RuntimeError:  # inference tensors: no version counter, and no in-place change outside inference mode
            key = (device, dtype)
        cache = self._int4
        if cache is None or cache[0] != key or any(a is not b for a, b in zip(cache[1], sources)):
            self._int4 = None  # free the old layout before building the new one
            with torch.no_grad():
                w = kernels.build_int4(self.codes(), self.scales, self.zeros, self.group_size, dtype, self.bits)
            self._int4 = cache = (key, sources, w)  # holding the sources: a replaced buffer never aliases
        return cache[2]

    def runtime_bytes(self) -> int:
        """Bytes held beyond the saved buffers: the int4 layout and/or the dense weight cache, if built."""
        int4 = 0 if self._int4 is None else self._int4[2].nbytes
        return int4 + (0 if self._cache is None else self._cache[2].nbytes)

    def _fast_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bits in (2, 3, 4, 8):
            w = kernels.dequantize_fast(
                self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
            )
            return w.to(dtype)
        return self.dequantized_weight().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        trainable = torch.is_grad_enabled() and (self.scales.requires_grad or self.zeros.requires_grad)
        if self.kernel == "reference" or self.cache_weight or trainable:
            return F.linear(x, self._weight(x.dtype), bias)
        if self.kernel not in KERNELS:
            raise ModelError(f"QuantLinear.kernel must be one of {KERNELS}, got {self.kernel!r}")
        rows = x.numel() // self.in_features
        wanted = self.kernel == "int4" or (self.kernel == "auto" and rows <= kernels.INT4_MAX_ROWS)
        if wanted and not (x.requires_grad and torch.is_grad_enabled()):  # the int4 op has no autograd
            w4 = self.int4_weight(x.dtype)
            if w4 is not None:
                y = kernels.int4_matmul(x.reshape(rows, self.in_features), w4).reshape(*x.shape[:-1], -1)
                return y if bias is None else y + bias
        return F.linear(x, self._fast_weight(x.dtype), bias)

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
        self._cache = self._int4 = None
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


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Set the forward path of every QuantLinear (see the module docstring); frees any int4 layout built."""
    if kernel not in KERNELS:
        raise ModelError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    for _, layer in quantized_linears(model):
        layer.kernel = kernel
        layer._int4 = None


def runtime_bytes(model: nn.Module) -> int:
    """Bytes the QuantLinears of ``model`` hold beyond their saved buffers (int4 layouts, dense caches)."""
    return sum(layer.runtime_bytes() for _, layer in quantized_linears(model))


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
