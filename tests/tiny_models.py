"""Tiny randomly initialised causal LMs for fast tests: built from a config, nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
