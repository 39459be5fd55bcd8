"""Export to HQQ's native layout (``config.json`` + ``qmodel.pt``, loadable with
``hqq.models.hf.base.AutoHQQHFModel.from_quantized``).

HQQ dequantizes W = (W_q − zero)·scale with a float zero, so our (s, Z) map over exactly (scale = s, zero = Z,
axis = 1: groups along the input dim). Lossless.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..checkpoint import atomic_output_dir, save_config
from ..packed import QuantLinear

log = logging.getLogger(__name__)


_HQQ_PACKING = {2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", **dict.fromkeys((5, 6, 7, 8), "8bit_u8")}


def _hqq_pack(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, g) uint8 codes → HQQ's packed W_q."""
    if bits in (2, 4):
        planes = 8 // bits
        if rows.shape[0] % planes:
            raise ConfigError(f"HQQ {bits}-bit packing needs out·in/group_size divisible by {planes}")
        parts = rows.reshape(planes, rows.shape[0] // planes, rows.shape[1])
        out = torch.zeros_like(parts[0])
        for i in range(planes):
            out |= parts[i] << (bits * (planes - 1 - i))
        return out
    if bits == 3:
        n = -(-rows.shape[0] // 10) * 10
        padded = torch.zeros(n, rows.shape[1], dtype=torch.int32)
        padded[: rows.shape[0]] = rows.to(torch.int32)
        parts = padded.reshape(10, n // 10, rows.shape[1])
        out = torch.zeros_like(parts[0])
        for i in range(10):
            out |= parts[i] << (3 * (9 - i))
        return out
    return rows.clone()


def hqq_layer_state(layer: QuantLinear, compute_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """The raw (unencoded) state dict HQQLinear.load_state_dict expects for one layer."""
    if layer.bits not in _HQQ_PACKING:
        raise ConfigError(f"HQQ export supports bits 2..8, got {layer.bits}")
    g = layer.group_size
    rows = layer.codes().cpu().reshape(-1, g)  # (out·in/g, g): each row is one group of one output row
    packing = _HQQ_PACKING[layer.bits]
    state: dict[str, Any] = {
        "W_q": _hqq_pack(rows, layer.bits), "nbits": layer.bits, "group_size": g, "axis": 1,
        "shape": torch.Size((layer.out_features, layer.in_features)),
        "scale": layer.scales.detach().cpu().reshape(-1, 1).clone(),
        "zero": layer.zeros.detach().cpu().reshape(-1, 1).clone(),
        "packing": packing, "unpack_view_dtype": torch.int32 if layer.bits == 3 else torch.uint8,
        "compute_dtype": compute_dtype, "view_as_float": False, "quant_scale": False, "quant_zero": False,
        "offload_meta": False, "stores_quant_config": True, "channel_wise": True, "optimize": False,
        "round_zero": False,
    }  # fmt: skip
    if layer.bias is not None:
        state["bias"] = layer.bias.detach().cpu().clone()
    return state


def export_hqq(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write HQQ's ``save_quantized`` layout: config.json + qmodel.pt = {leaf module name: its state dict}."""
    weights: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            weights[name] = hqq_layer_state(module)
        elif not list(module.children()) and name:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            if state:
                weights[name] = state
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_config(model, tmp, None)
        torch.save(weights, tmp / "qmodel.pt")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# --- GPTQ -----------------------------------------------------------------------------------------------
