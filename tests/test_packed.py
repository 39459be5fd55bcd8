"""QuantLinear, pack_model and the neuqi checkpoint format (save/load, atomic writes, bad input)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import (
    TOKENS,
    fake_quantize_linear,
    fake_quantized_llama,
    logits,
    minmax_qparams,
    packed_llama,
)
from torch import nn

import neuqi
from neuqi.errors import CheckpointError, ModelError
from neuqi.formats import kernels
from neuqi.formats.checkpoint import load, read_quantization_config, save_quantized, size_report
from neuqi.formats.packed import (
    QuantLinear,
    dequantize_packed,
    pack_model,
    quantized_linears,
    runtime_bytes,
    set_kernel,
    set_weight_cache,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- QuantLinear ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits,group_size,bias", [(2, 16, True), (3, 32, False), (4, -1, True), (8, 64, False)]
)
def test_forward_bit_exact_vs_fake_quant(bits: int, group_size: int, bias: bool) -> None:
    torch.manual_seed(bits)
    linear = nn.Linear(64, 24, bias=bias)
    qp = fake_quantize_linear(linear, bits, group_size)
    layer = QuantLinear.from_float(linear, qp.scale, qp.zero_point, bits, group_size)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), linear(x))
    assert torch.equal(layer.dequantized_weight(), linear.weight)
    assert layer.qweight.shape == (24, 64 * bits // 8) and layer.scales.dtype == torch.float16
    assert not torch.equal(layer.zeros, layer.zeros.round())  # the zero-points really are real-valued


def test_from_float_refuses_off_grid_weight() -> None:
    linear = nn.Linear(32, 8)
    qp = minmax_qparams(
        linear.weight, 3, 16
    )  # parameters of this weight, but the weight was not fake-quantized
    with pytest.raises(ModelError, match="not on the 3-bit grid"):
        QuantLinear.from_float(linear, qp.scale, qp.zero_point, 3, 16)
    QuantLinear.from_float(linear, qp.scale, qp.zero_point, 3, 16, exact=False)  # plain RTN is allowed


def test_bf16_model_and_dtype_follow_input() -> None:
    linear = nn.Linear(32, 8).to(torch.bfloat16)
    qp = fake_quantize_linear(linear, 4, 32)
    layer = QuantLinear.from_float(linear, qp.scale, qp.zero_point, 4, 32)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16 and torch.equal(layer(x), linear(x))


def test_casting_the_model_keeps_fp16_scales_and_zero_points() -> None:
    model, qparams = fake_quantized_llama(3, 32)
    pack_model(model, qparams)
    x = torch.randint(0, 256, (1, 12))
    name, layer = next(quantized_linears(model))
    scales, zeros = layer.scales.clone(), layer.zeros.clone()
    assert not torch.equal(scales.bfloat16().half(), scales)  # a bf16 cast would round them
    reference = layer.dequantized_weight()
    model.to(torch.bfloat16)
    assert layer.scales.dtype == layer.zeros.dtype == torch.float16
    assert torch.equal(layer.scales, scales) and torch.equal(layer.zeros, zeros)
    assert torch.equal(layer.dequantized_weight(), reference) and model(x).logits.dtype == torch.bfloat16
    model.float()
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.dequantized_weight(), reference)
    assert model.get_submodule(name) is layer


def test_trainable_scales_get_gradients_and_cache_is_safe() -> None:
    linear = nn.Linear(32, 8)
    qp = fake_quantize_linear(linear, 3, 16)
    layer = QuantLinear.from_float(linear, qp.scale, qp.zero_point, 3, 16)
    layer.cache_weight = True
    x = torch.randn(4, 32)
    y0 = layer(x)
    with torch.no_grad():
        layer.scales.mul_(2)  # in-place change must invalidate the cache
    y1 = layer(x)
    assert not torch.allclose(y1, y0)
    layer.zeros = layer.zeros + 1  # a replaced buffer must invalidate it too
    assert not torch.allclose(layer(x), y1)
    with torch.inference_mode():
        assert torch.equal(layer(x), layer(x))
    layer.scales = nn.Parameter(layer.scales.float())  # distillation: fp32 master parameters
    layer.zeros = nn.Parameter(layer.zeros.float())
    layer(x).sum().backward()
    assert layer.scales.grad is not None and layer.zeros.grad.abs().sum() > 0
    w = dequantize_packed(layer.qweight, layer.scales, layer.zeros, 3, 16, 32)
    assert w.requires_grad and w.shape == (8, 32)


def test_pack_model_errors_name_the_layer() -> None:
    model, qparams = fake_quantized_llama()
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.add_(1e-3)
    with pytest.raises(ModelError, match=name):
        pack_model(model, qparams)
    with pytest.raises(ModelError, match="no module"):
        pack_model(model, {"model.nope": qparams[name]})
    with pytest.raises(ModelError, match="not an nn.Linear"):
        pack_model(model, {"model.norm": qparams[name]})


def test_pack_model_keeps_logits() -> None:
    model, qparams = fake_quantized_llama(bits=2, group_size=16)
    before = logits(model)
    pack_model(model, qparams)
    assert len(list(quantized_linears(model))) == 14
    assert torch.equal(logits(model), before)
    set_weight_cache(model, True)
    assert torch.equal(logits(model), before)


# --- checkpoint ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_identical_logits(tmp_path, tie: bool) -> None:
    model = packed_llama(bits=3, group_size=32, tie=tie)
    out = save_quantized(model, tmp_path / "ck", quant_config={"method": "minmax"})
    qc = read_quantization_config(out)
    assert (qc["bits"], qc["group_size"], qc["method"], len(qc["modules"])) == (3, 32, "minmax", 14)
    loaded = load(out)
    assert torch.equal(logits(loaded), logits(model))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    q = loaded.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.scales.dtype == q.zeros.dtype == torch.float16
    if tie:  # a tied matrix is stored once
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_transformers_from_pretrained(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = packed_llama(bits=4, group_size=-1)
    save_quantized(model, tmp_path / "ck")
    assert neuqi.register_transformers()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, QuantLinear)
    assert torch.equal(logits(hf), logits(model))
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert hf16.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # not rounded to bf16


def test_size_report(tmp_path) -> None:
    model = packed_llama(bits=3, group_size=32)
    out = save_quantized(model, tmp_path / "ck")
    report = size_report(model, out)
    assert report.bits_per_weight == pytest.approx(
        3 + 32 / 32
    )  # codes + fp16 scale + fp16 zero per 32 weights
    assert report.quantized_weights == 2 * (4 * 64 * 64 // 2 + 2 * 64 * 32 + 3 * 64 * 128)
    assert report.total_bytes < report.file_bytes < report.total_bytes + 20_000  # + header and json


def test_atomic_write_and_refusal(tmp_path) -> None:
    model = packed_llama()
    out = tmp_path / "ck"
    save_quantized(model, out)
    with pytest.raises(CheckpointError, match="not empty"):
        save_quantized(model, out)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_quantized(packed_llama(bits=2), out, tokenizer=BrokenTokenizer(), overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left behind
    save_quantized(packed_llama(bits=2), out, overwrite=True)
    assert read_quantization_config(out)["bits"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_bad_inputs_raise_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
    model = packed_llama(bits=3, group_size=32)
    model.config.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a neuqi checkpoint"):
        load(tmp_path / "plain")

    out = save_quantized(model, tmp_path / "ck")
    weights = (out / "model.safetensors").read_bytes()
    config = json.loads((out / "config.json").read_text())

    (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(out)
    (out / "model.safetensors").write_bytes(weights)

    for key, value in (("bits", 4), ("group_size", 16)):
        bad = json.loads(json.dumps(config))
        bad["quantization_config"][key] = value
        (out / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="disagree with quantization_config"):
            load(out)
    bad = json.loads(json.dumps(config))
    bad["quantization_config"]["group_size"] = 48  # does not divide 64
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="does not divide"):
        load(out)
    (out / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(load(out)), logits(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_and_forward(tmp_path) -> None:
    model = packed_llama(bits=4, group_size=32)
    loaded = load(save_quantized(model, tmp_path / "ck"), device="cuda")
    layer, ref = loaded.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.gate_proj
    assert layer.qweight.is_cuda
    assert torch.equal(layer.dequantized_weight().cpu(), ref.dequantized_weight())
    with torch.no_grad():
        got = loaded(TOKENS.cuda()).logits.cpu()
    torch.testing.assert_close(got, logits(model), rtol=1e-4, atol=1e-4)


# --- fast forward paths (neuqi.formats.kernels) -------------------------------------------------------
def _random_layer(bits: int, group_size: int, out_features: int = 48, in_features: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=g, dtype=torch.uint8)
    n_groups = in_features // group_size
    scale = torch.rand(out_features, n_groups, generator=g) * 0.02 + 1e-3
    zero = torch.rand(out_features, n_groups, generator=g) * (2**bits - 1)  # real-valued Z
    return QuantLinear.from_codes(codes, scale, zero, bits, group_size, bias=torch.randn(out_features, generator=g))


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The definition: dequantize Ŵ in fp32, cast to the activation dtype, dense matmul."""
    return nn.functional.linear(x, layer.dequantized_weight().to(x.dtype), layer.bias.to(x.dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_path_is_bit_identical_to_reference(bits: int, dtype: torch.dtype) -> None:
    layer = _random_layer(bits, 64).to(dtype)
    layer.kernel = "dequant"
    x = torch.randn(3, 5, 256).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), _reference(layer, x))
    assert layer.runtime_bytes() == 0  # cache-free


def _assert_int4_rounding_bound(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The int4 kernel computes Σ x·((q + c − 8)·bf16(s) + bf16(s·(8 − c − Z))), c the per-group code shift of
    kernels.build_int4, and rounds y to bf16: each term is off by ≤ 2^-9 of its size, so |y − x·Ŵᵀ − b| ≤
    2^-8·(Σ|x|·(|q + c − 8|·s + |s·(8 − c − Z)|) + |y| + |b|). A wrong zero-point convention (sign, offset 8,
    nibble order, shift) misses this bound by orders of magnitude. Returns x·Ŵᵀ + b."""
    x, y = x.float().cpu(), y.float().cpu()
    bias = layer.bias.float().cpu()
    exact = x @ layer.dequantized_weight().cpu().T + bias
    s = layer.scales.float().cpu().repeat_interleave(layer.group_size, 1)
    z = layer.zeros.float().cpu().repeat_interleave(layer.group_size, 1)
    c = (8 - z).round().clamp(0, 15 - (2**layer.bits - 1))
    terms = (layer.codes().float().cpu() + c - 8).abs() * s + (s * (8 - c - z)).abs()
    bound = 2.0**-8 * (x.abs() @ terms.T + exact.abs() + bias.abs())
    assert ((y - exact).abs() <= bound).all()
    return exact


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_reference_within_bf16_rounding(bits: int, group_size: int) -> None:
    layer = _random_layer(bits, group_size, seed=bits).to(torch.bfloat16)  # the cast must keep fp16 s, Z
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.inference_mode():
        y = layer(x).float()
    assert layer.runtime_bytes() > 0, "the int4 kernel was not used"
    exact = _assert_int4_rounding_bound(layer, x, y)
    ref_err = (_reference(layer, x).float() - exact).abs().max()
    assert (y - exact).abs().max() <= 4 * ref_err  # no worse than the bf16 reference path, up to a small factor


def test_auto_path_choice_and_layout_lifetime(tmp_path) -> None:
    layer = _random_layer(3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        long = torch.randn(1, 2 * kernels.INT4_MAX_ROWS, 256).to(torch.bfloat16)  # prefill-sized: exact dequant path
        assert torch.equal(layer(long), _reference(layer, long)) and layer.runtime_bytes() == 0
        layer(long[:, :1])  # decode-sized: builds the int4 layout (4 bits per weight + scales/zeros)
    assert layer.runtime_bytes() >= 48 * 256 // 2
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros", "bias"}  # the layout is never saved
    with torch.no_grad():
        layer.scales.mul_(2)  # an in-place change rebuilds the layout
        x = torch.randn(1, 256).to(torch.bfloat16)
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=0.03, atol=0.03)
    layer.float()
    assert layer.runtime_bytes() == 0 and layer.scales.dtype == torch.float16  # casts drop it
    with torch.no_grad():  # fp32: the CPU int4 kernel is not vectorised, so the exact path runs even for one row
        assert torch.equal(layer(x.float()), _reference(layer, x.float()))
    layer.kernel = "bogus"
    with pytest.raises(ModelError, match="kernel must be one of"):
        layer(x.float())


def test_fast_paths_keep_packed_model_logits_and_round_trip(tmp_path) -> None:
    model = packed_llama(bits=4, group_size=32)
    ref = logits(model)
    bf16 = load(save_quantized(model, tmp_path / "ck")).to(torch.bfloat16)
    with torch.inference_mode():
        fast = bf16(TOKENS[:, :1]).logits.float()  # one token: int4 kernel everywhere
        set_kernel(bf16, "reference")
        slow = bf16(TOKENS[:, :1]).logits.float()
    torch.testing.assert_close(fast, slow, rtol=0.05, atol=0.05)
    torch.testing.assert_close(fast, ref[:, :1], rtol=0.05, atol=0.05)
    assert runtime_bytes(bf16) == 0  # set_kernel dropped the layouts
    set_kernel(bf16, "auto")
    with torch.inference_mode():
        bf16(TOKENS[:, :1])
    assert runtime_bytes(bf16) > 0
    save_quantized(bf16, tmp_path / "ck2")  # the checkpoint format is unchanged by the layouts
    from safetensors.torch import load_file

    before, after = load_file(tmp_path / "ck" / "model.safetensors"), load_file(tmp_path / "ck2" / "model.safetensors")
    assert set(before) == set(after)
    for key in before:
        if key.endswith((".qweight", ".scales", ".zeros")):
            assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CUDA int4 kernel)")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_cuda(bits: int) -> None:
    layer = _random_layer(bits, 64, out_features=64, seed=bits).to("cuda", torch.bfloat16)
    x = torch.randn(2, 256, device="cuda").to(torch.bfloat16)
    with torch.inference_mode():
        y = layer(x).float()
    assert layer.runtime_bytes() > 0, "the CUDA int4 kernel was not used"
    _assert_int4_rounding_bound(layer, x, y)


@pytest.mark.parametrize("bits", [2, 3])
def test_int4_kernel_zero_stays_small_for_narrow_codes(bits):
    """2/3-bit codes are shifted per group before the bf16 (scale, zero) of the int4 kernel: its error stays within
    twice the plain bf16 path's (before the shift: 7.6x at 2 bits, 2.3x at 3 bits)."""
    if kernels.int4_unsupported(512, 1024, bits, 64, torch.device("cpu"), torch.bfloat16):
        pytest.skip("no int4 kernel here")
    torch.manual_seed(bits)
    linear = nn.Linear(1024, 512, bias=False)
    scale, zero = neuqi.init_params(linear.weight.detach(), bits=bits, group_size=64, method="minmax")
    layer = QuantLinear.from_float(linear, scale, zero, bits, 64, exact=False)
    x = torch.randn(4, 1024).bfloat16()
    exact = x.float() @ layer.dequantized_weight().float().T
    errors = {}
    for kernel in ("int4", "reference"):
        layer.kernel = kernel
        errors[kernel] = float((layer(x).float() - exact).abs().mean())
    assert errors["int4"] < 2.0 * errors["reference"], errors
