"""RTN / GPTQ / LDLQ on small random problems: equal to a textbook column-by-column GPTQ, grid membership, damping
and dead inputs."""

from __future__ import annotations

import pytest
import torch

from neuqi.errors import ConfigError, NumericalError
from neuqi.quant import grid, solvers

BITS = 3


def problem(out: int = 24, n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, n) and a correlated, unevenly scaled H = XᵀX/N (n, n) fp64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, n, generator=g) @ torch.randn(n, n, generator=g) * 0.2
    x = x * torch.rand(n, generator=g) * 3 + torch.randn(n, generator=g)
    return torch.randn(out, n, generator=g), (x.double().T @ x.double()) / x.shape[0]


def minmax(w: torch.Tensor, group_size: int, bits: int = BITS) -> tuple[torch.Tensor, torch.Tensor]:
    wg = grid.to_groups(w, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = (hi - lo) / grid.max_code(bits)
    return grid.to_storage(s, -torch.round(lo / s))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16, 32])
@pytest.mark.parametrize("block_size", [128, 20])
def test_gptq_equals_ldlq(act_order, group_size, block_size):
    w, h = problem()
    s, z = minmax(w, group_size)
    kw = dict(act_order=act_order, block_size=block_size)
    a = solvers.gptq(w, h, s, z, BITS, group_size, **kw)
    b = solvers.ldlq(w, h, s, z, BITS, group_size, **kw)
    assert (a.codes != b.codes).float().mean() < 1e-3
    assert b.loss == pytest.approx(a.loss, rel=1e-4)
    r = solvers.rtn(w, h, s, z, BITS, group_size)
    assert b.loss < r.loss
    for res in (a, b):  # Ŵ is exactly on the grid of the stored parameters
        assert torch.equal(res.weight, grid.dequantize(res.codes, s, z, group_size))
        assert res.damping == pytest.approx(0.01)


@pytest.mark.parametrize("n", [5, 256, 700])
def test_factors_equal_their_textbook_forms(n):
    """GPTQ's U from the reversed Cholesky (blocked in-place triangular inverse, recursing at n > 256) equals
    cholesky(inverse(A), upper=True); LDLQ's Ů satisfies A = (Ů + I)·D·(Ů + I)ᵀ."""
    _, h = problem(4, n, seed=n)
    a = h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    u = solvers._gptq_factor(a.flip(0, 1).clone())
    ref = torch.linalg.cholesky(torch.linalg.inv(a), upper=True)
    assert torch.equal(u, u.triu()) and (u - ref).abs().max() < 1e-9 * ref.abs().max()
    strict = solvers._ldlq_factor(a.flip(0, 1).clone())
    assert torch.equal(strict, strict.triu(1))
    unit = strict + torch.eye(n, dtype=h.dtype)
    inner = torch.linalg.inv(unit) @ a @ torch.linalg.inv(unit).T  # must be D, diagonal and positive
    assert (inner - torch.diag(inner.diagonal())).abs().max() < 1e-9 * inner.abs().max()
    assert (inner.diagonal() > 0).all()


def test_damped_hessian_is_one_permuted_copy_with_dead_inputs_fixed():
    _, h = problem(4, 40)
    h[7, :] = h[:, 7] = 0.0  # a dead input
    dead = torch.diagonal(h) == 0
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    fixed = h.clone()
    fixed[7, 7] = 1.0
    expected = (fixed + 0.5 * torch.eye(40, dtype=h.dtype))[order][:, order]
    assert torch.equal(solvers._damped(h, order, dead, 0.5), expected)
    assert torch.equal(h.diagonal() == 0, dead)  # H itself untouched


def test_rtn_is_fake_quantize():
    w, h = problem()
    s, z = minmax(w, 32)
    res = solvers.rtn(w, h, s, z, BITS, 32)
    assert torch.equal(res.weight, grid.fake_quantize(w, s, z, BITS, 32))
    assert torch.equal(res.codes, grid.quantize(w, s, z, BITS, 32))
    assert res.loss == pytest.approx(solvers.proxy_loss(res.weight, w, h))
    assert solvers.rtn(w, None, s, z, BITS, 32).loss != solvers.rtn(w, None, s, z, BITS, 32).loss  # nan


def test_act_order_helps_and_uses_the_right_groups():
    w, h = problem(seed=1)
    s, z = minmax(w, 16)
    plain = solvers.ldlq(w, h, s, z, BITS, 16, act_order=False)
    ordered = solvers.ldlq(w, h, s, z, BITS, 16, act_order=True)
    assert ordered.loss < plain.loss * 1.05
    # every column was quantized on its own group's grid: requantizing Ŵ is the identity
    assert torch.equal(grid.fake_quantize(ordered.weight, s, z, BITS, 16), ordered.weight)


def test_hopeless_hessian_names_the_layer():
    w = torch.randn(4, 2)
    h = torch.tensor([[1.0, 10.0], [10.0, 1.0]], dtype=torch.float64)  # eigenvalue −9, λ = 0.01
    s, z = minmax(w, -1)
    for solve in (solvers.gptq, solvers.ldlq):
        with pytest.raises(NumericalError, match="layers.3.mlp.up_proj"):
            solve(w, h, s, z, BITS, -1, name="layers.3.mlp.up_proj")
    with pytest.raises(NumericalError):
        solvers.ldlq(w, torch.full((2, 2), float("nan")), s, z, BITS, -1)


def test_damping_is_retried():
    w = torch.randn(4, 2)
    h = torch.tensor([[1.0, 1.015], [1.015, 1.0]], dtype=torch.float64)  # needs λ ≥ 0.015: 2 × 0.01
    s, z = minmax(w, -1)
    a = solvers.gptq(w, h, s, z, BITS, -1)
    b = solvers.ldlq(w, h, s, z, BITS, -1)
    assert a.damping == pytest.approx(0.02) and b.damping == pytest.approx(0.02)


def test_dead_inputs_quantize_as_zero_weights():
    w, h = problem(n=32)
    dead = torch.tensor([3, 17])
    h[dead, :] = 0
    h[:, dead] = 0
    s, z = minmax(w, 16)
    for solve in (solvers.gptq, solvers.ldlq):
        res = solve(w, h, s, z, BITS, 16)
        assert torch.isfinite(res.weight).all() and res.loss == res.loss
        zeros = grid.fake_quantize(torch.zeros_like(w), s, z, BITS, 16)
        assert torch.equal(res.weight[:, dead], zeros[:, dead])
        # same as solving the problem whose dead columns are already zero
        w0 = w.clone()
        w0[:, dead] = 0
        assert torch.equal(solve(w0, h, s, z, BITS, 16).codes, res.codes)


def test_dynamic_fit_fits_each_group_once():
    w, h = problem(n=64)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fit(cols: torch.Tensor, groups: torch.Tensor):
        calls.append((cols.clone(), groups.clone()))
        return minmax(cols, 16)

    for solve in (solvers.gptq, solvers.ldlq):
        calls.clear()
        res = solve(w, h, None, None, BITS, 16, act_order=False, block_size=16, fit=fit)
        assert sorted(torch.cat([g for _, g in calls]).tolist()) == [0, 1, 2, 3]
        assert torch.equal(calls[0][0], w[:, :16])  # first group: nothing processed yet
        assert not torch.equal(calls[1][0], w[:, 16:32])  # later groups see the error feedback
        assert torch.equal(res.weight, grid.dequantize(res.codes, res.scale, res.zero_point, 16))
    # with a fit that ignores the values, dynamic equals static
    s, z = minmax(w, 16)
    static = solvers.ldlq(w, h, s, z, BITS, 16)
    dyn = solvers.ldlq(w, h, None, None, BITS, 16, fit=lambda c, g: (s[:, g], z[:, g]))
    assert torch.equal(static.codes, dyn.codes)
    a = solvers.gptq(w, h, None, None, BITS, 16, block_size=16, fit=fit)
    b = solvers.ldlq(w, h, None, None, BITS, 16, block_size=16, fit=fit)
    assert b.loss == pytest.approx(a.loss, rel=1e-4)


def test_bad_arguments():
    w, h = problem()
    with pytest.raises(ConfigError, match="unknown method"):
        solvers.get_solver("awq")
    with pytest.raises(ConfigError):
        solvers.ldlq(w, h, None, None, BITS, 16)
    with pytest.raises(ConfigError, match="must be"):
        solvers.ldlq(w, h, torch.ones(3, 3), torch.zeros(3, 3), BITS, 16)


# ------------------------------------------------------------------------------------------ independent oracle
def textbook_gptq(w, h, scale, zero, bits, group_size, act_order, damp=0.01, fit=None):
    """GPTQ as the paper states it, one column at a time, with no blocks and no lazy updates.

    H ← H + λI with λ = damp·mean(diag H); U = the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). Columns are taken in
    the order of decreasing diag(H) (act-order) or left to right; column j uses its own group's (s, Z), group
    j // g. For each column i in that order: ŵ = s·(clamp(round(w/s + Z), 0, M) − Z), e = (w − ŵ)/U_ii and every
    later column k gets W_k −= e·U_ik. With ``fit``, a group's (s, Z) are fitted on the group's current columns
    when its first column comes up. Returns (codes (out, in) uint8, Ŵ (out, in), scale, zero).
    """
    out, n = w.shape
    g = n if group_size == -1 else group_size
    m = 2**bits - 1
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(n, dtype=torch.float64)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    h = h[order][:, order]
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True).float()  # rows/cols in processing order
    work = w.float().clone()[:, order]  # columns in processing order
    scale = None if scale is None else scale.float().clone()
    zero = None if zero is None else zero.float().clone()
    if fit is not None:
        scale, zero = torch.zeros(out, n // g), torch.zeros(out, n // g)
    position = torch.argsort(order)  # column → its processing position
    fitted: set[int] = set()
    codes = torch.zeros(out, n, dtype=torch.uint8)
    w_hat = torch.zeros(out, n)
    for i in range(n):
        col = int(order[i])
        grp = col // g
        if fit is not None and grp not in fitted:
            s_new, z_new = fit(work[:, position[grp * g : (grp + 1) * g]], torch.tensor([grp]))
            scale[:, grp], zero[:, grp] = s_new[:, 0].float(), z_new[:, 0].float()
            fitted.add(grp)
        s, z = scale[:, grp], zero[:, grp]
        q = torch.clamp(torch.round(work[:, i] / s + z), 0, m)
        codes[:, col] = q.to(torch.uint8)
        w_hat[:, col] = s * (q - z)
        err = (work[:, i] - w_hat[:, col]) / u[i, i]
        work[:, i + 1 :] -= err.unsqueeze(1) * u[i, i + 1 :].unsqueeze(0)
    return codes, w_hat, scale, zero


@pytest.mark.parametrize("shape", [(24, 192), (7, 64), (40, 128)])
@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, 16), (4, -1), (3, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_solvers_equal_the_textbook_gptq(shape, bits, group_size, act_order):
    """Blocked GPTQ and LDLQ give the textbook loop's codes and Ŵ bit for bit, for any block size."""
    out, n = shape
    w, h = problem(out, n, seed=bits + n)
    s, z = minmax(w, group_size, bits)
    codes, w_hat, _, _ = textbook_gptq(w, h, s, z, bits, group_size, act_order)
    for solve in (solvers.gptq, solvers.ldlq):
        for block_size in (128, 16, 5):
            res = solve(w, h, s, z, bits, group_size, act_order=act_order, block_size=block_size)
            assert torch.equal(res.codes, codes), (solve.__name__, block_size, (res.codes != codes).sum())
            assert torch.equal(res.weight, w_hat)


@pytest.mark.parametrize("act_order", [False, True])
def test_dynamic_fit_equals_the_textbook_gptq(act_order):
    """Groups fitted when the solver reaches them see the same error-fed columns as in the textbook loop."""
    w, h = problem(24, 64, seed=5)

    def fit(cols: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return minmax(cols, 16)

    codes, w_hat, scale, zero = textbook_gptq(w, h, None, None, BITS, 16, act_order, fit=fit)
    for solve in (solvers.gptq, solvers.ldlq):
        for block_size in (128, 16, 5):
            res = solve(w, h, None, None, BITS, 16, act_order=act_order, block_size=block_size, fit=fit)
            assert torch.equal(res.codes, codes), (solve.__name__, block_size, (res.codes != codes).sum())
            assert torch.equal(res.weight, w_hat)
            assert torch.equal(res.scale, scale) and torch.equal(res.zero_point, zero)


def test_fp_target_is_the_least_squares_target():
    """W* = argmin_Ŵ E‖Ŵx − Wx̃‖², and that error is tr((Ŵ − W*)H(Ŵ − W*)ᵀ) + const for every Ŵ; x̃ = x gives W."""
    g = torch.Generator().manual_seed(0)
    x_fp = torch.randn(512, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g,
                                                                              dtype=torch.float64)
    x = x_fp + 0.3 * torch.randn(512, 24, generator=g, dtype=torch.float64)  # the quantized model's input
    w = torch.randn(8, 24, generator=g)
    h, c = x.T @ x / 512, x_fp.T @ x / 512
    target = solvers.fp_target(w, h, c, damp=0.0)
    ref = torch.linalg.lstsq(x, x_fp @ w.double().T).solution.T
    torch.testing.assert_close(target.double(), ref, rtol=1e-4, atol=1e-4)

    def fp_error(w_hat: torch.Tensor) -> float:
        return float(((x @ w_hat.double().T - x_fp @ w.double().T) ** 2).sum(1).mean())

    a, b = torch.randn(8, 24, generator=g), torch.randn(8, 24, generator=g)
    proxy_gap = solvers.proxy_loss(a, target, h) - solvers.proxy_loss(b, target, h)
    assert fp_error(a) - fp_error(b) == pytest.approx(proxy_gap, rel=1e-4)
    assert torch.equal(solvers.fp_target(w, h, h, damp=0.01), w)


def damped(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    return (h + solvers.damping_lambda(h, damp) * torch.eye(h.shape[0], dtype=h.dtype)).float()


def test_refit_params_is_the_least_squares_optimum():
    """For fixed codes, the refit (s, Z) of each row equal a brute-force weighted least squares over (s_g, s_g·Z_g)
    (ŵ = A·x with A[j, g] = q_j, A[j, G + g] = −1 on group g), to fp16 storage."""
    w, h = problem(out=6, n=32)
    s, z = minmax(w, 8, bits=2)
    codes = solvers.ldlq(w, h, s, z, 2, 8).codes
    new_s, new_z = solvers.refit_params(w, h, codes, s, z, 8)
    root = torch.linalg.cholesky(h).T  # H = RᵀR: ‖R(w − Ax)‖² is the loss
    for r in range(6):
        a = torch.zeros(32, 8, dtype=torch.float64)
        for grp in range(4):
            cols = slice(8 * grp, 8 * grp + 8)
            a[cols, grp] = codes[r, cols].double()
            a[cols, 4 + grp] = -1.0
        x = torch.linalg.lstsq(root @ a, root @ w[r].double()).solution
        ref_s, ref_z = grid.to_storage(x[:4].float().unsqueeze(0), (x[4:] / x[:4]).float().unsqueeze(0))
        torch.testing.assert_close(new_s[r], ref_s[0], rtol=2e-3, atol=0)
        torch.testing.assert_close(new_z[r], ref_z[0], rtol=0, atol=2e-3 * ref_z.abs().max().item())
    old = solvers.proxy_loss(grid.dequantize(codes, s, z, 8), w, h)
    assert solvers.proxy_loss(grid.dequantize(codes, new_s, new_z, 8), w, h) < 0.95 * old
    one_row_at_a_time = solvers.refit_params(w, h, codes, s, z, 8, chunk_elements=1)
    assert all(torch.equal(a, b) for a, b in zip(one_row_at_a_time, (new_s, new_z)))


def test_refit_params_keeps_a_row_it_cannot_improve():
    """A row whose codes are all equal has no scale to fit (the system is singular along s): it keeps (s, Z)."""
    w, h = problem(out=4, n=16)
    s, z = minmax(w, -1, bits=2)
    codes = solvers.ldlq(w, h, s, z, 2, -1).codes
    codes[1] = 2
    new_s, new_z = solvers.refit_params(w, h, codes, s, z, -1)
    assert torch.isfinite(new_s).all() and (new_s > 0).all() and torch.isfinite(new_z).all()
    before = solvers._row_losses(w, h.double(), codes, s, z, 16)
    after = solvers._row_losses(w, h.double(), codes, new_s, new_z, 16)
    assert (after <= before).all() and (after < before).sum() >= 3


def test_code_descent_reaches_a_coordinatewise_optimum():
    """Repeated passes of the coordinate descent stop at codes no single (row, column) change improves: checked
    against every alternative code by brute force."""
    w, h = problem(out=5, n=24)
    s, z = minmax(w, 8, bits=2)
    hd = damped(h)
    codes = solvers.rtn(w, h, s, z, 2, 8).codes
    loss = solvers._row_losses(w, hd.double(), codes, s, z, 8).sum()
    for _ in range(50):
        new = solvers._descend_codes(w, hd, codes, s, z, 2, 8, torch.randperm(24, generator=torch.Generator()
                                                                                .manual_seed(1)), block_size=7)
        new_loss = solvers._row_losses(w, hd.double(), new, s, z, 8).sum()
        assert new_loss <= loss + 1e-9
        if torch.equal(new, codes):
            break
        codes, loss = new, new_loss
    else:
        pytest.fail("coordinate descent did not converge in 50 passes")
    best = solvers._row_losses(w, hd.double(), codes, s, z, 8)
    for j in range(24):
        for q in range(4):
            trial = codes.clone()
            trial[:, j] = q
            assert (solvers._row_losses(w, hd.double(), trial, s, z, 8) >= best - 1e-6 * best).all()


@pytest.mark.parametrize("solver, group_size", [("ldlq", -1), ("ldlq", 16), ("rtn", 16)])
def test_refine_lowers_the_loss_and_stays_on_the_grid(solver, group_size):
    w, h = problem()
    h[5, :] = h[:, 5] = 0  # a dead input stays a zero weight's code
    s, z = minmax(w, group_size, bits=2)
    first = solvers.get_solver(solver)(w, h, s, z, 2, group_size)
    res = solvers.refine(w, h, first, 2, group_size, rounds=3, damp=0.01)
    assert res.loss < 0.97 * first.loss
    assert res.loss == pytest.approx(solvers.proxy_loss(res.weight, w, h))
    assert torch.equal(res.weight, grid.dequantize(res.codes, res.scale, res.zero_point, group_size))
    for t in (res.scale, res.zero_point):  # stored in fp16
        assert torch.equal(t, t.half().float())
    zeros = grid.fake_quantize(torch.zeros_like(w), res.scale, res.zero_point, 2, group_size)
    assert torch.equal(res.weight[:, 5], zeros[:, 5])
    hd = damped(h).double()
    losses = [solvers._row_losses(w, hd, r.codes, r.scale, r.zero_point, group_size).sum()
              for r in (first, solvers.refine(w, h, first, 2, group_size, rounds=1, damp=0.01), res)]
    assert losses[0] > losses[1] >= losses[2]
