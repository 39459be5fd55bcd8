"""Export to an MLX model directory that ``mlx_lm.load`` / ``mlx_lm.generate`` run (affine mode).

MLX's affine quantization stores, per group of g ∈ {32, 64, 128} input columns, a scale and a bias and
dequantizes w = scale·q + bias at k ∈ {2, 3, 4, 5, 6, 8} bits. That is our grid with bias = −s·Z:

    <name>.weight  uint32 (out, in·k/32)  the codes as one little-endian bit stream per row, read as
                                          little-endian uint32 words: exactly neuqi.packing's bytes
    <name>.scales  (out, G)               s
    <name>.biases  (out, G)               −s·Z
    <name>.bias    (out,)                 the layer's own bias, if any

MLX needs scales and biases in one dtype (``mx.dequantize`` with mixed dtypes computes in the scale's dtype),
so ``scale_dtype`` picks both:

* ``float16`` (default; 32 bits per group, as mlx-lm's own fp16 models): s is exact; −s·Z is rounded to fp16,
  |Δw| ≤ 2^-11·|s·Z|, i.e. at most |Z|·2^-11 quantization steps (≈ 0.002 step at 3 bits). ``mx.dequantize``
  also returns fp16 weights (a further relative 2^-11), while ``quantized_matmul`` on fp32 activations computes
  in fp32.
* ``float32`` (64 bits per group): s and −s·Z are exact in fp32 (11-bit × 11-bit mantissas), and
  fl(s·q + (−s·Z)) = fl(s·(q − Z)) since s·q is exact: the weights MLX dequantizes equal ours bit for bit
  (whenever q − Z itself is exact in fp32, i.e. unless |Z| < 2^-13).

config.json is the model's config plus mlx-lm's ``quantization`` entry (mirrored to ``quantization_config`` as
mlx-lm writes it): the most common (bits, group_size) as default and one ``{"group_size", "bits", "mode"}``
entry per layer that differs, which is how mlx-lm's loader reads mixed-precision models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..checkpoint import _unique_tensors, atomic_output_dir, save_config
from ..packed import QuantLinear, quantized_linears

MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def check_mlx_layer(name: str, layer: QuantLinear) -> None:
    """Raise ConfigError naming ``name`` and the constraint if MLX's affine mode cannot hold ``layer``."""
    if layer.bits not in MLX_BITS:
        raise ConfigError(f"{name}: MLX affine quantization supports bits {MLX_BITS}, got {layer.bits}")
    if layer.group_size not in MLX_GROUP_SIZES:
        raise ConfigError(
            f"{name}: MLX affine quantization supports group sizes {MLX_GROUP_SIZES}, got {layer.group_size}"
            + (" (channel-wise)" if layer.group_size == layer.in_features else "")
        )
    if layer.in_features % layer.group_size:
        raise ConfigError(
            f"{name}: in_features {layer.in_features} is not a multiple of the group size {layer.group_size}"
        )


def mlx_layer_tensors(layer: QuantLinear, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """{"weight": uint32 (out, in·k/32), "scales", "biases": (out, G) in ``scale_dtype``, ["bias"]} on the CPU."""
    qweight = layer.qweight.detach().cpu().contiguous()
    words = qweight.view(torch.uint32)  # (out, in·k/32): little-endian words of the byte stream
    s = layer.scales.detach().float().cpu()
    bias = -(s * layer.zeros.detach().float().cpu())  # exact in fp32
    out = {"weight": words, "scales": s.to(scale_dtype), "biases": bias.to(scale_dtype)}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().cpu()
    return out


def mlx_quantization_config(model: nn.Module) -> dict[str, Any]:
    """mlx-lm's ``quantization`` dict: default {group_size, bits, mode} and an entry per layer that differs."""
    specs = {name: (layer.group_size, layer.bits) for name, layer in quantized_linears(model)}
    if not specs:
        raise ConfigError("the model has no QuantLinear layers to export to MLX")
    values = list(specs.values())
    group_size, bits = max(sorted(set(values)), key=values.count)
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for name, (g, k) in specs.items():
        if (g, k) != (group_size, bits):
            config[name] = {"group_size": g, "bits": k, "mode": "affine"}
    return config


def mlx_config(config: dict[str, Any], quantization: dict[str, Any]) -> dict[str, Any]:
    """config.json for mlx-lm: ``quantization`` (and its mirror ``quantization_config``) added to
    ``mlx_rope_config(config)``."""
    config = mlx_rope_config(config)
    config["quantization"] = config["quantization_config"] = quantization
    return config


def mlx_rope_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a transformers config.json with the RoPE settings that transformers ≥ 5 nests in
    ``rope_parameters`` lifted to the top-level keys mlx-lm reads (``rope_theta``, ``partial_rotary_factor``, and
    ``rope_scaling`` for a non-default RoPE type). Without them mlx-lm silently falls back to its defaults (e.g.
    θ = 10000 for Llama), which is a different model."""
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope and config.get(key) is None:
            config[key] = rope[key]
    if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
        config["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return config


def export_mlx(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    scale_dtype: str = "float16",
    overwrite: bool = False,
) -> Path:
    """Write an MLX (mlx-lm) model directory: config.json, model.safetensors, tokenizer files.

    Every QuantLinear becomes an MLX affine QuantizedLinear (see the module docstring for the layout and the
    cost of ``scale_dtype``); every other tensor is stored as is (tied embeddings once). Raises ConfigError
    naming the first layer MLX cannot hold, before anything is written.
    """
    from safetensors.torch import save_file

    if scale_dtype not in SCALE_DTYPES:
        raise ConfigError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
    layers = dict(quantized_linears(model))
    for name, layer in layers.items():
        check_mlx_layer(name, layer)
    quantization = mlx_quantization_config(model)
    tensors: dict[str, torch.Tensor] = {}
    owned = {f"{name}.{s}" for name in layers for s in ("qweight", "scales", "zeros", "bias")}
    for key, t in _unique_tensors(model):
        if key not in owned:
            tensors[key] = t.detach().cpu().contiguous()
    for name, layer in layers.items():
        for part, t in mlx_layer_tensors(layer, SCALE_DTYPES[scale_dtype]).items():
            tensors[f"{name}.{part}"] = t.contiguous()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_config(model, tmp, None)
        config = mlx_config(json.loads((tmp / "config.json").read_text()), quantization)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "mlx"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
