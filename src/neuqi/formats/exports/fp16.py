"""Export to a plain Hugging Face model with the dequantized weights Ŵ = s·(q − Z) in fp16 (or bf16/fp32).

No compression; every engine that runs transformers models runs it. Exact up to the chosen dtype.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import _unique_tensors, atomic_output_dir, save_config
from ..packed import quantized_tensor_keys

log = logging.getLogger(__name__)


def export_fp16(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write a standard HF model directory whose linears hold Ŵ (computed in fp32, then cast to ``dtype``)."""
    from safetensors.torch import save_file

    quant = quantized_tensor_keys(model)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in _unique_tensors(model):
        if key.endswith(".qweight") and key in quant:
            t = quant[key].dequantized_weight().detach()
            key = key.removesuffix(".qweight") + ".weight"
        elif key in quant:
            continue
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_config(model, tmp, None)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# --- HQQ ------------------------------------------------------------------------------------------------
# Facts from hqq 0.2.x (hqq/core/quantize.py, bitpack.py): with axis=1 the (out, in) codes are viewed as
# (out·in/g, g); scale and zero are (out·in/g, 1). Packing runs along dim 0 in planes: "4bit_u8" stores rows
# i and i + R/2 as (hi << 4) | lo; "2bit_u8" stores 4 planes with shifts 6, 4, 2, 0; "3bit_32" pads the rows
# to a multiple of 10 and stores 10 planes in int32 with shifts 27, 24, …, 0; 5..8 bits are raw uint8.
