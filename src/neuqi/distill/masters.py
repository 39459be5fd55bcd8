"""fp32 master copies of the trained tensors (spec §6): the trainable stand-in for a QuantLinear, Ŵ = s·(q − Z)
with a hand-written backward, and ``MasterWeights``, which installs them in the model and writes them back."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..formats.packed import QuantLinear, _set_submodule, quantized_linears
from ..quant import grid


class _Dequantize(torch.autograd.Function):
    """Ŵ = s·(q − Z) in ``dtype``, (out, G·g), from codes q (out, G, g) uint8 and fp32 s, Z (out, G).

    Backward in fp32: ∂s = Σ_g dŴ·q − Z·Σ_g dŴ, ∂Z = −s·Σ_g dŴ. Saves only q, s, Z; ~4x cheaper on the CPU
    than autograd through ``grid.dequantize`` of the packed codes.
    """

    @staticmethod
    def forward(ctx, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
        ctx.save_for_backward(codes, s, z)
        with torch.autocast(codes.device.type, enabled=False):
            w = torch.addcmul((-s * z).unsqueeze(-1), codes, s.unsqueeze(-1))  # (out, G, g) fp32
        return w.flatten(1).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, s, z = ctx.saved_tensors
        g = grad.float().view(codes.shape)  # (out, G, g)
        g_sum = g.sum(-1)
        ds = torch.linalg.vecdot(g, codes.float()) - z * g_sum if ctx.needs_input_grad[1] else None
        dz = -s * g_sum if ctx.needs_input_grad[2] else None
        return None, ds, dz, None


class _TrainableQuantLinear(nn.Module):
    """Stands in for a QuantLinear while training: fp32 master s, Z (``nn.Parameter``s) and unpacked codes."""

    def __init__(self, layer: QuantLinear, train_scales: bool, train_zeros: bool) -> None:
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: its fp16 buffers stay out of this module's state
        self.codes = layer.codes().view(layer.out_features, -1, layer.group_size)  # (out, G, g) uint8
        self.scales = nn.Parameter(layer.scales.detach().float(), requires_grad=train_scales)
        self.zeros = nn.Parameter(layer.zeros.detach().float(), requires_grad=train_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = self.layer.bias
        w = _Dequantize.apply(self.codes, self.scales, self.zeros, dtype)  # (out, in)
        return F.linear(x, w, None if bias is None else bias.to(dtype))


class MasterWeights:
    """fp32 master ``nn.Parameter``s of the trained tensors, installed in the model while training.

    Each QuantLinear is replaced by a ``_TrainableQuantLinear`` holding masters of its s and Z. A trained
    norm's ``weight`` is replaced by an fp32 master; if the model is not fp32, a forward hook casts the norm's
    output back to its input dtype. ``finish`` writes the trained values into the original tensors (fp16 s, Z
    through ``grid.to_storage``) and puts the originals back; ``restore`` puts them back untouched.
    """

    def __init__(self, model: nn.Module, train_scales: bool = True, train_zeros: bool = True,
                 train_norms: bool = False) -> None:
        self.model = model
        self.layers = {name: _TrainableQuantLinear(layer, train_scales, train_zeros)
                       for name, layer in quantized_linears(model)}
        for name, trainable in self.layers.items():
            _set_submodule(model, name, trainable)
        self.norms: list[tuple[nn.Module, nn.Parameter, nn.Parameter]] = []
        self._hooks = []
        for norm in norm_modules(model) if train_norms else []:
            original = norm.weight
            norm.weight = nn.Parameter(original.detach().float().clone())
            self.norms.append((norm, original, norm.weight))
            if original.dtype != torch.float32:
                self._hooks.append(norm.register_forward_hook(_cast_output_like_input))
        if not self.parameters():
            raise ModelError("nothing to train: the student has no QuantLinear layers (or norms)")

    def parameters(self) -> list[nn.Parameter]:
        quant = [p for t in self.layers.values() for p in (t.scales, t.zeros) if p.requires_grad]
        return quant + [master for _, _, master in self.norms]

    @torch.no_grad()
    def project(self) -> None:
        """Keep every scale a positive normal fp16 number (storable); called after each optimizer step."""
        for t in self.layers.values():
            t.scales.clamp_(min=grid.MIN_SCALE)

    @torch.no_grad()
    def finish(self) -> None:
        """Write the trained values into the original tensors, then ``restore``."""
        for t in self.layers.values():
            s, z = grid.to_storage(t.scales, t.zeros)
            t.layer.scales.copy_(s)
            t.layer.zeros.copy_(z)
        for _, original, master in self.norms:
            original.copy_(master)
        self.restore()

    def restore(self) -> None:
        """Put the original QuantLinears and norm weights back and remove the hooks."""
        for name, trainable in self.layers.items():
            _set_submodule(self.model, name, trainable.layer)
        for norm, original, _ in self.norms:
            norm.weight = original
        for hook in self._hooks:
            hook.remove()
        self.layers, self.norms, self._hooks = {}, [], []


def _cast_output_like_input(module: nn.Module, args: tuple, output: Any) -> Any:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that look like RMSNorm/LayerNorm: class name ending in ``Norm``, a 1-d ``weight`` parameter."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith("norm")
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1]
