"""Initial quantization parameters (scale, zero_point) per (row, group): Min-Max, NeUQI_int and NeUQI (spec §1–3).

Every method takes ``weight`` (out, in) of any float dtype (computed in fp32/fp64), ``bits`` (2..8), ``group_size``
(-1 = channel-wise) and an optional ``hessian_diag`` (in,) = diag(H), and returns fp32 ``scale`` and ``zero_point``
of shape (out, n_groups) in the convention of ``grid.py``. NeUQI and NeUQI_int minimise, per (row, group),

    L(s, Z) = Σ_i h_i (ŵ_i − w_i)²,     ŵ = s·(clamp(round(w/s + Z), 0, M) − Z),  h = hessian_diag or 1.

A group whose h is all zero is fitted unweighted. A constant group w ≡ c (max = min) gets
s = max(fp16(|c|), 2⁻¹⁴) and Z = −sign(c) (Z = −c/s when |c| < 2⁻¹⁴): its codes are 0 and ŵ = fp16(c) after fp16
storage (exactly c before it). Methods register by name (``@register_init``); options are keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..errors import ConfigError, WeightError
from .grid import MIN_SCALE, check_bits, check_finite, check_positive_int, max_code, resolve_group_size
from .zero_point import SortedGroups, integer_zero_point

InitMethod = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_METHODS: dict[str, InitMethod] = {}
_UNWEIGHTED: set[str] = set()  # methods that ignore hessian_diag
# Weights per row chunk. CPU: keeps the solver's buffers in cache. Accelerators: few, large launches (the buffers are
# about 100 bytes per weight at 3 bits, so 2^23 weights hold under 1 GiB). Rows are independent: same result.
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 23


def register_init(name: str, uses_hessian: bool = True) -> Callable[[InitMethod], InitMethod]:
    """Decorator: register ``fn(weight, bits, group_size, hessian_diag, **options)`` under ``name``.
    ``uses_hessian=False`` declares that ``fn`` ignores ``hessian_diag`` (RTN with it then needs no calibration)."""

    def wrap(fn: InitMethod) -> InitMethod:
        _METHODS[name] = fn
        _UNWEIGHTED.discard(name)
        if not uses_hessian:
            _UNWEIGHTED.add(name)
        return fn

    return wrap


def uses_hessian(name: str) -> bool:
    """Whether the registered method ``name`` reads ``hessian_diag``."""
    return name not in _UNWEIGHTED


def available_init_methods() -> list[str]:
    """Names accepted by ``init_params(method=...)``."""
    return sorted(_METHODS)


def init_params(
    weight: torch.Tensor,
    bits: int,
    group_size: int = -1,
    method: str = "neuqi",
    hessian_diag: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point), fp32 of shape (out, in // group_size), from the registered ``method``. ``weight`` may be
    an ``nn.Parameter``; the results never carry autograd history.

    Raises ConfigError for an unknown method or option, bits outside 2..8 or a group size that does not divide
    ``in``; WeightError for NaN/Inf weights or a bad ``hessian_diag`` — before any work starts.
    """
    if method not in _METHODS:
        raise ConfigError(f"unknown init method {method!r}; valid methods: {', '.join(available_init_methods())}")
    fn = _METHODS[method]
    accepted = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"init method {method!r} has no option {unknown}; its options: {accepted}")
    weight, group_size, h = _check_inputs(weight, bits, group_size, hessian_diag)
    return fn(weight, bits, group_size, h, **options)


def _check_inputs(
    weight: torch.Tensor, bits: int, group_size: int, hessian_diag: torch.Tensor | None
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Validate; return the weight as fp32, the effective group size and hessian_diag as fp32 (or None)."""
    check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise WeightError(f"weight must be a 2-D float tensor (out, in), got {tuple(weight.shape)} {weight.dtype}")
    group_size = resolve_group_size(weight.shape[1], group_size)
    weight = weight.detach()  # a Parameter is accepted; the results are plain tensors
    check_finite(weight, limit=None)
    if hessian_diag is not None:
        if hessian_diag.shape != (weight.shape[1],):
            raise ConfigError(f"hessian_diag must have shape ({weight.shape[1]},), got {tuple(hessian_diag.shape)}")
        hessian_diag = hessian_diag.detach()
        check_finite(hessian_diag, "hessian_diag", limit=None)
        if (hessian_diag < 0).any():
            raise WeightError("hessian_diag must be nonnegative (it is diag(XᵀX))")
        hessian_diag = hessian_diag.to(device=weight.device, dtype=torch.float32)
    return weight.float(), group_size, hessian_diag


def _group_h(hessian_diag: torch.Tensor | None, rows: int, group_size: int) -> torch.Tensor | None:
    """hessian_diag (in,) → per-group weights (rows · n_groups, group_size), or None."""
    if hessian_diag is None:
        return None
    return hessian_diag.view(1, -1, group_size).expand(rows, -1, -1).reshape(-1, group_size)


def weighted_loss(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    group_size: int = -1,
    hessian_diag: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_i h_i (ŵ_i − w_i)² per (row, group), float64 of shape (out, n_groups); h = 1 without a Hessian diagonal."""
    m = max_code(bits)
    out_features, in_features = weight.shape
    g = resolve_group_size(in_features, group_size)
    w = weight.to(torch.float64).view(out_features, -1, g)
    s, zp = scale.to(torch.float64).unsqueeze(-1), zero_point.to(torch.float64).unsqueeze(-1)
    err = s * (torch.round(w / s + zp).clamp_(0, m) - zp) - w
    err = err * err
    if hessian_diag is not None:
        err = err * hessian_diag.to(device=w.device, dtype=torch.float64).view(1, -1, g)
    return err.sum(-1)


def _constant_params(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) that represent the constant ``value`` (fp32 tensor): codes 0, ŵ = −s·Z (see module doc)."""
    magnitude = value.abs()
    fp16_max = torch.finfo(torch.float16).max
    scale = magnitude.clamp(max=fp16_max).half().float().clamp(min=MIN_SCALE)
    zero_point = torch.where(magnitude >= MIN_SCALE, -torch.sign(value), -value / scale)
    return scale, zero_point


@register_init("minmax", uses_hessian=False)
def minmax(
    weight: torch.Tensor, bits: int, group_size: int, hessian_diag: torch.Tensor | None, *, variant: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-Max (Z integer). ``variant="paper"`` (default): s = (max − min)/M, Z = −round(min/s), as the NeUQI code
    and paper compare against (spec §1). ``variant="gptq"``: the range is widened to include 0,
    s = (max(max, 0) − min(min, 0))/M, Z = round(−min(min, 0)/s), as GPTQ's reference quantizer. Ignores h.
    """
    m = max_code(bits)
    w = weight.view(weight.shape[0], -1, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    if variant == "gptq":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    elif variant != "paper":
        raise ConfigError(f"minmax variant must be 'paper' or 'gptq', got {variant!r}")
    constant = hi == lo
    scale = torch.where(constant, 1.0, (hi - lo) / m)
    zero_point = -torch.round(lo / scale)
    c_scale, c_zero = _constant_params(lo)
    return torch.where(constant, c_scale, scale), torch.where(constant, c_zero, zero_point)


def _search(
    g: SortedGroups,
    scales: torch.Tensor,
    evaluate: Callable[[SortedGroups, torch.Tensor, list[int] | None], torch.Tensor],
    bits: int,
    incumbent: torch.Tensor | None = None,
    prune: bool = True,
    block: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate per group: (loss, column) over ``scales`` (N, C), ascending along each row (spec §3).

    ``evaluate(groups, scale (k, c), live)`` returns the normalised loss s²·F (k, c), inf past ``live[c]`` rows
    (all rows for None). The earliest column wins ties. With an ``incumbent`` loss (N,) a candidate must beat it
    strictly, else the column is −1 (the reference's running "<" over coarse, then fine candidates).

    Pruning (``prune``) is exact: ``clip_bound`` is a lower bound, nonincreasing in s, so the candidates whose bound
    exceeds a loss already found form a prefix of each row, found by binary search. Without an incumbent the top
    4 columns are evaluated first to find such a loss. The groups are then ordered by their first surviving
    column, so that each block of columns runs on a prefix of them.
    """
    n_rows, n_cols = scales.shape
    device = scales.device
    best_loss = torch.full((n_rows,), float("inf"), dtype=torch.float64, device=device)
    best_col = torch.full((n_rows,), n_cols, dtype=torch.long, device=device)

    def update(loss: torch.Tensor, first_col: int, rows: slice | torch.Tensor) -> None:
        value, col = loss.min(1)  # the earliest column of the block on ties
        col += first_col
        old_loss, old_col = best_loss[rows], best_col[rows]
        better = (value < old_loss) | ((value == old_loss) & (col < old_col))
        best_loss[rows] = torch.where(better, value, old_loss)
        best_col[rows] = torch.where(better, col, old_col)

    top = (n_cols if incumbent is not None else max(0, n_cols - 4)) if prune else 0
    if top < n_cols:
        for a in range(top, n_cols, block):
            update(evaluate(g, scales[:, a : a + block], None), a, slice(None))
    if top > 0:
        known = best_loss if incumbent is None else torch.minimum(best_loss, incumbent)
        limit = known * (1 + 1e-9) + 1e-12 * g.weight.shape[1] * g.weight.abs().amax(1) ** 2
        first = torch.zeros(n_rows, dtype=torch.long, device=device)  # columns before it are pruned
        step = 1 << (top.bit_length() - 1)
        while step:
            probe = first + (step - 1)
            bound = g.clip_bound(scales.gather(1, probe.clamp(max=top - 1).unsqueeze(1)), bits).squeeze(1)
            first += ((probe < top) & (bound > limit)) * step
            step >>= 1
        first, order = torch.sort(first, stable=True)
        g_sorted, scales_sorted = g.subset(order), scales.index_select(0, order)
        live = torch.searchsorted(first, torch.arange(1, top + 1, device=device)).tolist()  # #{first ≤ c}
        for a in range(0, top, block):
            b = min(a + block, top)
            if live[b - 1]:
                head = g_sorted.head(live[b - 1])
                loss = evaluate(head, scales_sorted[: live[b - 1], a:b], live[a:b])
                update(loss, a, order[: live[b - 1]])
    if incumbent is not None:
        won = best_loss < incumbent
        return torch.where(won, best_loss, incumbent), torch.where(won, best_col, -1)
    return best_loss, best_col


def _neuqi_loss(bits: int) -> Callable[[SortedGroups, torch.Tensor, list[int] | None], torch.Tensor]:
    def evaluate(g: SortedGroups, scale: torch.Tensor, live: list[int] | None) -> torch.Tensor:
        return g.solve(scale, bits, zero_points=False, live=live)[1] * scale**2

    return evaluate


def _integer_loss(bits: int) -> Callable[[SortedGroups, torch.Tensor, list[int] | None], torch.Tensor]:
    def evaluate(g: SortedGroups, scale: torch.Tensor, live: list[int] | None) -> torch.Tensor:
        loss = torch.full_like(scale, float("inf"))
        for c in range(scale.shape[1]):
            k = scale.shape[0] if live is None else live[c]
            if k:
                loss[:k, c] = (g if k == len(g.weight) else g.head(k)).integer_loss(scale[:k, c], bits)[1]
        return loss

    return evaluate


def _fit(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    hessian_diag: torch.Tensor | None,
    row_chunk: int | None,
    fit_chunk: Callable[[SortedGroups, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fit_chunk(groups, s0) → (scale, zero_point)`` over chunks of ``row_chunk`` rows; fit constant groups."""
    m = max_code(bits)
    out_features, in_features = weight.shape
    if row_chunk is None:
        row_chunk = max(1, _CHUNK_ELEMENTS.get(weight.device.type, _CHUNK_ELEMENTS_ACCELERATOR) // in_features)
    check_positive_int("row_chunk", row_chunk)
    scale = torch.empty(out_features, in_features // group_size, dtype=torch.float32, device=weight.device)
    zero_point = torch.empty_like(scale)
    for a in range(0, out_features, row_chunk):
        b = min(a + row_chunk, out_features)
        g = SortedGroups.build(weight[a:b].reshape(-1, group_size), _group_h(hessian_diag, b - a, group_size))
        s0 = (g.weight[:, -1] - g.weight[:, 0]) / m  # (max − min)/M per group
        constant = s0 == 0
        s, zp = fit_chunk(g, torch.where(constant, 1.0, s0))
        c_scale, c_zero = _constant_params(g.weight[:, 0].float())
        scale[a:b] = torch.where(constant, c_scale, s.float()).view(b - a, -1)
        zero_point[a:b] = torch.where(constant, c_zero, zp.float()).view(b - a, -1)
    return scale, zero_point


def _check_steps(*steps: int) -> None:
    for value in steps:
        check_positive_int("grid steps", value)


SEARCHES = ("coarse_to_fine", "full")


def _scale_search(
    g: SortedGroups,
    s0: torch.Tensor,
    evaluate: Callable[[SortedGroups, torch.Tensor, list[int] | None], torch.Tensor],
    bits: int,
    search: str,
    steps: int,
    coarse_steps: int,
) -> torch.Tensor:
    """The best scale per group (N,) among the candidates of ``search`` (spec §3), scored by ``evaluate``.

    ``coarse_to_fine`` (grid2_s_*): s = s0·i/coarse_steps for i = 1..coarse_steps, then s_mid + s0·j/steps for
    j ∈ {−16..16}∖{0} around the coarse best s_mid (half-width steps/coarse_steps/2). ``full`` (grid_s_*):
    s = s0·i/steps for i = 1..steps. Ties keep the earlier (smaller) scale, coarse before fine.
    """
    if search not in SEARCHES:
        raise ConfigError(f"scale search must be one of {list(SEARCHES)}, got {search!r}")
    _check_steps(steps, coarse_steps)
    if steps % coarse_steps:
        raise ConfigError(f"steps must be a multiple of coarse_steps, got {steps} and {coarse_steps}")
    grid = torch.arange(1, (steps if search == "full" else coarse_steps) + 1, device=s0.device)
    scales = s0.unsqueeze(1) * (grid.double() / grid[-1])
    loss, col = _search(g, scales, evaluate, bits)
    s = scales.gather(1, col.unsqueeze(1)).squeeze(1)
    if search == "coarse_to_fine":
        half = steps // coarse_steps // 2
        offsets = torch.cat([torch.arange(-half, 0), torch.arange(1, half + 1)]).to(s0.device).double()
        fine = s.unsqueeze(1) + s0.unsqueeze(1) * offsets / steps
        _, col = _search(g, fine, evaluate, bits, incumbent=loss, prune=False)  # few would be pruned
        s = torch.where(col >= 0, fine.gather(1, col.clamp(min=0).unsqueeze(1)).squeeze(1), s)
    return s


@register_init("neuqi_int")
def neuqi_int(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    hessian_diag: torch.Tensor | None,
    *,
    search: str = "full",
    steps: int = 2048,
    coarse_steps: int = 64,
    row_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeUQI_int: the best integer zero-point Z ∈ {0..M} for each candidate scale.

    ``search="full"`` (default, spec §3 grid_s_zp): s ∈ {s0·i/steps : i = 1..steps}, s0 = (max − min)/M, i.e.
    steps·2^bits evaluations per group. ``search="coarse_to_fine"``: NeUQI's 96 candidate scales (see
    ``_scale_search``), about 20× cheaper; it isolates what the real-valued zero-point adds.
    """
    evaluate = _integer_loss(bits)

    def fit_chunk(g: SortedGroups, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = _scale_search(g, s0, evaluate, bits, search, steps, coarse_steps)
        return s, integer_zero_point(g.weight / s.unsqueeze(1), g.h, bits)[0]

    return _fit(weight, bits, group_size, hessian_diag, row_chunk, fit_chunk)


@register_init("neuqi")
def neuqi(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    hessian_diag: torch.Tensor | None,
    *,
    search: str = "coarse_to_fine",
    steps: int = 2048,
    coarse_steps: int = 64,
    row_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeUQI (spec §3): for each candidate scale the optimal real zero-point (``zero_point.py``).

    ``search="coarse_to_fine"`` (default, grid2_s_best_zp) or ``"full"`` (grid_s_best_zp): see ``_scale_search``.
    """
    evaluate = _neuqi_loss(bits)

    def fit_chunk(g: SortedGroups, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = _scale_search(g, s0, evaluate, bits, search, steps, coarse_steps)
        zero_point = g.solve(s.unsqueeze(1), bits)[0].squeeze(1)
        return s, zero_point

    return _fit(weight, bits, group_size, hessian_diag, row_chunk, fit_chunk)
