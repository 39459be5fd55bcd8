"""Export a packed neuqi model to other formats.

* ``export_fp16``: a plain Hugging Face model directory with the dequantized weights Ŵ = s·(q − Z) cast to
  fp16 (or bf16/fp32): evaluate anywhere; no compression.
* ``export_hqq``: HQQ's native layout (``config.json`` + ``qmodel.pt``, loadable with
  ``hqq.models.hf.base.AutoHQQHFModel.from_quantized``). HQQ dequantizes W = (W_q − zero)·scale with a float
  zero, so our (s, Z) map over exactly (scale = s, zero = Z, axis = 1: groups along the input dim). Lossless.
* ``export_gguf_q4_1``: a llama.cpp GGUF file with Q4_1 blocks (32 weights, fp16 d and m, w = d·q + m) for
  every layer with bits ≤ 4 and a group size that is a multiple of 32: d = s, m = fp16(−s·Z). The codes are
  ours unchanged; the only loss is rounding m = −s·Z to fp16: |error| ≤ 2^-11·|s·Z|, i.e. at most |Z|·2^-11
  quantization steps (≈ 0.004 step for Z ≈ 7.5), far below the quantization error itself (~0.29 step RMS).
* ``export_gptq``: an integer zero-point, GPTQ-like layout for engines that cannot take a float zero-point.
  Explicitly LOSSY: Z is rounded to an integer in [0, M] and the codes re-chosen by RTN with the stored
  scales; the per-layer weight MSE this adds is returned and should be reported.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import grid
from .checkpoint import _unique_tensors, atomic_output_dir, save_config
from .errors import ConfigError
from .packed import QuantLinear, quantized_linears
from .packing import pack

log = logging.getLogger(__name__)


def _quant_keys(model: nn.Module) -> dict[str, QuantLinear]:
    return {
        f"{name}.{s}": layer
        for name, layer in quantized_linears(model)
        for s in ("qweight", "scales", "zeros")
    }


def export_fp16(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write a standard HF model directory whose linears hold Ŵ (computed in fp32, then cast to ``dtype``)."""
    from safetensors.torch import save_file

    quant = _quant_keys(model)
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

    quant = _quant_keys(model)
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
    groups = {-1 if layer.group_size == layer.in_features else layer.group_size for layer in quant.values()}
    if len(bits) != 1 or len(groups) != 1:
        raise ConfigError("GPTQ export needs one bit width and group size for all layers")
    qconfig = {
        "quant_method": "gptq",
        "bits": bits.pop(),
        "group_size": groups.pop(),
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
_GGUF_ARCHS = {"llama": "llama", "mistral": "llama"}


def q4_1_blocks(layer: QuantLinear) -> tuple[torch.Tensor, float]:
    """(out, in/32·20) uint8 Q4_1 bytes of ``layer`` and the max |Δw| / s caused by rounding m to fp16."""
    if layer.bits > 4 or layer.group_size % 32:
        raise ConfigError(
            f"Q4_1 needs bits <= 4 and a group size that is a multiple of 32, got {layer.bits}-bit, "
            f"group {layer.group_size}"
        )
    out_f, in_f = layer.out_features, layer.in_features
    per = layer.group_size // 32  # Q4_1 blocks per neuqi group
    scales = layer.scales.detach()
    if scales.dtype != torch.float16 and not torch.equal(scales, scales.half().to(scales.dtype)):
        raise ConfigError("Q4_1 stores fp16 scales; this layer's scales are not fp16 values (was it cast to bf16?)")
    d = scales.cpu().half().repeat_interleave(per, dim=1)  # (out, in/32) fp16, exact
    m32 = -(layer.scales.float() * layer.zeros.float()).cpu()  # exact in fp32 (11-bit × 11-bit mantissas)
    m = m32.half()
    step_err = ((m.float() - m32).abs() / layer.scales.float().cpu()).max().item()
    m = m.repeat_interleave(per, dim=1)
    q = layer.codes().cpu().reshape(out_f, in_f // 32, 2, 16)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)  # (out, nb, 16)
    raw = torch.cat(
        [d.view(torch.uint8).reshape(out_f, -1, 2), m.view(torch.uint8).reshape(out_f, -1, 2), qs], -1
    )
    return raw.reshape(out_f, -1).contiguous(), step_err


def _rope_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (any trailing shape) from HF to llama.cpp RoPE order."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _gguf_tokenizer_from_hf(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> None:
    import json

    import gguf

    backend = (
        json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    )
    if backend.get("model", {}).get("type") != "BPE":
        raise ConfigError(
            "GGUF export converts only byte-level BPE tokenizers; pass tokenizer_gguf= (CLI: "
            "--tokenizer-gguf) to copy the vocabulary from an existing GGUF file"
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: tok for tok, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [
        gguf.TokenType.UNUSED if i not in by_id
        else gguf.TokenType.NORMAL if tok not in added
        else gguf.TokenType.CONTROL if added[tok]
        else gguf.TokenType.USER_DEFINED
        for i, tok in enumerate(tokens)
    ]  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, attr, None) is not None:
            add(getattr(tokenizer, attr))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tokenizer_copy(writer: Any, source: str | os.PathLike) -> None:
    import gguf

    for key, field in gguf.GGUFReader(str(source)).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)


def export_gguf_q4_1(
    model: nn.Module,
    out_path: str | os.PathLike,
    tokenizer: Any = None,
    tokenizer_gguf: str | os.PathLike | None = None,
    tokenizer_pre: str = "default",
    float_type: str = "f16",
    overwrite: bool = False,
) -> float:
    """Write a Llama-architecture model as one GGUF file, quantized linears as Q4_1; returns the max |Δw|/s.

    Unquantized matrices are stored as ``float_type`` ("f16" or "f32"), norms as f32. The vocabulary comes
    from ``tokenizer_gguf`` (copied verbatim, best) or a byte-level BPE ``tokenizer`` with pre-tokenizer name
    ``tokenizer_pre`` (llama.cpp only knows its own names, e.g. "smollm", "llama-bpe"); without either,
    llama.cpp cannot load the file (gguf-py and transformers still can).
    """
    import gguf
    import numpy as np

    cfg = model.config
    arch = _GGUF_ARCHS.get(cfg.model_type)
    if arch is None:
        raise ConfigError(
            f"GGUF export supports {sorted(_GGUF_ARCHS)} models, got model_type {cfg.model_type!r}"
        )
    if float_type not in ("f16", "f32"):
        raise ConfigError(f"float_type must be 'f16' or 'f32', got {float_type!r}")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    n_layers, n_head, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"GGUF export does not support RoPE scaling ({rope}) yet")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(getattr(cfg, "_name_or_path", "") or "neuqi model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_gguf is not None:
        _gguf_tokenizer_copy(writer, tokenizer_gguf)
    elif tokenizer is not None:
        _gguf_tokenizer_from_hf(writer, tokenizer, cfg.vocab_size, tokenizer_pre)
    else:
        log.warning("GGUF export without a tokenizer: llama.cpp will not load %s", out)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    quant = _quant_keys(model)
    worst = 0.0
    for key, t in _unique_tensors(model):
        if key in quant and not key.endswith(".qweight"):
            continue
        stem = key.rsplit(".", 1)[0]
        name = names.get_name(
            stem + (".weight" if key in quant else "." + key.rsplit(".", 1)[1]),
            try_suffixes=(".weight", ".bias"),
        )
        if name is None:
            raise ConfigError(f"no GGUF tensor name for {key!r}")
        heads = n_head if stem.endswith("q_proj") else n_kv if stem.endswith("k_proj") else None
        if key in quant:
            raw, err = q4_1_blocks(quant[key])
            worst = max(worst, err)
            raw = _rope_permute(raw, heads) if heads else raw
            writer.add_tensor(name, raw.numpy(), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            t = t.detach().float().cpu()
            t = _rope_permute(t, heads) if heads else t
            np_dtype = np.float16 if (t.dim() > 1 and float_type == "f16") else np.float32
            writer.add_tensor(name, t.numpy().astype(np_dtype))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return worst
