"""No global patching: ``import neuqi`` hooks nothing, scoped changes (meta parameters, stand-in modules, the oneDNN
precision flag) are undone on exit and leave names and tensors alone; the one decoder-stack finder and lm_head."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import TOKEN_IDS, packed_llama, tiny_causal_lm
from torch import nn

from neuqi.distill import layer_checkpointing
from neuqi.formats.checkpoint import _parameters_on_meta
from neuqi.pipeline import QuantConfig, adapters, quantize_model, replay
from neuqi.pipeline.precision import bf16_gram_applies, bf16_gram_precision

FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gemma2": {"head_dim": 16, "sliding_window": 4, "final_logit_softcapping": 30.0},
    "phi3": {},
}


def tokens(n: int = 6, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def test_import_registers_nothing() -> None:
    """``import neuqi`` adds no import hook and leaves transformers' registry alone until asked."""
    code = (
        "import sys; before = list(sys.meta_path); import neuqi; assert sys.meta_path == before, sys.meta_path; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; assert 'neuqi' not in m; "
        "assert neuqi.register_transformers() and 'neuqi' in m"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_parameters_on_meta_is_scoped() -> None:
    register = nn.Module.register_parameter
    with _parameters_on_meta():
        assert nn.Module.register_parameter is register  # no class attribute is swapped
        norm = nn.BatchNorm1d(4)
        assert norm.weight.device.type == "meta" and norm.running_mean.device.type == "cpu"  # buffers stay real
    assert nn.Linear(2, 2).weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="boom"), _parameters_on_meta():
        raise RuntimeError("boom")
    assert nn.Linear(2, 2).weight.device.type == "cpu"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_replay_is_bit_identical_and_restores_the_layer(family, monkeypatch) -> None:
    """With replay on, the layer's children are swapped for stand-ins while groups are quantized: names and tensors
    stay the same throughout, and afterwards the original children are back with nothing patched."""
    seen: list[bool] = []
    group_done = replay.Replay.group_done

    def checking_group_done(self: replay.Replay) -> None:
        names, tensors = [n for n, _ in self._layer.named_modules()], dict(self._layer.state_dict(keep_vars=True))
        group_done(self)
        assert [n for n, _ in self._layer.named_modules()] == names
        after = self._layer.state_dict(keep_vars=True)
        assert after.keys() == tensors.keys() and all(after[k] is t for k, t in tensors.items())
        seen.append(any(isinstance(c, adapters.StandIn) for c in self._layer.children()))

    monkeypatch.setattr(replay.Replay, "group_done", checking_group_done)
    config = QuantConfig(bits=3, group_size=16, init="minmax", batch_size=2)
    results = {}
    for enabled in (True, False):
        model = tiny_causal_lm(family, **TOKEN_IDS, **FAMILIES[family])
        children = {n: type(m) for n, m in model.named_modules()}
        seen.clear()
        quantize_model(model, tokens(), config, progress=False, replay_activations=enabled)
        assert any(seen) == enabled
        assert {n: type(m) for n, m in model.named_modules()} == children
        assert not any("forward" in m.__dict__ for m in model.modules())
        results[enabled] = model.state_dict()
    assert all(torch.equal(results[True][k], results[False][k]) for k in results[True])


def test_capture_and_checkpointing_put_the_layers_back() -> None:
    model = packed_llama()
    stack = adapters.find_stack(model)  # knows QuantLinear
    assert stack.name == "model.layers" and stack.head == ["lm_head"] and "model.embed_tokens" in stack.stem
    originals = list(stack.layers)
    names = [n for n, _ in model.named_modules()]
    adapters.capture_inputs(model, stack, [tokens(2)])
    assert all(a is b for a, b in zip(stack.layers, originals))
    with layer_checkpointing(stack.layers):
        assert all(isinstance(layer, adapters.StandIn) for layer in stack.layers)
        assert [n for n, _ in model.named_modules()] == names
        model(input_ids=tokens(1))
    assert all(a is b for a, b in zip(stack.layers, originals))


def test_lm_head_applies_the_final_logit_softcap() -> None:
    model = tiny_causal_lm("gemma2", **TOKEN_IDS, **FAMILIES["gemma2"])
    ids = tokens(2)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
        head = adapters.lm_head(model)
        torch.testing.assert_close(head(hidden), logits, rtol=0, atol=1e-6)
        assert not torch.allclose(model.lm_head(hidden), logits)  # the cap matters here


def test_bf16_gram_precision_is_scoped() -> None:
    flags = getattr(torch.backends.mkldnn, "matmul", None)
    if not hasattr(flags, "fp32_precision"):
        pytest.skip("this torch has no oneDNN matmul precision flag")
    before = flags.fp32_precision
    x = torch.randn(4096, 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = x.double().T @ x.double()
    fp32 = x.float().T @ x.float()
    assert bf16_gram_applies(x.dtype, x.device) and not bf16_gram_applies(torch.float32, "cpu")
    with bf16_gram_precision() as on:
        assert on and flags.fp32_precision == "bf16"
        got = x.float().T @ x.float()
    assert flags.fp32_precision == before
    # bf16·bf16 products are exact in fp32: only the summation order differs from the fp32 product
    assert float((got.double() - ref).abs().max()) <= 4 * float((fp32.double() - ref).abs().max()) + 1e-3
    with pytest.raises(RuntimeError, match="boom"), bf16_gram_precision():
        raise RuntimeError("boom")
    assert flags.fp32_precision == before
    with bf16_gram_precision(enabled=False) as on:
        assert not on and flags.fp32_precision == before


@pytest.mark.parametrize("family, attn", [("llama", "sdpa"), ("llama", "eager"), ("gemma2", "eager"), ("phi3", "sdpa")])
def test_bf16_layer_forwards_ignore_the_gram_precision(family, attn) -> None:
    """The premise of scoping the flag over a bf16 layer's Hessian pass: a bf16 forward runs no fp32 matmul, so it
    computes the same inside the block."""
    if not bf16_gram_applies(torch.bfloat16, "cpu"):
        pytest.skip("this torch has no oneDNN matmul precision flag")
    model = tiny_causal_lm(family, attn=attn, **TOKEN_IDS, **FAMILIES[family]).to(torch.bfloat16)
    with torch.no_grad():
        outside = model(input_ids=tokens(2)).logits
        with bf16_gram_precision():
            inside = model(input_ids=tokens(2)).logits
    assert torch.equal(inside, outside)
