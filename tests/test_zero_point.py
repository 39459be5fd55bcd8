"""The zero-point solvers (spec §2): fast vs exact reference, worked example, bounds and edge cases."""

from __future__ import annotations

import pytest
import torch

from neuqi.quant.zero_point import (
    SortedGroups,
    exact_zero_point,
    integer_zero_point,
    objective,
    optimal_zero_point,
)

SIZES = (1, 2, 3, 5, 8, 13, 31, 64, 100, 128, 256)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


def _values(kind: str, shape: tuple[int, int], bits: int, gen: torch.Generator) -> torch.Tensor:
    """x = w/s for random groups, with s drawn like the search does: s0·r for r in (0, 1.1]."""
    rows, n = shape
    if kind == "normal":
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "student":  # heavy tails
        w = torch.randn(shape, generator=gen, dtype=torch.float64) / torch.rand(shape, generator=gen).sqrt()
    elif kind == "quarter":  # ties on grid points and half-way points
        w = torch.randint(-12, 13, shape, generator=gen).double() / 4
    else:  # few distinct values
        w = torch.randint(-2, 3, shape, generator=gen).double() / 2
    m = 2**bits - 1
    s0 = ((w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / m).clamp(min=1e-3)
    if kind == "quarter":
        ratio = torch.randint(1, 9, (rows, 1), generator=gen).double() / 8  # keeps x on quarter grids
    else:
        ratio = torch.randint(1, 2254, (rows, 1), generator=gen).double() / 2048
    return w / (s0 * ratio)


def _weights(kind: str, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "uniform":
        h = torch.rand(shape, generator=gen, dtype=torch.float64)
    else:  # heavy-tailed |Cauchy|, unnormalised over many decades, with zeros and a dead group
        h = (torch.randn(shape, generator=gen) / torch.randn(shape, generator=gen)).abs().double()
        h *= 10.0 ** torch.randint(-6, 7, (shape[0], 1), generator=gen).double()
        h[torch.rand(shape, generator=gen) < 0.25] = 0.0
        h[0] = 0.0
    return h


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fast_solver_matches_exact_reference(bits: int) -> None:
    """Thousands of groups: the fast solver's F equals the breakpoint enumeration's to 1e-6 relative. The groups are
    hard ones: at the optimum most clip some elements, and almost all beat the best integer zero-point."""
    gen = torch.Generator().manual_seed(bits)
    m = 2**bits - 1
    groups = clipping = beats_integer = 0
    for n in SIZES:
        for kind in ("normal", "student", "quarter", "coarse"):
            for h_kind in ("none", "uniform", "heavy"):
                rows = 12 if n > 64 else 24
                x = _values(kind, (rows, n), bits, gen)
                h = _weights(h_kind, (rows, n), gen)
                zero_point, f_fast = optimal_zero_point(x, h, bits)
                _, f_exact = exact_zero_point(x, h, bits)
                h_sum = torch.full((rows,), float(n)) if h is None else h.sum(1)
                tol = 1e-6 * f_exact + 1e-12 * torch.where(h_sum == 0, n, h_sum)  # a dead group is unweighted
                assert ((f_fast - f_exact).abs() <= tol).all(), (n, kind, h_kind)
                torch.testing.assert_close(objective(x, h, zero_point, bits), f_fast, rtol=1e-9, atol=1e-12)
                level = x + zero_point.unsqueeze(1)  # clamp(round(level), 0, M) is the code
                groups += rows
                clipping += int(((level < -0.5) | (level > m + 0.5)).any(1).sum())
                beats_integer += int((f_fast < integer_zero_point(x, h, bits)[1] * (1 - 1e-6)).sum())
    assert clipping > groups / 2 and beats_integer > 0.9 * groups, (clipping, beats_integer, groups)


def test_exact_reference_against_dense_scan() -> None:
    """The reference is never above a dense scan of z and never far below it (F is Lipschitz in z)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 9, generator=gen, dtype=torch.float64) * 3
    h = torch.rand(40, 9, generator=gen, dtype=torch.float64)
    zero_points = torch.linspace(-12, 20, 64001, dtype=torch.float64)
    scan = torch.stack([objective(x, h, torch.full((40,), float(z)), 3) for z in zero_points[::4]]).amin(0)
    _, f = exact_zero_point(x, h, 3)
    assert (f <= scan + 1e-12).all()
    lipschitz = 2 * (h * (x.abs() + 20)).sum(1)
    assert (f >= scan - lipschitz * (zero_points[4] - zero_points[0])).all()


def test_worked_example() -> None:
    """Spec §2: k = 2, w = [−1, −0.1, 0, 0.1, 0.3], uniform h = 0.2 at s0 = 1.3/3: Z = 2.1231, L = 0.008267."""
    s0 = 1.3 / 3
    x = torch.tensor([[-1.0, -0.1, 0.0, 0.1, 0.3]], dtype=torch.float64) / s0
    zero_point, f = optimal_zero_point(x, torch.full((5,), 0.2), 2)
    assert zero_point.item() == pytest.approx(2.1231, abs=5e-5)
    assert (f * s0**2).item() == pytest.approx(0.008267, abs=5e-7)
    _, f_int = integer_zero_point(x, torch.full((5,), 0.2), 2)
    assert (f_int * s0**2).item() == pytest.approx(0.01111, abs=5e-6)  # Min-Max's Z = 2


def test_weights_need_no_normalisation() -> None:
    """Scaling h scales F and leaves Z alone; an all-zero h falls back to unweighted; zeros in h drop elements."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 16, generator=gen, dtype=torch.float64) * 4
    h = torch.rand(50, 16, generator=gen, dtype=torch.float64)
    z1, f1 = optimal_zero_point(x, h, 3)
    z2, f2 = optimal_zero_point(x, h * 1e6, 3)
    torch.testing.assert_close(f2, f1 * 1e6)
    torch.testing.assert_close(objective(x, h, z2, 3), f1)
    z_dead, f_dead = optimal_zero_point(x, torch.zeros_like(h), 3)
    _, f_plain = optimal_zero_point(x, None, 3)
    torch.testing.assert_close(f_dead, f_plain)
    h_masked = h.clone()
    h_masked[:, 8:] = 0
    _, f_masked = optimal_zero_point(x, h_masked, 3)
    _, f_half = optimal_zero_point(x[:, :8], h[:, :8], 3)
    torch.testing.assert_close(f_masked, f_half)


def test_degenerate_groups() -> None:
    """Constant groups and single values are represented exactly; huge offsets stay exact."""
    x = torch.tensor([[0.37] * 6, [-5.0] * 6, [1e6 + 0.3] * 6], dtype=torch.float64)
    zero_point, f = optimal_zero_point(x, None, 2)
    assert torch.isfinite(zero_point).all()
    torch.testing.assert_close(f, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    zero_point, f = optimal_zero_point(torch.tensor([[2.7], [-300.2]], dtype=torch.float64), None, 4)
    torch.testing.assert_close(f, torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)


def test_integer_zero_point_is_best_integer() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-6, 30, (200, 7), generator=gen).double() / 2
    h = torch.rand(200, 7, generator=gen, dtype=torch.float64)
    zero_point, f = integer_zero_point(x, h, 4)
    table = torch.stack([objective(x, h, torch.full((200,), float(z)), 4) for z in range(16)], 1)
    torch.testing.assert_close(f, table.amin(1))
    assert torch.equal(zero_point.long(), table.argmin(1))  # the smallest Z on ties
    assert (optimal_zero_point(x, h, 4)[1] <= f + 1e-12).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_integer_loss_from_prefix_sums_equals_direct_evaluation(bits: int) -> None:
    """SortedGroups.integer_loss against the Z-by-Z reference, on random groups and on values sitting exactly on
    rounding edges (half steps) and on clipping edges."""
    gen = torch.Generator().manual_seed(17)
    w = torch.cat([
        torch.randn(300, 16, generator=gen, dtype=torch.float64) * torch.rand(300, 1, generator=gen) * 3,
        torch.randint(-8, 40, (300, 16), generator=gen).double() / 2 * 0.25,  # multiples of s/2 for s = 0.25
    ])
    h = torch.rand(600, 16, generator=gen, dtype=torch.float64)
    h[::7, ::3] = 0.0
    groups = SortedGroups.build(w, h)
    for scale in (torch.full((600,), 0.25, dtype=torch.float64), torch.rand(600, generator=gen).double() + 0.05):
        zero_point, loss = groups.integer_loss(scale, bits)
        z_ref, f_ref = integer_zero_point(groups.weight / scale.unsqueeze(1), groups.h, bits)
        torch.testing.assert_close(loss, f_ref * scale**2, rtol=1e-9, atol=1e-12)
        chosen = objective(groups.weight / scale.unsqueeze(1), groups.h, zero_point, bits) * scale**2
        torch.testing.assert_close(chosen, loss, rtol=1e-9, atol=1e-12)
        assert ((zero_point == z_ref) | ((chosen - f_ref * scale**2).abs() <= 1e-9 * loss)).all()


def test_chunks_and_shapes() -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 40, 32, generator=gen, dtype=torch.float64) * 5
    z_small, f_small = optimal_zero_point(x, None, 3, chunk_elements=100)
    z_big, f_big = optimal_zero_point(x, None, 3)
    assert z_small.shape == (3, 40)
    torch.testing.assert_close(f_small, f_big)
    torch.testing.assert_close(z_small, z_big)


def test_clip_bound_is_a_monotone_lower_bound() -> None:
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(300, 24, generator=gen, dtype=torch.float64) / torch.rand(300, 24, generator=gen).sqrt()
    h = torch.rand(300, 24, generator=gen, dtype=torch.float64)
    groups = SortedGroups.build(w, h)
    s0 = (w.amax(1) - w.amin(1)) / 7
    scales = s0.unsqueeze(1) * torch.arange(1, 17, dtype=torch.float64) / 16
    bound = groups.clip_bound(scales, 3)
    _, f = groups.solve(scales, 3, zero_points=False)
    assert (bound <= f * scales**2 * (1 + 1e-9) + 1e-12).all()
    assert (bound[:, 1:] <= bound[:, :-1] * (1 + 1e-9) + 1e-12).all()
    assert (bound[:, 0] > 0).all()  # s0/16 must clip something


def test_bad_weights_raise() -> None:
    with pytest.raises(ValueError):
        optimal_zero_point(torch.ones(2, 3), -torch.ones(2, 3), 3)
    with pytest.raises(ValueError):
        optimal_zero_point(torch.ones(2, 0), None, 3)
