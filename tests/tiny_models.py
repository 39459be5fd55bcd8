"""Tiny randomly initialised causal LMs for fast tests, built from a config (nothing is downloaded), and the helpers
several test modules share: fake-quantized and packed tiny Llamas, a byte-level tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neuqi.formats.packed import pack_model
from neuqi.quant import grid
from neuqi.quant.grid import QParams

BASE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
TOKEN_IDS: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_causal_lm(arch: str = "llama", seed: int = 0, attn: str | None = None, **overrides: Any) -> nn.Module:
    """``AutoModelForCausalLM`` of model type ``arch`` with the ``BASE`` sizes updated by ``overrides``, in eval
    mode, initialised from ``torch.manual_seed(seed)``; ``attn`` sets the attention implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**BASE, **overrides})
    if attn is not None:
        config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


# ------------------------------------------------------------------- fake-quantized and packed tiny Llamas
def minmax_qparams(weight: torch.Tensor, bits: int, group_size: int, integer_zero: bool = False) -> QParams:
    """Min-max (s, Z) per group, rounded to their fp16 storage values; Z real unless ``integer_zero``."""
    w = grid.to_groups(weight.detach().float(), group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    s = (hi - lo).clamp_min(1e-6) / grid.max_code(bits)
    z = -lo / s
    s, z = grid.to_storage(s, z.round() if integer_zero else z + 0.25)  # +0.25: an off-grid real zero-point
    return QParams(s, z, bits, group_size)


def fake_quantize_linear(
    linear: nn.Linear, bits: int, group_size: int, integer_zero: bool = False
) -> QParams:
    qp = minmax_qparams(linear.weight, bits, group_size, integer_zero)
    with torch.no_grad():
        linear.weight.copy_(grid.fake_quantize(linear.weight, qp.scale, qp.zero_point, bits, group_size))
    return qp


def tiny_llama(tie: bool = True, seed: int = 0) -> nn.Module:
    """A 2-layer Llama with a 256-token vocabulary and 2048 positions (widths 64, 128: every group size divides)."""
    return tiny_causal_lm("llama", seed, intermediate_size=128, vocab_size=256, max_position_embeddings=2048,
                          tie_word_embeddings=tie)


def fake_quantized_llama(bits: int = 3, group_size: int = 32, tie: bool = True, integer_zero: bool = False):
    """A tiny Llama with fake-quantized decoder linears, and their QParams (what the pipeline returns)."""
    model = tiny_llama(tie)
    qparams = {
        name: fake_quantize_linear(m, bits, group_size, integer_zero)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    }
    return model, qparams


def packed_llama(bits: int = 3, group_size: int = 32, tie: bool = True, integer_zero: bool = False):
    """``fake_quantized_llama`` packed: its decoder linears are QuantLinears."""
    model, qparams = fake_quantized_llama(bits, group_size, tie, integer_zero)
    return pack_model(model, qparams)


TOKENS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 255]])


def logits(model: nn.Module) -> torch.Tensor:
    """The model's logits (1, 8, V) on ``TOKENS``."""
    with torch.no_grad():
        return model(TOKENS).logits


# -------------------------------------------------------------------- byte-level tokenizer and its model
def byte_tokenizer():
    """A real HF fast tokenizer over the 256 byte symbols (no merges, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_byte_lm(arch: str = "llama", attn: str = "sdpa") -> nn.Module:
    """A 3-layer model over ``byte_tokenizer``'s 257 ids (Gemma 2: sliding window and logit soft-capping)."""
    extra = {"sliding_window": 8, "final_logit_softcapping": 30.0, "head_dim": 8} if arch == "gemma2" else {}
    return tiny_causal_lm(arch, attn=attn, vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          max_position_embeddings=256, use_cache=False, **extra)
