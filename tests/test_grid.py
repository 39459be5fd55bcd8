import pytest
import torch

from neuqi.errors import ConfigError, WeightError
from neuqi.quant import grid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 8, 16])
def test_codes_and_dequant_follow_the_convention(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(5, 32)
    g = 32 if group_size == -1 else group_size
    scale = torch.rand(5, 32 // g) * 0.3 + 0.05
    zero = torch.randn(5, 32 // g) * 2 + 2 ** (bits - 1)  # real-valued zero-points
    q = grid.quantize(w, scale, zero, bits, group_size)
    assert q.dtype == torch.uint8 and q.max() <= 2**bits - 1
    s_full = scale.repeat_interleave(g, 1)
    z_full = zero.repeat_interleave(g, 1)
    expected_q = torch.clamp(torch.round(w / s_full + z_full), 0, 2**bits - 1)
    assert torch.equal(q.float(), expected_q)
    assert torch.allclose(grid.dequantize(q, scale, zero, group_size), s_full * (expected_q - z_full))


def test_fake_quantize_is_idempotent():
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    scale, zero = grid.to_storage(torch.full((4, 4), 0.2), torch.full((4, 4), 3.3))
    once = grid.fake_quantize(w, scale, zero, 3, 16)
    assert torch.equal(grid.fake_quantize(once, scale, zero, 3, 16), once)


def test_ties_round_to_even():
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5]])
    q = grid.quantize(w, torch.ones(1, 1), torch.zeros(1, 1) + 1.0, 4)
    assert q.tolist() == [[2, 2, 4, 0]]  # round(1.5)=2, round(2.5)=2, round(3.5)=4, round(0.5)=0


def test_to_storage_is_exact_fp16_and_positive():
    s, z = grid.to_storage(torch.tensor([[1e-9, 0.1234567]]), torch.tensor([[2.1231, -7.77]]))
    assert torch.equal(s, s.half().float()) and torch.equal(z, z.half().float())
    assert s.min() >= grid.MIN_SCALE


@pytest.mark.parametrize("bits", [1, 9, 0, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(ConfigError, match="bits"):
        grid.check_bits(bits)


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="does not divide"):
        grid.resolve_group_size(576, 128)
    assert grid.resolve_group_size(576, 64) == 64
    assert grid.resolve_group_size(576, -1) == 576
    with pytest.raises(ConfigError):
        grid.resolve_group_size(576, 0)


def test_nan_weights_are_rejected():
    with pytest.raises(WeightError, match="NaN/Inf"):
        grid.check_finite(torch.tensor([1.0, float("nan")]))


def test_qparams_shapes_checked():
    with pytest.raises(ConfigError):
        grid.QParams(torch.ones(2, 3), torch.ones(2, 4), 3, 16)
