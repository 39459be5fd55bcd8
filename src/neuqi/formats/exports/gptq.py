"""Export to an integer zero-point, GPTQ-like layout for engines that cannot take a float zero-point.

Explicitly LOSSY: Z is rounded to an integer in [0, M] and the codes re-chosen by RTN with the stored scales;
the per-layer weight MSE this adds is returned and should be reported.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...quant import grid
from ..checkpoint import _unique_tensors, atomic_output_dir, save_config
from ..packed import QuantLinear, quantized_tensor_keys
from ..packing import pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerLoss:
    """Weight error added by the integer-zero export: mean((Ŵ_int − Ŵ)²), and that over mean(Ŵ²)."""

    numel: int
    mse: float
    relative: float


def _int32_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(…, n) codes → (…, n·bits/32) int32 words of the little-endian bit stream (= GPTQ's packing)."""
    if codes.shape[-1] * bits % 32:
        raise ConfigError(f"GPTQ int32 packing needs {codes.shape[-1]}·{bits} to be a multiple of 32")
    if sys.byteorder != "little":
        raise ConfigError("GPTQ export assumes a little-endian host")
    return pack(codes, bits).view(torch.int32)


def gptq_layer(layer: QuantLinear) -> tuple[dict[str, torch.Tensor], LayerLoss]:
    """Integer-zero tensors of one layer and the error they add (see module docstring)."""
    bits, g = layer.bits, layer.group_size
    s = layer.scales.float()
    z_int = layer.zeros.float().round().clamp(0, grid.max_code(bits))
    w_hat = layer.dequantized_weight().detach()
    codes = grid.quantize(w_hat, s, z_int, bits, g)
    w_int = grid.dequantize(codes, s, z_int, g)
    mse = (w_int - w_hat).pow(2).mean().item()
    loss = LayerLoss(w_hat.numel(), mse, mse / max(w_hat.pow(2).mean().item(), 1e-30))
    tensors = {
        "qweight": _int32_stream(codes, bits).t().contiguous(),  # (in·bits/32, out)
        "qzeros": _int32_stream(z_int.to(torch.uint8).t().contiguous(), bits),  # (G, out·bits/32)
        "scales": layer.scales.t().contiguous(),  # (G, out) fp16
        "g_idx": (torch.arange(layer.in_features) // g).to(torch.int32),  # (in,)
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().to(torch.float16)
    return tensors, loss


def common_group_size(layers: list[QuantLinear]) -> int:
    """The one ``group_size`` of GPTQ's config that describes every layer: g, or -1 if all are channel-wise.

    A layer whose input width equals its group size is both group-g and channel-wise, so it fits either.
    """
    fits = [{layer.group_size} | ({-1} if layer.group_size == layer.in_features else set()) for layer in layers]
    common = set.intersection(*fits) if fits else set()
    if not common:
        found = sorted({-1 if layer.group_size == layer.in_features else layer.group_size for layer in layers})
        raise ConfigError(f"GPTQ export needs one group size for all layers, got {found} (-1: channel-wise)")
    return -1 if -1 in common else common.pop()


def export_gptq(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> dict[str, LayerLoss]:
    """Write a GPTQ-like directory with INTEGER zero-points (lossy); returns the added error per layer.

    Layout of each quantized linear ``<name>`` (k bits, G groups, little-endian bit streams in int32 words):
    ``qweight`` int32 (in·k/32, out), codes packed along the input dim; ``qzeros`` int32 (G, out·k/32), zeros
    packed along the output dim, stored WITHOUT the legacy GPTQ "−1" offset (GPTQModel's ``gptq_v2``
    convention); ``scales`` fp16 (G, out); ``g_idx`` int32 (in,); ``bias`` fp16.
    W = scales·(q − qzeros) per group.
    """
    from safetensors.torch import save_file

    quant = quantized_tensor_keys(model)
    losses: dict[str, LayerLoss] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in _unique_tensors(model):
        if key not in quant:
            tensors[key] = t.detach().cpu().contiguous()
        elif key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            layer_tensors, losses[name] = gptq_layer(quant[key])
            tensors.update({f"{name}.{k}": v.cpu() for k, v in layer_tensors.items()})
    bits = {layer.bits for layer in quant.values()}
    if len(bits) != 1:
        raise ConfigError(f"GPTQ export needs one bit width for all layers, got {sorted(bits)}")
    qconfig = {
        "quant_method": "gptq",
        "bits": bits.pop(),
        "group_size": common_group_size(list(quant.values())),
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq_v2",
        "true_sequential": True,
        "neuqi_note": "integer zero-points rounded from neuqi's real zero-points; lossy export",
    }
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_config(model, tmp, qconfig)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return losses


def total_loss(losses: dict[str, LayerLoss]) -> LayerLoss:
    """Numel-weighted mean of the per-layer losses."""
    n = sum(v.numel for v in losses.values())
    mse = sum(v.mse * v.numel for v in losses.values()) / max(n, 1)
    rel = sum(v.relative * v.numel for v in losses.values()) / max(n, 1)
    return LayerLoss(n, mse, rel)


# --- GGUF -----------------------------------------------------------------------------------------------
# Facts from gguf-py / ggml: block_q4_1 = {fp16 d, fp16 m, uint8 qs[16]}, qs[j] = q[j] | q[j + 16] << 4, value
# d·q + m. Llama q/k rows are permuted from HF's rotate-half order to llama.cpp's interleaved RoPE order (as
# llama.cpp's convert_hf_to_gguf does); rows carry their codes/scales, so the permutation is exact.
