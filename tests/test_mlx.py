"""MLX export: mlx-lm loads it, MLX dequantizes our weights exactly and its logits equal ours; bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer, fake_quantize_linear, tiny_causal_lm
from torch import nn

from neuqi.cli import main
from neuqi.errors import CheckpointError, ConfigError
from neuqi.formats.checkpoint import save_quantized
from neuqi.formats.exports import export_mlx
from neuqi.formats.packed import QuantLinear, pack_model, quantized_linears

os.environ.setdefault("HF_HUB_OFFLINE", "1")
mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'neuqi[mlx]'; Linux: mlx[cpu])")
mlx_utils = pytest.importorskip("mlx_lm.utils", reason="mlx-lm is not installed (pip install 'neuqi[mlx]')")

IDS = [[5, 17, 100, 3, 99, 42, 7, 127, 64, 1]]


def packed_tiny(arch: str, bits: int, group_size: int = 32, mixed: bool = False) -> nn.Module:
    """A tiny ``arch`` model (RoPE θ = 50000, to check it reaches MLX) with every decoder linear packed at
    ``bits``; ``mixed`` puts the MLPs' down_proj at 8 bits / group 64 to exercise per-layer overrides."""
    model = tiny_causal_lm(arch, bits, intermediate_size=128, rope_theta=50000.0)
    qparams = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            k, g = (8, 64) if mixed and name.endswith("down_proj") else (bits, group_size)
            qparams[name] = fake_quantize_linear(m, k, g)
    return pack_model(model, qparams)


def mlx_logits(path) -> np.ndarray:
    model, _ = mlx_utils.load_model(path)
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def our_logits(model: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mlx_logits_equal_ours(tmp_path, arch: str, bits: int) -> None:
    model = packed_tiny(arch, bits)
    export_mlx(model, tmp_path / "mlx", scale_dtype="float32")
    np.testing.assert_allclose(mlx_logits(tmp_path / "mlx"), our_logits(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_mx_dequantize_equals_our_weights(tmp_path, scale_dtype: str) -> None:
    """fp32 scales/biases: bit-identical weights. fp16: the bias −s·Z is rounded (2^-11·s·|Z|) and mx.dequantize
    computes s·q + b in fp16 (two more roundings, each ≤ 2^-11 of |s·q| ≤ |ŵ| + s·|Z| and of |ŵ|)."""
    model = packed_tiny("qwen2", 3, mixed=True)
    export_mlx(model, tmp_path / "mlx", scale_dtype=scale_dtype)
    mlx_model, config = mlx_utils.load_model(tmp_path / "mlx")
    modules = dict(mlx_model.named_modules())
    for name, layer in quantized_linears(model):
        m = modules[name]
        assert (m.bits, m.group_size) == (layer.bits, layer.group_size), name
        w = np.array(mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(mx.float32))
        ours = layer.dequantized_weight().detach().numpy()
        if scale_dtype == "float32":
            np.testing.assert_array_equal(w, ours, err_msg=name)
        else:
            s = layer.scales.float().repeat_interleave(layer.group_size, 1).numpy()
            z = layer.zeros.float().abs().repeat_interleave(layer.group_size, 1).numpy()
            bound = (s * z + np.abs(ours)) * 2.0**-10
            assert (np.abs(w - ours) <= bound).all(), name
        if layer.bias is not None:
            np.testing.assert_array_equal(np.array(m.bias), layer.bias.detach().numpy())
    assert config["quantization"]["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert config["quantization"]["bits"] == 3 and config["rope_theta"] == 50000.0


def test_mixed_precision_logits(tmp_path) -> None:
    model = packed_tiny("llama", 2, mixed=True)
    export_mlx(model, tmp_path / "mlx", scale_dtype="float32")
    np.testing.assert_allclose(mlx_logits(tmp_path / "mlx"), our_logits(model), rtol=1e-4, atol=1e-4)


def test_cli_export_mlx_and_overwrite(tmp_path, capsys) -> None:
    model = packed_tiny("llama", 4)
    save_quantized(model, tmp_path / "ckpt")
    out = tmp_path / "mlx"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "mlx", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert main(["export", str(tmp_path / "ckpt"), "--format", "mlx", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    args = ["export", str(tmp_path / "ckpt"), "--format", "mlx", "--out", str(out), "--overwrite"]
    assert main([*args, "--mlx-scale-dtype", "float32"]) == 0
    np.testing.assert_allclose(mlx_logits(out), our_logits(model), rtol=1e-4, atol=1e-4)


def _layer(in_features: int, bits: int, group_size: int) -> QuantLinear:
    codes = torch.zeros(8, in_features, dtype=torch.uint8)
    n_groups = in_features // (in_features if group_size == -1 else group_size)
    return QuantLinear.from_codes(codes, torch.ones(8, n_groups), torch.zeros(8, n_groups), bits, group_size)


@pytest.mark.parametrize(
    "bits,group_size,in_features,message",
    [(7, 32, 64, "supports bits"), (4, 16, 64, "group sizes"), (3, -1, 96, "channel-wise")],
)
def test_refuses_what_mlx_cannot_hold(tmp_path, bits, group_size, in_features, message) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0] = _layer(in_features, bits, group_size)
    with pytest.raises(ConfigError, match=rf"^0: .*{message}"):
        export_mlx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_existing_output(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="overwrite"):
        export_mlx(packed_tiny("llama", 3), tmp_path / "out")
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_fp_checkpoint_needs_lifted_rope(tmp_path) -> None:
    """A transformers ≥ 5 config nests RoPE θ in ``rope_parameters``; mlx-lm reads the top-level ``rope_theta`` and
    would silently run θ = 10000. ``mlx_rope_config`` lifts it, after which mlx-lm's FP forward equals ours (what
    benchmarks/mlx_compare.py hands mlx-lm's own quantizers)."""
    from neuqi.formats.exports.mlx import mlx_rope_config

    model = tiny_causal_lm("llama", 4, intermediate_size=128, rope_theta=50000.0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("rope_theta") is None and config["rope_parameters"]["rope_theta"] == 50000.0
    unlifted = np.abs(mlx_logits(tmp_path) - our_logits(model)).max()
    (tmp_path / "config.json").write_text(json.dumps(mlx_rope_config(config)))
    lifted = np.abs(mlx_logits(tmp_path) - our_logits(model)).max()
    assert lifted < 1e-5 and unlifted > 30 * lifted  # (a tiny random model barely depends on position)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compare_reads_mlx_lm_files_as_mlx_dequantizes(tmp_path, bits: int) -> None:
    """benchmarks/mlx_compare.py scores mlx-lm's own quantizers from the files they write: its reader must give
    what ``mx.dequantize`` gives, for every quantized module (embedding included) and every stored norm."""
    import sys
    from pathlib import Path

    from mlx_lm import convert
    from mlx_lm.utils import load_model

    from neuqi.formats.exports.mlx import mlx_rope_config

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from mlx_compare import read_mlx_decoder_tensors, read_mlx_linears

    model = tiny_causal_lm("llama", 4, intermediate_size=128, rope_theta=50000.0)
    model.save_pretrained(tmp_path / "fp")
    byte_tokenizer().save_pretrained(tmp_path / "fp")  # convert copies a tokenizer
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    (tmp_path / "fp" / "config.json").write_text(json.dumps(mlx_rope_config(config)))
    convert(str(tmp_path / "fp"), str(tmp_path / "q"), quantize=True, q_bits=bits, q_group_size=32,
            dtype="float32")
    ours = read_mlx_linears(tmp_path / "q", prefix="")
    mlx_model, _ = load_model(tmp_path / "q")
    modules = dict(mlx_model.named_modules())
    assert {"model.embed_tokens", "lm_head"} <= set(ours) and len(ours) == 2 + 7 * len(model.model.layers)
    for name, w in ours.items():
        m = modules[name]
        theirs = np.array(mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(mx.float32))
        np.testing.assert_allclose(w.numpy(), theirs, rtol=0, atol=1e-6 * float(np.abs(theirs).max()))
    norms = read_mlx_decoder_tensors(tmp_path / "q", prefix="")
    assert "model.norm.weight" in norms and all(k.endswith("norm.weight") for k in norms)
