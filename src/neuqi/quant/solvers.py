"""Rounding solvers for one linear layer (spec §4.4): RTN, GPTQ and LDLQ on the grid of ``neuqi.grid``.

All take the weight W (out, in) fp32, the layer-input Hessian H = XᵀX/N (in, in) fp64 or fp32, and the
per-group parameters ``scale``, ``zero_point`` (out, n_groups), already rounded to storage
(``grid.to_storage``). Each column is quantized as q = clamp(round(w/s + Z), 0, M), ŵ = s·(q − Z) with the
(s, Z) of its own group.

* **Hessian preparation** (both GPTQ and LDLQ): dead inputs (H_ii = 0, the input is always zero) get H_ii = 1
  and W[:, i] = 0, as GPTQ does: no feedback flows into or out of them and they quantize as a zero weight.
  Then λ = damp·mean(diag H) is added to the diagonal; if the Cholesky factorisation fails, λ is added again,
  up to 10 more times, then NumericalError names the layer.
* **Act-order** (default): columns are processed in the order perm = argsort(diag H, descending); column i of
  that order uses the parameters of group perm[i] // g (groups stay contiguous in the ORIGINAL order).
* **GPTQ**: upper Cholesky factor U of H⁻¹ (formed as J·L⁻¹·J from the Cholesky factor L of the
  index-reversed H, J the reversal) and in-place error feedback, lazily in blocks (IST reference):
  e_i = (w_i − ŵ_i)/U_ii; W[:, j] −= e_i·U_ij for j > i.
* **LDLQ** (QuIP): H = (Ů + I)·D·(Ů + I)ᵀ with Ů strictly upper, from the Cholesky factor of the
  index-reversed H; Ŵ_i = Q(W_i + Σ_{j<i} Ů_ji (W_j − Ŵ_j)) with W the ORIGINAL weight. No inverse is formed.
  GPTQ and LDLQ give the same Ŵ up to rounding ties and floating-point error.
* **Parameter fitting** (``fit``): with ``fit`` instead of fixed parameters ("dynamic" groups), a group's
  (s, Z) are fitted when the solver reaches the first of its columns in processing order, on the group's
  columns as GPTQ's error feedback has updated them so far: the optimal remaining weights given the columns
  already quantized (W̃_R = W_R + Δ_F·H_FR·H_RR⁻¹). GPTQ and LDLQ then agree in this mode too.
* **Refinement** (``refine``, after any solver): the solver's Ŵ is a greedy, one-pass answer on parameters fitted
  before it ran. ``refine`` lowers L = tr((Ŵ − W)·H_λ·(Ŵ − W)ᵀ), H_λ = H + λI, by alternating two exact steps,
  each of which can only lower L: (1) coordinate descent on the codes: column i, all others fixed, goes to the
  grid point nearest its optimum ŵ_i − [(Ŵ − W)·H_λ]_i / (H_λ)_ii; (2) the optimal (s, Z) of every row for its
  codes: ŵ = Σ_g (s_g·q_g − b_g·1_g) is linear in (s_g, b_g = s_g·Z_g), so each row's 2G parameters solve a
  2G × 2G least-squares system.
* ``loss`` = tr((Ŵ − W)·H·(Ŵ − W)ᵀ) with the undamped H and the original W: the mean squared output error per
  token.
* **FP target** (``fp_target``, asymmetric calibration as in GPTAQ): to fit the FP model's output W·x̃ from the
  quantized model's input x, the solvers run on the target W* = W·C·H⁻¹ (C = E[x̃ xᵀ]) instead of W: for any Ŵ,
  E‖Ŵx − Wx̃‖² = tr((Ŵ − W*)·H·(Ŵ − W*)ᵀ) + const.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError, NumericalError
from . import grid

# fit(weight (out, k·g) current values of k whole groups in original column order, group ids (k,))
#   -> (scale, zero_point), each (out, k), already rounded to storage
FitFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

MAX_DAMPING_RETRIES = 10


@dataclass
class SolverResult:
    """Output of a solver: ``weight`` Ŵ (out, in) fp32 on the grid, ``codes`` (out, in) uint8, the parameters
    used (out, n_groups) fp32, ``loss`` = tr((Ŵ−W)H(Ŵ−W)ᵀ), and ``damping`` = λ / mean(diag H) actually
    added."""

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    loss: float
    damping: float


def fp_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = W + W·(C − H)·(H + λI)⁻¹ (out, in) fp32: the unconstrained minimiser of E‖Ŵx − Wx̃‖², damped.

    weight W (out, in); hessian H = E[x xᵀ] and cross C = E[x̃ xᵀ] (in, in), x the quantized model's input to the
    linear and x̃ the FP model's at the same token; λ = ``damping_lambda(H, damp)``, dead inputs (H_ii = 0) taken
    as H_ii = 1. Written as a correction of W, so W* = W exactly when x̃ = x, damping or not."""
    n = hessian.shape[0]
    h = _damped(hessian, torch.arange(n, device=hessian.device), hessian.diagonal() == 0,
                damping_lambda(hessian, damp))  # H + λI, dead inputs at 1, in the original order
    w = weight.double()
    correction = torch.linalg.solve(h, (cross.double() - hessian.double()).T @ w.T).T  # W (C − H) H_λ⁻¹
    return (w + correction).float()


def proxy_loss(w_hat: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor, chunk: int = 2048) -> float:
    """tr(ΔHΔᵀ) with Δ = Ŵ − W (out, in), in fp32, over blocks of ``chunk`` columns of H (so no fp32 copy of
    a wide H is made)."""
    delta = (w_hat - weight).float()
    total = torch.zeros((), dtype=torch.float64, device=delta.device)
    for j in range(0, delta.shape[1], chunk):
        block = hessian[:, j : j + chunk].to(delta)
        total += ((delta @ block) * delta[:, j : j + chunk]).sum(dtype=torch.float64)
    return float(total)


def damping_lambda(hessian: torch.Tensor, damp: float) -> float:
    """λ = damp·mean(diag H), with dead inputs (H_ii = 0) counted as H_ii = 1 (as the solvers treat them)."""
    d = torch.diagonal(hessian).double()
    return float(damp * torch.where(d == 0, torch.ones_like(d), d).mean())


def damped_diagonal(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """diag(H) + λ (in,) fp64 with dead inputs counted as 1: the diagonal of the H the solvers factorize,
    which the initializers weight their error with (spec §3)."""
    d = torch.diagonal(hessian).double()
    d = torch.where(d == 0, torch.ones_like(d), d)
    return d + damp * d.mean()


def _prepare(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(Wᵀ (in, out) with rows in processing order and dead inputs zeroed, perm, dead (in,) bool, λ).

    The solvers work on Wᵀ so that each column of W is a contiguous row: the per-column vector ops and the
    rank-1 updates (BLAS) stay fast when the CPU is shared, where strided elementwise kernels are not."""
    w = weight.float().clone()
    d = torch.diagonal(hessian).double().to(w.device)
    dead = d == 0
    w[:, dead] = 0.0
    lam = damping_lambda(hessian, damp)
    n = w.shape[1]
    diag = torch.where(dead, torch.ones_like(d), d)
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n, device=w.device)
    return w.T[perm].contiguous(), perm, dead, lam


def _damped(hessian: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, shift: float) -> torch.Tensor:
    """(H + shift·I)[order][:, order] fp64 with H_ii = 1 for dead inputs, as one (in, in) allocation (an
    8192-wide fp64 H is 0.5 GiB: the factorizations below hold at most two such matrices at a time)."""
    hessian = hessian.to(order.device)  # the weight's device (a no-op when H is there already)
    h = hessian[order.unsqueeze(1), order.unsqueeze(0)].to(torch.float64)
    diag = h.diagonal()
    diag[dead.to(order.device)[order]] = 1.0
    diag.add_(shift)
    return h


def _factorize(
    hessian: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor, lam: float,
    factor: Callable[[torch.Tensor], torch.Tensor | None], name: str,
) -> tuple[torch.Tensor, int]:
    """factor(J·(H + k·λ·I)[perm][:, perm]·J) for the first k = 1..11 where it succeeds; returns (factor, k).
    J reverses the index order: both factors start from the Cholesky factor of the index-reversed matrix,
    which ``factor`` owns (and frees)."""
    reverse = perm.flip(0)
    for k in range(1, MAX_DAMPING_RETRIES + 2):
        out = factor(_damped(hessian, reverse, dead, k * lam))
        if out is not None:
            return out, k
    raise NumericalError(
        f"{name or 'layer'}: the Hessian is not positive definite even after adding "
        f"{MAX_DAMPING_RETRIES + 1} × λ = {lam:.3g} to its diagonal; raise the damping or check the "
        "calibration data for NaN/Inf"
    )


def _cholesky(a: torch.Tensor) -> torch.Tensor | None:
    if not torch.isfinite(a).all():
        return None
    lower, info = torch.linalg.cholesky_ex(a)
    return lower if int(info) == 0 else None


def _invert_lower_(m: torch.Tensor, block: int = 256) -> torch.Tensor:
    """M⁻¹ in place for M (n, n) lower triangular, by halves: [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹CA⁻¹, B⁻¹]]
    (two triangular solves, then the two halves recursively): n³/3 flops, like LAPACK's trtri."""
    n = m.shape[0]
    if n <= block:
        m.copy_(torch.linalg.solve_triangular(m, torch.eye(n, dtype=m.dtype, device=m.device), upper=False))
        return m
    k = n // 2
    a, c, b = m[:k, :k], m[k:, :k], m[k:, k:]
    x = torch.linalg.solve_triangular(b, c, upper=False)  # B⁻¹C
    c.copy_(torch.linalg.solve_triangular(a, x, upper=False, left=False).neg_())  # −B⁻¹CA⁻¹
    del x
    _invert_lower_(a, block)
    _invert_lower_(b, block)
    return m


def _gptq_factor(reversed_a: torch.Tensor) -> torch.Tensor | None:
    """Upper U with A⁻¹ = UᵀU, from JAJ = LLᵀ: A = (JLJ)(JLJ)ᵀ with JLJ upper, so U = (JLJ)⁻¹ = J·L⁻¹·J
    (2n³/3 flops; the textbook cholesky(inverse(A), upper=True) takes twice that and three matrices)."""
    lower = _cholesky(reversed_a)
    del reversed_a
    if lower is None:
        return None
    return _invert_lower_(lower).flip(0, 1)


def _ldlq_factor(reversed_a: torch.Tensor) -> torch.Tensor | None:
    """Strictly upper Ů with A = (Ů + I)·D·(Ů + I)ᵀ, from JAJ = LLᵀ: A = (JLJ)(JLJ)ᵀ, JLJ upper; Ů is JLJ with
    each column divided by its diagonal, minus I."""
    lower = _cholesky(reversed_a)
    del reversed_a
    if lower is None:
        return None
    upper = lower.flip(0, 1)  # A = upper·upperᵀ
    del lower
    upper.div_(torch.diagonal(upper).clone())  # column j / upper_jj
    upper.diagonal().sub_(1.0)
    return upper


class _Columns:
    """Per-column (s, Z) in processing order, filled upfront (static) or group by group (dynamic fit)."""

    def __init__(self, wt: torch.Tensor, perm: torch.Tensor, group_size: int, bits: int) -> None:
        n, out = wt.shape
        device = wt.device
        self.g = grid.resolve_group_size(n, group_size)
        self.m = grid.max_code(bits)
        self.group_of = perm // self.g  # (in,) group of each processed column
        n_groups = n // self.g
        self.scale = torch.ones(out, n_groups, dtype=torch.float32, device=device)
        self.zero = torch.zeros_like(self.scale)
        # (n_groups, out): row k holds group k's parameters, read per column (no (in, out) expansion)
        self.scale_rows = torch.ones(n_groups, out, dtype=torch.float32, device=device)
        self.zero_rows = torch.zeros_like(self.scale_rows)
        self.group_list = self.group_of.tolist()
        self.codes = torch.empty(n, out, dtype=torch.uint8, device=device)
        first = torch.full((n_groups,), n, dtype=torch.long, device=device)
        first_pos = first.scatter_reduce(0, self.group_of, torch.arange(n, device=device), "amin")
        self.starts = {p: grp for grp, p in enumerate(first_pos.tolist())}  # position → group starting there
        self.inv = torch.argsort(perm)

    def set(self, groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.scale[:, groups], self.zero[:, groups] = scale.float(), zero.float()
        self.scale_rows[groups], self.zero_rows[groups] = scale.float().T, zero.float().T

    def positions(self, groups: torch.Tensor) -> torch.Tensor:
        """Processing positions of the columns of ``groups``, in original column order (k·g,)."""
        cols = (groups.unsqueeze(1) * self.g + torch.arange(self.g, device=groups.device)).flatten()
        return self.inv[cols]

    def quantize(self, col: torch.Tensor, i: int) -> torch.Tensor:
        """ŵ of processed column i (out,), recording its codes."""
        k = self.group_list[i]
        s, z = self.scale_rows[k], self.zero_rows[k]
        q = torch.round(col / s + z).clamp_(0, self.m)
        self.codes[i] = q.to(torch.uint8)
        return s * (q - z)


def _finish(
    weight: torch.Tensor, hessian: torch.Tensor, cols: _Columns, group_size: int, damping: float
) -> SolverResult:
    codes = cols.codes[cols.inv].T.contiguous()  # (out, in) in the original column order
    w_hat = grid.dequantize(codes, cols.scale, cols.zero, group_size)
    return SolverResult(w_hat, codes, cols.scale, cols.zero, proxy_loss(w_hat, weight, hessian), damping)


def _init_columns(
    wt: torch.Tensor, perm: torch.Tensor, scale, zero_point, bits: int, group_size: int, fit: FitFn | None
) -> _Columns:
    cols = _Columns(wt, perm, group_size, bits)
    if fit is None:
        if scale is None or zero_point is None:
            raise ConfigError("a solver needs either (scale, zero_point) or a fit callback")
        expected = (wt.shape[1], wt.shape[0] // cols.g)
        if tuple(scale.shape) != expected or tuple(zero_point.shape) != expected:
            raise ConfigError(f"scale/zero_point must be {expected}, got {tuple(scale.shape)}")
        cols.set(torch.arange(expected[1], device=wt.device), scale.to(wt.device), zero_point.to(wt.device))
    return cols


def _fit_group(cols: _Columns, fit: FitFn | None, t: int, current: Callable) -> None:
    """If a group starts at processing position t, fit it on ``current(positions)``: its rows of Wᵀ now."""
    if fit is None or t not in cols.starts:
        return
    group = torch.tensor([cols.starts[t]], device=cols.scale.device)
    s, z = fit(current(cols.positions(group)).T, group)
    cols.set(group, s, z)


SOLVERS: dict[str, Callable[..., SolverResult]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[..., SolverResult]) -> Callable[..., SolverResult]:
        SOLVERS[name] = fn
        return fn

    return deco


def get_solver(name: str) -> Callable[..., SolverResult]:
    if name not in SOLVERS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


@register("rtn")
def rtn(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int = -1,
    *,
    fit: FitFn | None = None,
    **_: object,
) -> SolverResult:
    """Round to nearest: Ŵ = grid.fake_quantize(W); a ``fit`` sees the original W. NaN loss without H."""
    w = weight.float()
    if fit is not None:
        g = grid.resolve_group_size(w.shape[1], group_size)
        scale, zero_point = fit(w, torch.arange(w.shape[1] // g, device=w.device))
    codes = grid.quantize(w, scale, zero_point, bits, group_size)
    w_hat = grid.dequantize(codes, scale, zero_point, group_size)
    loss = float("nan") if hessian is None else proxy_loss(w_hat, w, hessian)
    return SolverResult(w_hat, codes, scale.float(), zero_point.float(), loss, 0.0)


@register("gptq")
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int = -1,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    fit: FitFn | None = None,
    name: str = "",
) -> SolverResult:
    """GPTQ with the inverse-Cholesky form and lazy block updates (see module docstring)."""
    w, perm, dead, lam = _prepare(weight, hessian, damp, act_order)  # w: (in, out) rows in processing order
    u, k = _factorize(hessian, perm, dead, lam, _gptq_factor, name)
    u = u.to(w.dtype)
    cols = _init_columns(w, perm, scale, zero_point, bits, group_size, fit)
    n = w.shape[0]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[i1:i2].clone()  # (B, out) updated in place
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):

            def current(pos: torch.Tensor, i1=i1, i2=i2, i=i, w1=w1, err1=err1) -> torch.Tensor:
                rows, inside = w[pos], pos < i2  # later blocks still miss this block's feedback so far
                rows[~inside] -= u[i1 : i1 + i, pos[~inside]].T @ err1[:i]
                rows[inside] = w1[pos[inside] - i1]
                return rows

            _fit_group(cols, fit, i1 + i, current)
            q = cols.quantize(w1[i], i1 + i)
            e = (w1[i] - q) / u1[i, i]
            w1[i:].addmm_(u1[i, i:].unsqueeze(1), e.unsqueeze(0), alpha=-1)
            err1[i] = e
        w[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1)
    return _finish(weight.float(), hessian, cols, group_size, k * damp)


@register("ldlq")
def ldlq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int = -1,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    fit: FitFn | None = None,
    name: str = "",
) -> SolverResult:
    """LDLQ: Ŵ_i = Q(W_i + Σ_{j<i} Ů_ji (W_j − Ŵ_j)); earlier blocks enter by one matmul, the block by a
    loop. With ``fit``, the groups are fitted on the same values as in GPTQ (the remaining weights after the
    optimal update for the columns done so far); LDLQ's partial sums are not those values, so this mode also
    factors H⁻¹ and tracks GPTQ's scaled errors e_j = (fed_j − Ŵ_j)/U_jj."""
    w, perm, dead, lam = _prepare(weight, hessian, damp, act_order)  # w: (in, out) rows in processing order
    a, k = _factorize(hessian, perm, dead, lam, _ldlq_factor, name)
    a = a.to(w.dtype)  # (in, in) strictly upper
    if fit is not None:
        u = _gptq_factor(_damped(hessian, perm.flip(0), dead, k * lam))
        if u is None:
            raise NumericalError(f"{name or 'layer'}: H⁻¹ has no Cholesky factor at damping {k * damp:.3g}")
        u = u.to(w.dtype)
        err = torch.zeros_like(w)  # rows: e_j
    cols = _init_columns(w, perm, scale, zero_point, bits, group_size, fit)
    n = w.shape[0]
    delta = torch.zeros_like(w)  # rows: W − Ŵ of processed columns
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[i1:i2] + a[:i1, i1:i2].T @ delta[:i1]  # (B, out) W + feedback of earlier blocks
        a1 = a[i1:i2, i1:i2]
        for i in range(i2 - i1):
            t = i1 + i
            if fit is not None:
                _fit_group(cols, fit, t, lambda pos, t=t: w[pos] - u[:t, pos].T @ err[:t])
            q = cols.quantize(w1[i], t)
            if fit is not None:
                torch.div(w1[i] - q, u[t, t], out=err[t])
            d = delta[t]
            torch.sub(w[t], q, out=d)
            w1[i + 1 :].addmm_(a1[i, i + 1 :].unsqueeze(1), d.unsqueeze(0))
    return _finish(weight.float(), hessian, cols, group_size, k * damp)


def _descend_codes(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    bits: int, group_size: int, order: torch.Tensor, block_size: int = 128,
) -> torch.Tensor:
    """One pass of coordinate descent on the codes (out, in) for fixed (s, Z), columns in ``order``; returns the
    new codes. ``hessian`` is H_λ (in, in) fp32 with no zero diagonal. Works on transposed (in, out) rows; the
    feedback G = H_λ·(Ŵ − W)ᵀ is updated lazily, a block of columns at a time (as GPTQ's updates)."""
    m = grid.max_code(bits)
    n = weight.shape[1]
    s_t = grid.expand_params(scale, group_size, n).T.contiguous()  # (in, out)
    z_t = grid.expand_params(zero_point, group_size, n).T.contiguous()
    q_t = codes.T.float().contiguous()
    w_hat = s_t * (q_t - z_t)
    feedback = hessian @ (w_hat - weight.T)  # (in, out): column i of (Ŵ − W)·H_λ as row i
    inv_diag = 1.0 / hessian.diagonal()
    order = order.tolist()
    for b1 in range(0, n, block_size):
        cols = order[b1 : b1 + block_size]
        idx = torch.tensor(cols, device=weight.device)
        local = feedback[idx]  # (B, out): the block's rows of the feedback, kept current
        h_cols = hessian[:, idx]  # (in, B)
        h_block = h_cols[idx]  # (B, B)
        steps = torch.zeros_like(local)
        for k, i in enumerate(cols):
            target = w_hat[i] - local[k] * inv_diag[i]
            q = torch.round(target / s_t[i] + z_t[i]).clamp_(0, m)
            new = s_t[i] * (q - z_t[i])
            step = steps[k]
            torch.sub(new, w_hat[i], out=step)
            local.addr_(h_block[:, k], step)
            w_hat[i], q_t[i] = new, q
        feedback.addmm_(h_cols, steps)  # every row; the block's own rows are then replaced by their running values
        feedback[idx] = local
    return q_t.T.to(torch.uint8).contiguous()


def refit_params(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int, chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (s, Z) (out, G) minimising tr((Ŵ − W)·H·(Ŵ − W)ᵀ) for fixed codes, rounded to storage; a row keeps
    its old parameters where the solution has a scale below ``grid.MIN_SCALE`` or is not better once stored.

    Per row, with x = (s_1..s_G, b_1..b_G), b_g = s_g·Z_g, ŵ = A·x where A[j, g] = q_j, A[j, G + g] = −1 for the
    columns j of group g: the normal equations (AᵀHA)·x = AᵀH·w, with a 1e-9·mean-diagonal ridge towards the old
    x. ``hessian`` (in, in) must be positive definite on the row's span (pass H_λ). fp64 inside, rows in chunks
    whose (rows, G, in) products hold at most ``chunk_elements`` numbers (128 MiB)."""
    out, n = weight.shape
    g = grid.resolve_group_size(n, group_size)
    n_groups = n // g
    h = hessian.double()
    h_blocks = h.reshape(n_groups, g, n)
    block_sums = h.reshape(n_groups, g, n_groups, g).sum((1, 3))  # 1_gᵀ H 1_h
    new_scale, new_zero = scale.clone().float(), zero_point.clone().float()
    rows_per_chunk = max(1, chunk_elements // (n_groups * n))
    for r1 in range(0, out, rows_per_chunk):
        rows = slice(r1, min(r1 + rows_per_chunk, out))
        q = codes[rows].double().reshape(-1, n_groups, g)
        hw = (weight[rows].double() @ h).reshape(-1, n_groups, g)
        proj = torch.einsum("rgi,gik->rgk", q, h_blocks).reshape(-1, n_groups, n_groups, g)  # q_gᵀ H, by group
        m_ss = (proj * q.unsqueeze(1)).sum(-1)  # q_gᵀ H q_h
        m_sb = -proj.sum(-1)  # −q_gᵀ H 1_h
        system = torch.cat([torch.cat([m_ss, m_sb], 2),
                            torch.cat([m_sb.transpose(1, 2), block_sums.expand_as(m_ss)], 2)], 1)
        rhs = torch.cat([(q * hw).sum(-1), -hw.sum(-1)], 1)
        s0, z0 = scale[rows].double(), zero_point[rows].double()
        x0 = torch.cat([s0, s0 * z0], 1)
        ridge = 1e-9 * system.diagonal(dim1=1, dim2=2).mean(1, keepdim=True)
        system.diagonal(dim1=1, dim2=2).add_(ridge)
        x = torch.linalg.solve(system, (rhs + ridge * x0).unsqueeze(-1)).squeeze(-1)
        s, z = x[:, :n_groups], x[:, n_groups:] / x[:, :n_groups]
        valid = ((s >= grid.MIN_SCALE) & (z.abs() <= grid.FP16_MAX)).all(1, keepdim=True)  # NaN: not valid
        s, z = grid.to_storage(torch.where(valid, s, s0).float(), torch.where(valid, z, z0).float())
        old = _row_losses(weight[rows], h, codes[rows], scale[rows], zero_point[rows], g)
        new = _row_losses(weight[rows], h, codes[rows], s, z, g)
        better = (new < old).unsqueeze(1)
        new_scale[rows] = torch.where(better, s, scale[rows].float())
        new_zero[rows] = torch.where(better, z, zero_point[rows].float())
    return new_scale, new_zero


def _row_losses(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor, group_size: int) -> torch.Tensor:
    """(ΔHΔᵀ)_rr per row (out,) fp64, Δ = Ŵ − W for Ŵ = dequantize(codes, scale, zero_point)."""
    delta = (grid.dequantize(codes, scale, zero_point, group_size) - weight).double()
    return ((delta @ hessian) * delta).sum(1)


def refine(
    weight: torch.Tensor, hessian: torch.Tensor, result: SolverResult, bits: int, group_size: int = -1, *,
    damp: float = 0.1, rounds: int = 8, act_order: bool = True,
) -> SolverResult:
    """``rounds`` × (a coordinate-descent pass over the codes, then the rows' optimal (s, Z)) on a solver's
    ``result`` for ``weight`` (out, in) and ``hessian`` (in, in) (see the module docstring), with
    λ = max(damp, result.damping)·mean(diag H): L = tr((Ŵ − W)·H_λ·(Ŵ − W)ᵀ) never increases. Damping more than
    the solver did keeps the refinement from fitting the calibration tokens too closely. Dead inputs keep the code
    of a zero weight. The returned ``loss`` is against the undamped H, as every solver's; ``damping`` is the
    solver's."""
    w = weight.float().clone()
    dead = torch.diagonal(hessian).to(w.device) == 0
    w[:, dead] = 0.0  # dead inputs quantize as zero weights, as in the solvers
    diag = torch.where(dead, torch.ones_like(w[0]), torch.diagonal(hessian).to(w))
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(w.shape[1],
                                                                                             device=w.device)
    shift = damping_lambda(hessian, max(damp, result.damping))
    h = _damped(hessian, torch.arange(hessian.shape[0], device=w.device), dead, shift).float()
    codes, scale, zero = result.codes, result.scale, result.zero_point
    g = grid.resolve_group_size(w.shape[1], group_size)
    for _ in range(rounds):
        codes = _descend_codes(w, h, codes, scale, zero, bits, g, perm)
        scale, zero = refit_params(w, h, codes, scale, zero, g)
    w_hat = grid.dequantize(codes, scale, zero, g)
    return SolverResult(w_hat, codes, scale, zero, proxy_loss(w_hat, weight.float(), hessian), result.damping)
