"""Decoder stacks, input capture and linear groups derived for tiny random models of each family."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import BASE, TOKEN_IDS
from torch import nn

from neuqi.errors import ModelError
from neuqi.pipeline import adapters

LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}, LLAMA_GROUPS),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}, LLAMA_GROUPS),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}, LLAMA_GROUPS),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}, LLAMA_GROUPS),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 4}, LLAMA_GROUPS),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {"head_dim": 16, "sliding_window": 4, "num_hidden_layers": 3},
        LLAMA_GROUPS,
    ),
    "phi3": (
        tf.Phi3Config,
        tf.Phi3ForCausalLM,
        {},
        [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
    ),
}


def tiny_model(family: str) -> nn.Module:
    config_cls, model_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**BASE, **TOKEN_IDS, **extra})).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_mapped(family):
    model = tiny_model(family)
    stack = adapters.find_stack(model)
    assert stack.name == "model.layers" and len(stack.layers) == model.config.num_hidden_layers
    assert "model.embed_tokens" in stack.stem and stack.head == ["lm_head"]

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hiddens, calls = adapters.capture_inputs(model, stack, [ids[:1], ids[1:]])
        assert len(hiddens) == 2 and len(calls) == len(stack.layers)
        # replaying the layers with the captured per-layer arguments reproduces the model (Gemma 2/3: the
        # sliding and full attention layers get different masks and position embeddings)
        h = torch.cat(hiddens)
        for layer, (args, kwargs) in zip(stack.layers, calls):
            h = adapters.layer_output(layer(h, *args, **kwargs))
        ref = model.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model.model.norm(h), ref)

    layer, (args, kwargs) = stack.layers[0], calls[0]
    groups = adapters.linear_groups(layer, lambda: layer(hiddens[0], *args, **kwargs))
    assert groups == FAMILIES[family][3]
    # the layers work normally again after the capture
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 12, 128)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) * self.b(x.clone()))  # b reads an equal copy: same group as a


class _Toy(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.small = nn.ModuleList([nn.Linear(8, 8)])
        self.blocks = nn.ModuleList([_Block() for _ in range(n)])
        self.head = nn.Linear(8, 10)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_fallback_largest_module_list_and_groups():
    model = _Toy()
    stack = adapters.find_stack(model)
    assert stack.name == "blocks" and stack.stem == ["embed", "small", "head"] and stack.head == []
    hiddens, calls = adapters.capture_inputs(model, stack, [torch.tensor([[1, 2, 3]])])
    assert calls[0] == ((), {})
    block = stack.layers[0]
    assert adapters.linear_groups(block, lambda: block(hiddens[0])) == [["a", "b"], ["c"]]


def test_unmappable_model_names_what_is_missing():
    with pytest.raises(ModelError, match="no nn.ModuleList of same-class blocks holding nn.Linear"):
        adapters.find_stack(nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4)))
    with pytest.raises(ModelError, match="holds no nn.Linear"):
        adapters.linear_groups(nn.ReLU(), lambda: None)


def test_fit_batch_trims_batch_sized_tensors():
    mask = torch.zeros(4, 1, 5, 5)
    rope = (torch.ones(1, 5, 2), torch.ones(1, 5, 2))
    args, kwargs = adapters.fit_batch(
        ((), {"attention_mask": mask, "position_embeddings": rope, "x": None}), 2
    )
    assert kwargs["attention_mask"].shape[0] == 2 and kwargs["position_embeddings"][0].shape == (1, 5, 2)


def test_layer_output_forms():
    t = torch.ones(2)
    assert adapters.layer_output(t) is t and adapters.layer_output((t, None)) is t
    with pytest.raises(ModelError):
        adapters.layer_output(None)
