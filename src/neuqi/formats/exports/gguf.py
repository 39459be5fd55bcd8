"""Export to a llama.cpp GGUF file with Q4_1 blocks (32 weights, fp16 d and m, w = d·q + m).

Every layer needs bits ≤ 4 and a group size that is a multiple of 32: d = s, m = fp16(−s·Z). The codes are ours
unchanged; the only loss is rounding m = −s·Z to fp16: |error| ≤ 2^-11·|s·Z|, i.e. at most |Z|·2^-11 quantization
steps (≈ 0.004 step for Z ≈ 7.5), far below the quantization error itself (~0.29 step RMS).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..checkpoint import _unique_tensors
from ..packed import QuantLinear, quantized_tensor_keys

log = logging.getLogger(__name__)


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


def _llama_shape(cfg: Any) -> tuple[str, int, dict[str, Any]]:
    """(GGUF architecture, head dim, RoPE parameters) of a config; ConfigError if it is not supported."""
    arch = _GGUF_ARCHS.get(cfg.model_type)
    if arch is None:
        raise ConfigError(
            f"GGUF export supports {sorted(_GGUF_ARCHS)} models, got model_type {cfg.model_type!r}"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"GGUF export does not support RoPE scaling ({rope}) yet")
    return arch, head_dim, rope


def _add_hyperparameters(writer: Any, cfg: Any, head_dim: int, rope: dict[str, Any]) -> None:
    import gguf

    writer.add_name(getattr(cfg, "_name_or_path", "") or "neuqi model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensors(writer: Any, model: nn.Module, float_type: str) -> float:
    """Add every tensor of ``model`` under its GGUF name (q/k rows in llama.cpp RoPE order): quantized linears as
    Q4_1 blocks, other matrices as ``float_type``, vectors as f32. Returns the max |Δw|/s of the Q4_1 blocks."""
    import gguf
    import numpy as np

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    quant = quantized_tensor_keys(model)
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
        heads = (cfg.num_attention_heads if stem.endswith("q_proj")
                 else cfg.num_key_value_heads if stem.endswith("k_proj") else None)
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
    return worst


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
    llama.cpp cannot load the file (gguf-py and transformers still can). The file is written under a temporary
    name and renamed at the end.
    """
    import gguf

    arch, head_dim, rope = _llama_shape(model.config)
    if float_type not in ("f16", "f32"):
        raise ConfigError(f"float_type must be 'f16' or 'f32', got {float_type!r}")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    _add_hyperparameters(writer, model.config, head_dim, rope)
    if tokenizer_gguf is not None:
        _gguf_tokenizer_copy(writer, tokenizer_gguf)
    elif tokenizer is not None:
        _gguf_tokenizer_from_hf(writer, tokenizer, model.config.vocab_size, tokenizer_pre)
    else:
        log.warning("GGUF export without a tokenizer: llama.cpp will not load %s", out)
    worst = _add_tensors(writer, model, float_type)
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
