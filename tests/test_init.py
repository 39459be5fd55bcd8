"""Parameter initializers (spec §1, §3): registry, worked example, orderings between methods, edge cases."""

from __future__ import annotations

import pytest
import torch

import neuqi
from neuqi.errors import ConfigError, WeightError
from neuqi.quant.grid import fake_quantize, to_storage
from neuqi.quant.init import _integer_loss, _neuqi_loss, available_init_methods, init_params, weighted_loss
from neuqi.quant.zero_point import SortedGroups

EXAMPLE = torch.tensor([[-1.0, -0.1, 0.0, 0.1, 0.3]])
EXAMPLE_H = torch.full((5,), 0.2)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed (Student-t like) weights with a few outlier columns, as in LLM linears."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) / torch.rand(rows, cols, generator=gen).add(0.05).sqrt()
    return 0.02 * w


def _hessian_diag(cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h = torch.rand(cols, generator=gen) ** 4 * 100
    h[::7] = 0.0  # dead inputs
    return h


def _loss(weight, params, bits, group_size, h=None) -> torch.Tensor:
    return weighted_loss(weight, *params, bits, group_size, h)


def test_registry_and_config_errors() -> None:
    assert {"minmax", "neuqi", "neuqi_int"} <= set(available_init_methods())
    assert neuqi.available_init_methods() == available_init_methods()
    w = _weights(4, 64, 0)
    with pytest.raises(ConfigError, match="minmax"):
        init_params(w, 3, 64, method="bogus")
    with pytest.raises(ConfigError, match="search"):
        init_params(w, 3, 64, method="neuqi", serch="full")
    for bits in (1, 9, 2.5, True):
        with pytest.raises(ConfigError):
            init_params(w, bits, 64)
    with pytest.raises(ConfigError, match="divide"):
        init_params(w, 3, 48)
    with pytest.raises(ConfigError):
        init_params(w, 3, 64, method="neuqi", search="dense")
    with pytest.raises(ConfigError, match="search"):
        init_params(w, 3, 64, method="neuqi_int", search="dense")
    with pytest.raises(ConfigError):
        init_params(w, 3, 64, method="minmax", variant="symmetric")
    with pytest.raises(ConfigError):
        init_params(w, 3, 64, method="neuqi", row_chunk=0)
    with pytest.raises(ConfigError):
        init_params(w, 3, 64, hessian_diag=torch.ones(32))


def test_bad_weights_raise() -> None:
    w = _weights(4, 64, 1)
    for bad in (float("nan"), float("inf")):
        w_bad = w.clone()
        w_bad[2, 5] = bad
        with pytest.raises(WeightError):
            init_params(w_bad, 3, 32)
        h_bad = torch.ones(64)
        h_bad[3] = bad
        with pytest.raises(WeightError):
            init_params(w, 3, 32, hessian_diag=h_bad)
    with pytest.raises(WeightError):
        init_params(w, 3, 32, hessian_diag=-torch.ones(64))


def test_worked_example() -> None:
    """Spec §2: Min-Max 0.01111; NeUQI 0.008267 at s0 (full grid), 0.008169 at s ≈ 1.0078·s0 (coarse-to-fine)."""
    s0 = 1.3 / 3
    params = {m: init_params(EXAMPLE, 2, method=m, hessian_diag=EXAMPLE_H) for m in ("minmax", "neuqi_int", "neuqi")}
    params["full"] = init_params(EXAMPLE, 2, method="neuqi", hessian_diag=EXAMPLE_H, search="full")
    loss = {k: _loss(EXAMPLE, p, 2, -1, EXAMPLE_H).item() for k, p in params.items()}
    assert loss["minmax"] == pytest.approx(0.011111, abs=1e-6)
    assert loss["neuqi_int"] == pytest.approx(loss["minmax"], rel=1e-6)  # the integer search finds Min-Max here
    assert loss["full"] == pytest.approx(0.008267, abs=1e-6)
    assert params["full"][1].item() == pytest.approx(2.1231, abs=1e-4)
    assert loss["neuqi"] == pytest.approx(0.008169, abs=1e-6)
    assert params["neuqi"][0].item() / s0 == pytest.approx(1 + 16 / 2048, abs=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_neuqi_never_worse_than_minmax(bits: int) -> None:
    w = _weights(24, 256, bits)
    h = _hessian_diag(256, bits)
    for group_size, diag in ((-1, None), (32, h), (128, h)):
        base = _loss(w, init_params(w, bits, group_size, "minmax"), bits, group_size, diag)
        ours = _loss(w, init_params(w, bits, group_size, "neuqi", diag), bits, group_size, diag)
        assert (ours <= base * (1 + 1e-6) + 1e-12).all()
        assert ours.sum() < 0.9 * base.sum()


@pytest.mark.parametrize("bits", [2, 3])
def test_full_grid_never_worse_than_integer_grid(bits: int) -> None:
    """Same scale grid: the best real zero-point beats the best integer one for every group."""
    w = _weights(24, 128, 10 + bits)
    h = _hessian_diag(128, bits)
    full = init_params(w, bits, 32, "neuqi", h, search="full", steps=128)
    integer = init_params(w, bits, 32, "neuqi_int", h, steps=128)
    assert (_loss(w, full, bits, 32, h) <= _loss(w, integer, bits, 32, h) * (1 + 1e-6) + 1e-12).all()


def _unpruned_search(groups: SortedGroups, scales: torch.Tensor, evaluate) -> torch.Tensor:
    """Every candidate evaluated, the first minimum kept: the spec's loop without shortcuts."""
    return scales.gather(1, evaluate(groups, scales, None).argmin(1, keepdim=True)).squeeze(1)


@pytest.mark.parametrize("bits", [2, 4])
def test_pruned_search_equals_exhaustive_search(bits: int) -> None:
    """The bound-based pruning in the scale search changes no result (coarse, fine and integer grids)."""
    w = _weights(32, 128, 20 + bits)
    h = _hessian_diag(128, 20 + bits)
    m = 2**bits - 1
    groups = SortedGroups.build(w.reshape(-1, 32).double(), h.view(1, 4, 32).expand(32, -1, -1).reshape(-1, 32))
    s0 = (groups.weight[:, -1] - groups.weight[:, 0]) / m
    coarse = s0.unsqueeze(1) * torch.arange(1, 65, dtype=torch.float64) / 64
    evaluate = _neuqi_loss(bits)
    s_mid = _unpruned_search(groups, coarse, evaluate)
    offsets = torch.cat([torch.arange(-16, 0), torch.arange(1, 17)]).double()
    fine = torch.cat([s_mid.unsqueeze(1), s_mid.unsqueeze(1) + s0.unsqueeze(1) * offsets / 2048], 1)
    loss = evaluate(groups, fine, None)
    best = torch.where(
        loss[:, 1:].amin(1) < loss[:, 0], fine[:, 1:].gather(1, loss[:, 1:].argmin(1, True))[:, 0], s_mid
    )
    scale, _ = init_params(w, bits, 32, "neuqi", h)
    torch.testing.assert_close(scale.view(-1), best.float(), rtol=0, atol=0)

    grid = s0.unsqueeze(1) * torch.arange(1, 129, dtype=torch.float64) / 128
    scale_int, _ = init_params(w, bits, 32, "neuqi_int", h, steps=128)
    torch.testing.assert_close(scale_int.view(-1), _unpruned_search(groups, grid, _integer_loss(bits)).float())

    # the integer search over NeUQI's coarse-to-fine candidates, unpruned
    evaluate_int = _integer_loss(bits)
    s_mid = _unpruned_search(groups, coarse, evaluate_int)
    fine = torch.cat([s_mid.unsqueeze(1), s_mid.unsqueeze(1) + s0.unsqueeze(1) * offsets / 2048], 1)
    loss = evaluate_int(groups, fine, None)
    best = torch.where(
        loss[:, 1:].amin(1) < loss[:, 0], fine[:, 1:].gather(1, loss[:, 1:].argmin(1, True))[:, 0], s_mid
    )
    scale_c2f, _ = init_params(w, bits, 32, "neuqi_int", h, search="coarse_to_fine")
    torch.testing.assert_close(scale_c2f.view(-1), best.float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3])
def test_coarse_to_fine_integer_search_is_close_to_the_full_grid(bits: int) -> None:
    """The 96 coarse-to-fine candidates lie on the 2048-step grid (up to s0): never better there, barely worse."""
    w = _weights(16, 256, 40 + bits)
    h = _hessian_diag(256, 40 + bits)
    full = init_params(w, bits, 64, "neuqi_int", h)
    c2f = init_params(w, bits, 64, "neuqi_int", h, search="coarse_to_fine")
    loss_full, loss_c2f = _loss(w, full, bits, 64, h), _loss(w, c2f, bits, 64, h)
    s0 = (w.view(16, 4, 64).amax(-1) - w.view(16, 4, 64).amin(-1)) / (2**bits - 1)
    on_grid = c2f[0] <= s0 * (1 - 1e-6)
    assert (loss_c2f[on_grid] >= loss_full[on_grid] * (1 - 1e-6)).all()
    assert loss_c2f.sum() <= 1.01 * loss_full.sum()


def test_edge_cases() -> None:
    w = _weights(6, 64, 30)
    w[0, :32] = 0.37  # constant groups
    w[1, :32] = 0.0
    w[2, :32] = -3e-6  # below the smallest fp16 normal scale
    w[3, 32:] = w[3, 32]
    h = _hessian_diag(64, 30)
    h[32:] = 0.0  # a dead group of inputs: fitted unweighted
    for method in ("minmax", "neuqi_int", "neuqi"):
        options = {"steps": 64} if method == "neuqi_int" else {}
        scale, zero_point = init_params(w, 3, 32, method, h, **options)
        assert scale.dtype == zero_point.dtype == torch.float32 and scale.shape == (6, 2)
        assert (scale > 0).all() and torch.isfinite(zero_point).all()
        stored = fake_quantize(w, *to_storage(scale, zero_point), 3, 32)
        for row, cols in ((0, slice(0, 32)), (1, slice(0, 32)), (2, slice(0, 32)), (3, slice(32, 64))):
            torch.testing.assert_close(stored[row, cols], w[row, cols], rtol=1e-3, atol=0)  # fp16 precision
    unweighted = init_params(w, 3, 32, "neuqi")
    weighted = init_params(w, 3, 32, "neuqi", h)
    torch.testing.assert_close(weighted[0][:, 1], unweighted[0][:, 1])
    torch.testing.assert_close(weighted[1][:, 1], unweighted[1][:, 1])


def test_dtypes_chunks_and_determinism() -> None:
    """fp16/bf16 weights give the parameters of their fp32 values; row chunks and reruns change nothing."""
    w = _weights(16, 128, 40)
    reference = init_params(w.half().float(), 3, 64)
    torch.testing.assert_close(init_params(w.half(), 3, 64), reference, rtol=0, atol=0)
    torch.testing.assert_close(init_params(w.half(), 3, 64, row_chunk=5), reference, rtol=0, atol=0)
    torch.testing.assert_close(init_params(w.half().float(), 3, 64), reference, rtol=0, atol=0)
    bf16 = w.bfloat16()
    torch.testing.assert_close(init_params(bf16, 3, 64), init_params(bf16.float(), 3, 64), rtol=0, atol=0)


def test_minmax_variants() -> None:
    w = torch.tensor([[0.5, 1.0, 2.0, 3.5], [-2.0, -1.0, 1.0, 4.0]])
    scale, zero_point = init_params(w, 2, method="minmax")
    torch.testing.assert_close(scale, torch.tensor([[1.0], [2.0]]))
    torch.testing.assert_close(zero_point, torch.tensor([[-0.0], [1.0]]))  # Z = −round(min/s)
    scale, zero_point = init_params(w, 2, method="minmax", variant="gptq")
    torch.testing.assert_close(scale, torch.tensor([[3.5 / 3], [2.0]]))  # range widened to include 0
    torch.testing.assert_close(zero_point, torch.tensor([[0.0], [1.0]]))


def test_weighted_loss_matches_fake_quantize() -> None:
    w = _weights(8, 64, 50)
    h = _hessian_diag(64, 50)
    scale, zero_point = init_params(w, 4, 16, "neuqi", h)
    err = (fake_quantize(w, scale, zero_point, 4, 16) - w).double() ** 2 * h.double()
    torch.testing.assert_close(weighted_loss(w, scale, zero_point, 4, 16, h), err.view(8, 4, 16).sum(-1))


@pytest.mark.parametrize("method", ["minmax", "neuqi", "neuqi_int"])
def test_a_parameter_is_accepted_and_plain_tensors_come_back(method):
    """Issue 12, defect 6: nn.Linear(64, 16).weight crashed NeUQI (autograd in addcmul); others tracked gradients."""
    torch.manual_seed(0)
    weight = torch.nn.Linear(64, 16).weight
    h = torch.rand(64, requires_grad=True)
    for hessian_diag in (None, h):
        scale, zero_point = neuqi.init_params(weight, bits=3, group_size=32, method=method, hessian_diag=hessian_diag)
        assert not scale.requires_grad and not zero_point.requires_grad and scale.grad_fn is None
        expected = init_params(weight.detach().clone(), 3, 32, method=method,
                               hessian_diag=None if hessian_diag is None else h.detach().clone())
        assert torch.equal(scale, expected[0]) and torch.equal(zero_point, expected[1])
