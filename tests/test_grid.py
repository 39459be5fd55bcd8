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


def _params(out: int = 4, groups: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((out, groups), 0.1), torch.full((out, groups), 3.5)


@pytest.mark.parametrize("shape", [(4, 1), (1, 2), (4, 2, 1), (2, 4)])
def test_fake_quantize_checks_parameter_shapes(shape):
    """Issue 12, defect 7: a (4, 1) or (1, 2) scale used to broadcast silently."""
    w = torch.randn(4, 64)
    scale, zero = _params()
    with pytest.raises(ConfigError, match=r"expected \(out, in / group_size\) = \(4, 2\)"):
        grid.fake_quantize(w, torch.full(shape, 0.1), zero, 3, 32)
    with pytest.raises(ConfigError, match=r"zero_point has shape"):
        grid.quantize(w, scale, torch.full(shape, 3.5), 3, 32)
    with pytest.raises(ConfigError, match=r"expected"):
        grid.dequantize(torch.zeros(4, 64, dtype=torch.uint8), torch.full(shape, 0.1), zero, 32)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_fake_quantize_rejects_bad_scales(bad):
    scale, zero = _params()
    scale[1, 1] = bad
    with pytest.raises(ConfigError, match="scales must be finite and > 0"):
        grid.fake_quantize(torch.randn(4, 64), scale, zero, 3, 32)
    scale, zero = _params()
    zero[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="zero-points must be finite"):
        grid.fake_quantize(torch.randn(4, 64), scale, zero, 3, 32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fake_quantize_rejects_non_finite_weights(bad):
    w = torch.randn(4, 64)
    w[2, 7] = bad  # used to come back as a finite grid value
    with pytest.raises(WeightError, match="NaN/Inf"):
        grid.fake_quantize(w, *_params(), 3, 32)


def test_fake_quantize_of_a_parameter_is_a_plain_tensor():
    w = torch.nn.Parameter(torch.randn(4, 64))
    out = grid.fake_quantize(w, *_params(), 3, 32)
    assert not out.requires_grad and torch.equal(out, grid.fake_quantize(w.detach(), *_params(), 3, 32))
    scale = torch.full((4, 2), 0.1, requires_grad=True)  # dequantize stays differentiable in s and Z
    grid.dequantize(grid.quantize(w, scale, _params()[1], 3, 32), scale, _params()[1], 32).sum().backward()
    assert scale.grad is not None and scale.grad.shape == (4, 2)


def test_weights_beyond_fp16_and_unstorable_parameters_are_refused():
    """Issue 12, defect 8: a 1e30 weight was stored as 65504 with exit 0."""
    w = torch.randn(4, 64)
    w[1, 3] = 1e30
    with pytest.raises(WeightError, match=r"layer\.up has values up to 1e\+30, beyond ±65504"):
        grid.check_finite(w, "layer.up")
    grid.check_finite(w, limit=None)  # finiteness only (e.g. a Hessian diagonal)
    scale, zero = _params()
    with pytest.raises(WeightError, match=r"scale 1e\+06 at \(row, group\) \(2, 1\) does not fit fp16"):
        grid.to_storage(scale.index_put((torch.tensor(2), torch.tensor(1)), torch.tensor(1e6)), zero)
    with pytest.raises(WeightError, match=r"zero_point .* does not fit fp16"):
        grid.to_storage(scale, zero - 1e5)
