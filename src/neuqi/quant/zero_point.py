"""The optimal real zero-point of a group for a given scale (spec §2): a fast exact solver and an exact reference.

For one group with scale s, let x = w/s (length n), weights h ≥ 0 and M = 2^bits − 1. In the spec's internal
offset z = −Z (the lowest grid level in units of s) the objective is

    F(z) = Σ_i h_i · min_{q ∈ {0..M}} (z + q − x_i)²        (nearest level = clamp(round(x − z), 0, M))

and the loss in weight units is s²·F; neuqi's zero-point is Z = −z (``grid.py``). F is a minimum of quadratics: on
every piece of z where each element keeps its level q_i it equals Σ h (z − c_i)² with c_i = x_i − q_i, hence

    min_z F = min over pieces of  V = Σ h c² − (Σ h c)² / Σ h,   attained at z = Σ h c / Σ h

(V of any assignment of levels bounds min F from above, and the optimal piece attains it).

**Fast solver** (``optimal_zero_point``, ``SortedGroups.solve``). Our derivation, not the reference's two sorted
stages: moving z by one level changes F by D(z) = F(z) − F(z − 1) = 2 Σ h [(z − p_i)₊ − (r_i − z)₊] with
p_i = x_i + ½, r_i = x_i − M + ½, because only clipped elements change their error. D is continuous and nondecreasing,
so for a root z_r of D every z ≥ z_r can step down by whole levels, and every z < z_r − 1 step up, without raising F:
a global minimum lies in the *unit* window [z_r − 1, z_r]. There each element drops at most one level, at its phase
frac(x + ½ − L) past L = z_r − 1, and the n + 1 pieces are the prefixes of the elements in phase order.
* z_r: branchless binary searches over the sorted weights with prefix sums of h and h·w, O(log² n) per group.
* Phases are sorted as int32 keys (row in slice, ⌊phase·(2^P − 1)⌋) in slices of 2^16 values: a radix sort in torch.
  Phases within δ = 1/(2^P − 1) share a key and may swap, which hides only pieces narrower than δ; F is then at most
  Σh·δ² too high, and rows where that could exceed 1e-7·F (F ≈ 0) are re-sorted exactly.
* x = w/s keeps the order of w for every s > 0, so a scale search sorts each group once (``SortedGroups``).
Nothing assumes Σ h = 1 (spec §10.5, §11.4); a group whose h is all zero is solved unweighted.

**Exact reference** (``exact_zero_point``): sorts all n·M breakpoints x_i − q − ½ (q = 0..M−1), sweeps them, and on
every piece takes the weighted mean of c clamped to the piece; float64, O(n·2^k log(n·2^k)) per group (spec §11.6).

**Integer grid** (``integer_zero_point``): Z ∈ {0..M}, F evaluated directly, the smallest Z wins ties (spec §2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import torch

from .grid import max_code

_SORT_SLICE = 1 << 16  # values per sorted slice
_RADIX_MIN = 1 << 15  # torch sorts 1-D integer tensors at least this long with a radix sort
_ROOT_BLOCK = 1 << 13  # (group, scale) pairs per root-search block: small tensors avoid page faults


def _weights(x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """h as float64 with the shape of x; rows whose h sums to zero become all ones (unweighted)."""
    if h is None:
        return torch.ones_like(x, dtype=torch.float64)
    h = torch.broadcast_to(h, x.shape).to(torch.float64)
    if (h < 0).any() or not torch.isfinite(h).all():
        raise ValueError("h must be finite and nonnegative")
    return torch.where(h.sum(-1, keepdim=True) == 0, torch.ones_like(h), h)


def objective(x: torch.Tensor, h: torch.Tensor | None, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """F(Z) = Σ h (clamp(round(x + Z), 0, M) − Z − x)² over the last dim, float64; zero_point: x.shape[:-1]."""
    m = max_code(bits)
    x = x.to(torch.float64)
    zp = zero_point.to(torch.float64).unsqueeze(-1)
    err = torch.round(x + zp).clamp_(0, m) - zp - x
    return (_weights(x, h) * err * err).sum(-1)


class _Workspace:
    """Buffers for the sweeps of one chunk, reused for every scale: fresh multi-megabyte tensors cost page faults."""

    def __init__(self, n_rows: int, n: int, device: torch.device) -> None:
        shape = (n_rows, n)
        self.y, self.phase, self.level, self.hd, self.step, self.step2, self.s1, self.half_v = (
            torch.empty(shape, dtype=torch.float64, device=device) for _ in range(8)
        )
        self.counted, self.below = (torch.empty(shape, dtype=torch.bool, device=device) for _ in range(2))
        self.key = torch.empty(shape, dtype=torch.int32, device=device)
        self.slice_rows = max(1, _SORT_SLICE // n)
        # keys stay below 2^27 (a short last slice joins the one before): the radix sort's last pass then has few
        # buckets; many equal-sized ones alias in the cache and double its time.
        self.phase_bits = 27 - (2 * self.slice_rows - 1).bit_length()
        rows = torch.arange(n_rows, device=device, dtype=torch.float64)
        self.key_offset = torch.remainder(rows, self.slice_rows).mul_(2.0**self.phase_bits).unsqueeze(1)
        size = min(n_rows, 2 * self.slice_rows) * n
        self.sorted_key = torch.empty(size, dtype=torch.int32, device=device)
        self.order = torch.empty(size, dtype=torch.long, device=device)

    def head(self, rows: int) -> _Workspace:
        """A view of the buffers of the first ``rows`` groups."""
        view = copy.copy(self)
        for name in ("y", "phase", "level", "hd", "step", "step2", "s1", "half_v", "counted", "below", "key"):
            setattr(view, name, getattr(self, name)[:rows])
        view.key_offset = self.key_offset[:rows]
        return view


@dataclass
class SortedGroups:
    """N groups of n weights sorted ascending once, reused for every candidate scale (spec §11.7).

    ``weight``, ``h``: (N, n) float64 with h scaled to mean 1 per group (Σ h = n); ``cum_h``, ``cum_hw``,
    ``cum_hw2``: (N, n + 1) prefix sums of h, h·w and h·w² with a leading 0. Tables for the balance-point search,
    independent of the scale: ``spread`` (N, n) = Σ_{j<k} h_j (w_k − w_j), ``gap`` (N, n) = Σ_{i≤j} h_i (w_i − w_j),
    ``tail_h`` (N, n + 1) = Σ_{j≥t} h_j and ``tail_hw`` (N, n + 1) = −Σ_{j≥t} h_j w_j.
    """

    weight: torch.Tensor
    h: torch.Tensor
    cum_h: torch.Tensor
    cum_hw: torch.Tensor
    cum_hw2: torch.Tensor
    spread: torch.Tensor
    gap: torch.Tensor
    tail_h: torch.Tensor
    tail_hw: torch.Tensor
    _workspace: _Workspace | None = field(default=None, repr=False)

    @classmethod
    def build(cls, weight: torch.Tensor, h: torch.Tensor | None = None) -> SortedGroups:
        """weight: (N, n); h: (N, n) ≥ 0 or None. Rows of h that sum to zero become ones."""
        weight = weight.to(torch.float64)
        h = _weights(weight, h)
        h = h / h.mean(-1, keepdim=True)
        weight, order = torch.sort(weight, dim=-1)
        h = h.gather(-1, order)
        zero = weight.new_zeros(weight.shape[0], 1)
        hw = h * weight
        cum_h, cum_hw, cum_hw2 = (torch.cat([zero, t.cumsum(-1)], -1) for t in (h, hw, hw * weight))
        spread = weight * cum_h[:, :-1] - cum_hw[:, :-1]
        gap = cum_hw[:, 1:] - cum_h[:, 1:] * weight
        return cls(weight, h, cum_h, cum_hw, cum_hw2, spread, gap, cum_h[:, -1:] - cum_h, cum_hw - cum_hw[:, -1:])

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "_workspace")

    def subset(self, rows: torch.Tensor) -> SortedGroups:
        """The groups ``rows`` (an index tensor) only, copied."""
        return SortedGroups(*(t.index_select(0, rows) for t in self._tensors()))

    def head(self, rows: int) -> SortedGroups:
        """The first ``rows`` groups, as views that share the sweep buffers."""
        return SortedGroups(*(t[:rows] for t in self._tensors()), _workspace=self._buffers().head(rows))

    def _buffers(self) -> _Workspace:
        if self._workspace is None:
            self._workspace = _Workspace(*self.weight.shape, self.weight.device)
        return self._workspace

    def clip_bound(self, scale: torch.Tensor, bits: int) -> torch.Tensor:
        """A lower bound on min_Z s²·F for the scales ``scale`` (N, C): (N, C), nonincreasing in s.

        An element's error is at least its distance to the rounding range [−½, M + ½] of the grid (in units of s),
        so s²·F ≥ min_ζ Σ h dist²(w, [ζ − s/2, ζ + (M + ½)s]); the minimiser ζ is the balance point for M + 1.
        """
        m = max_code(bits)
        scale = scale.to(torch.float64)
        zeta = _balance_points(self, scale, m + 1)
        lo, hi = zeta - 0.5 * scale, zeta + (m + 0.5) * scale
        below = torch.searchsorted(self.weight, lo)  # values under the range: w < lo
        above = torch.searchsorted(self.weight, hi, right=True)  # values over it: index ≥ above

        def cost(k: torch.Tensor, edge: torch.Tensor, sign: float) -> torch.Tensor:  # Σ ±(h (w − edge)²) to k
            ch, chw, chw2 = (t.gather(1, k) for t in (self.cum_h, self.cum_hw, self.cum_hw2))
            return sign * (ch * edge * edge - 2 * edge * chw + chw2)

        total = cost(below, lo, 1.0) + cost(torch.full_like(above, self.weight.shape[1]), hi, 1.0)
        return (total + cost(above, hi, -1.0)).clamp_(min=0.0)

    def integer_loss(self, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best integer zero-point for one scale per group, ``scale`` (N,): (Z, s²·F), both (N,) float64.

        Equal to ``integer_zero_point(w / s, h, bits)`` up to rounding, in one pass over the weights instead of
        M + 1. With Z integer an element's code is clamp(round(x) + Z, 0, M), x = w/s: it is clipped low when
        x < −Z − ½, high when x ≥ M − Z + ½ (a prefix and a suffix of the sorted weights; at the edges both
        errors are ½), else its error is round(x) − x whatever Z is. So, in weight units,

            s²·F(Z) = Σ_{i<a} h (w + sZ)² + Σ_{a≤i<b} h (s·round(w/s) − w)² + Σ_{i≥b} h (w − s(M − Z))²,

        the outer sums from the prefix sums of h, h·w, h·w² and the middle one from one cumulative sum.
        """
        m = max_code(bits)
        s = scale.to(torch.float64).unsqueeze(1)  # (N, 1)
        err = torch.round(self.weight / s).mul_(s).sub_(self.weight)
        mid = torch.cat([err.new_zeros(len(err), 1), err.mul_(err).mul_(self.h).cumsum_(1)], 1)  # (N, n + 1)
        sz = s * torch.arange(m + 1, dtype=torch.float64, device=s.device)  # (N, M + 1): s·Z
        a = torch.searchsorted(self.weight, -sz - 0.5 * s)  # #{w < s(−Z − ½)}
        b = torch.searchsorted(self.weight, s * (m + 0.5) - sz)  # #{w < s(M − Z + ½)}
        c = s * m - sz

        def at(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return t.gather(1, k)

        low = at(self.cum_hw2, a) + 2 * sz * at(self.cum_hw, a) + sz * sz * at(self.cum_h, a)
        t0, t1, t2 = (t[:, -1:] - at(t, b) for t in (self.cum_h, self.cum_hw, self.cum_hw2))
        loss = (low + at(mid, b) - at(mid, a) + t2 - 2 * c * t1 + c * c * t0).clamp_(min=0.0)
        best, zero_point = loss.min(1)  # the smallest Z on ties
        return zero_point.to(torch.float64), best

    def solve(
        self, scale: torch.Tensor, bits: int, zero_points: bool = True, live: list[int] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Optimal zero-points for the candidate scales ``scale`` (N, C) > 0: (Z, F), both (N, C) float64.

        F is in units of s² with the normalised h; the weighted loss is s²·F·mean(h). ``zero_points=False`` skips
        Z (returns None), which a scale search needs only for the winner. ``live[c]``: solve column c for the
        first live[c] groups only; the others get F = inf (and Z = nan).
        """
        m = max_code(bits)
        scale = scale.to(torch.float64)
        n_rows, n_cols = scale.shape
        live = [n_rows] * n_cols if live is None else live
        self._buffers()
        root = torch.empty_like(scale)  # balance points in weight units, for 8 columns at a time
        for a in range(0, n_cols, 8):
            b = min(a + 8, n_cols)
            rows = max(live[a:b])
            if rows:
                root[:rows, a:b] = _balance_points(self.head(rows), scale[:rows, a:b], m)
        f_all = torch.full_like(scale, float("inf"))
        z_all = torch.full_like(scale, float("nan")) if zero_points else None
        for c in range(n_cols):
            rows = live[c]
            if rows == 0:
                continue
            g = self if rows == n_rows else self.head(rows)
            low, f = _sweep(g, scale[:rows, c].contiguous(), root[:rows, c].contiguous(), m, zero_points)
            f_all[:rows, c] = f
            if z_all is not None:
                z_all[:rows, c] = -low
        return z_all, f_all


def _balance_points(g: SortedGroups, scale: torch.Tensor, m: int) -> torch.Tensor:
    """A root of D for every group and candidate scale, in weight units (ζ = z_r·s): (N, C), in blocks of rows."""
    rows = max(1, _ROOT_BLOCK // scale.shape[1])
    return torch.cat([_balance_block(g.head(a + rows), a, scale[a : a + rows], m) for a in range(0, len(scale), rows)])


def _balance_block(g: SortedGroups, first: int, scale: torch.Tensor, m: int) -> torch.Tensor:
    """Root ζ of D(ζ)·s/2 = Σ h [(ζ − p)₊ − (r − ζ)₊], p_k = w_k + s/2, r_k = w_k − (M − ½)s (weight units), for
    the groups from ``first`` on.

    First K = #{k : D(p_k) ≤ 0} (torch.searchsorted counts the r_j ≤ p_k), then J = #{j : f(r_j) ≤ 0} for the
    f that equals D on [p_{K−1}, p_K]. On [p_{K−1}, p_K] ∩ [r_{J−1}, r_J] D is linear; its root is closed-form.
    With the tables of ``SortedGroups``, D(p_k)·s/2 = spread_k + tail_hw_t + (w_k + M s)·tail_h_t.
    """
    weight, cum_h, cum_hw = g.weight[first:], g.cum_h[first:], g.cum_hw[first:]
    spread, gap, tail_h, tail_hw = g.spread[first:], g.gap[first:], g.tail_h[first:], g.tail_hw[first:]
    n = weight.shape[1]
    h_all = cum_h[:, -1:]
    half, top_shift, m_scale = 0.5 * scale, (m - 0.5) * scale, m * scale

    def count(nonpositive) -> torch.Tensor:  # #{k < n : nonpositive(k)} for a predicate true on a prefix
        pos = torch.zeros(scale.shape, dtype=torch.long, device=scale.device)
        step = 1 << (n.bit_length() - 1)
        while step:
            k = pos + (step - 1)
            valid = k < n
            pos += (valid & nonpositive(k.clamp_(max=n - 1))) * step
            step >>= 1
        return pos

    def bottom_ok(k: torch.Tensor) -> torch.Tensor:  # D(p_k) ≤ 0, using p_k + M − ½ = w_k + M s
        v = weight.gather(1, k).add_(m_scale)
        t = torch.searchsorted(weight, v, right=True)  # #{j : r_j ≤ p_k}
        return (spread.gather(1, k) + tail_hw.gather(1, t)).addcmul_(v, tail_h.gather(1, t)) <= 0

    k_bot = count(bottom_ok)
    ch_bot = cum_h.gather(1, k_bot)
    bot = cum_hw.gather(1, k_bot).addcmul_(half, ch_bot)  # Σ_{i<K} h_i p_i
    h_bot_all = ch_bot + h_all
    top_const = bot + cum_hw[:, -1:] + top_shift * ch_bot

    def top_ok(j: torch.Tensor) -> torch.Tensor:  # f(r_j) ≤ 0
        return gap.gather(1, j).addcmul_(h_bot_all, weight.gather(1, j)) <= top_const

    j_top = count(top_ok)
    h_top = tail_h.gather(1, j_top)
    slope = ch_bot + h_top
    offset = bot - tail_hw.gather(1, j_top) - top_shift * h_top

    def weight_at(k: torch.Tensor) -> torch.Tensor:
        return weight.gather(1, k.clamp(0, n - 1))

    inf = torch.full_like(scale, float("inf"))
    left = torch.maximum(
        torch.where(k_bot > 0, weight_at(k_bot - 1) + half, -inf),
        torch.where(j_top > 0, weight_at(j_top - 1) - top_shift, -inf),
    )
    right = torch.minimum(
        torch.where(k_bot < n, weight_at(k_bot) + half, inf), torch.where(j_top < n, weight_at(j_top) - top_shift, inf)
    )
    root = torch.where(slope > 0, offset / slope.clamp(min=1e-300), torch.where(left.isfinite(), left, right))
    return torch.minimum(torch.maximum(root, left), right)


def _sweep(
    g: SortedGroups, scale: torch.Tensor, root: torch.Tensor, m: int, zero_points: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Exact minimum over the window [L, L + 1], L = root/s − 1, for one scale per group: (z or None, F), (N,).

    z is the lowest level (= −Z). With y = x − L + ½, an element sits at level d = ⌊y⌋ at z = L and drops to d − 1
    at z = L + (y − d); only 1 ≤ d ≤ M changes its clamped level. Sorting the phases y − d gives every piece.
    """
    ws = g._workspace
    n_rows, n = g.weight.shape
    inv = 1.0 / scale
    y, phase, level, d = ws.y, ws.phase, ws.level, ws.y
    torch.addcmul((1.5 - root * inv).unsqueeze(1), g.weight, inv.unsqueeze(1), out=y)  # x − L + ½
    torch.floor(y, out=level)
    torch.sub(y, level, out=phase)
    torch.ge(level, 1, out=ws.counted)
    ws.counted.logical_and_(torch.le(level, m, out=ws.below))
    d.sub_(level.clamp_(0, m))  # x − q − L + ½ on the first piece (q = clamped level)
    torch.mul(g.h, d, out=ws.hd)
    sum_hd = ws.hd.sum(1)
    b1 = sum_hd - 0.5 * n  # Σ h c with c = x − q − L (Σ h = n)
    b2 = torch.linalg.vecdot(ws.hd, d, dim=1) - sum_hd + 0.25 * n  # Σ h c²
    torch.mul(g.h, ws.counted, out=ws.step)  # Δ(Σ h c) when the element drops a level
    torch.mul(ws.step, phase, out=ws.step2)  # ½ Δ(Σ h c²) = ½ h ((c + 1)² − c²), c = phase − ½

    ws.key.copy_(torch.add(ws.key_offset, phase, alpha=2.0**ws.phase_bits - 1, out=level))
    starts = list(range(0, n_rows, ws.slice_rows)) + [n_rows]
    if len(starts) > 2 and (n_rows - starts[-2]) * n < _RADIX_MIN:  # too short for the radix sort: merge it
        ws.key[starts[-2] :] += ws.slice_rows << ws.phase_bits
        del starts[-2]
    key, step, step2 = ws.key.view(-1), ws.step.view(-1), ws.step2.view(-1)
    s1, half_v = ws.s1.view(-1), ws.half_v.view(-1)
    for a, b in zip(starts[:-1], starts[1:]):
        a, b = a * n, b * n
        order = ws.order[: b - a]
        torch.sort(key[a:b], out=(ws.sorted_key[: b - a], order))  # rows of the slice, each phase-ascending
        torch.index_select(step[a:b], 0, order, out=s1[a:b])
        torch.index_select(step2[a:b], 0, order, out=half_v[a:b])
    f, s1_best = _best_piece(ws.s1, ws.half_v, b1, b2, zero_points)
    # Phases within δ = 1/(2^P − 1) share a key and may swap. That only hides pieces narrower than δ, whose
    # neighbours are evaluated, so F is at most Σh·δ² above the optimum. Rows where that could exceed 1e-7·F
    # (F ≈ 0: values on the grid, constant groups) are redone with an exact sort.
    loose = (f * 1e-7 < n / (2.0**ws.phase_bits - 1) ** 2).nonzero().squeeze(1)
    if loose.numel():
        order = torch.sort(phase[loose], dim=1, stable=True).indices
        f_exact, s1_exact = _best_piece(
            ws.step[loose].gather(1, order), ws.step2[loose].gather(1, order), b1[loose], b2[loose], zero_points
        )
        f[loose] = f_exact
        if s1_best is not None:
            s1_best[loose] = s1_exact
    if s1_best is None:
        return None, f
    return root * inv - 1.0 + s1_best / n, f


def _best_piece(
    s1: torch.Tensor, half_v: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, want_piece: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From the phase-sorted steps of Σ h c (``s1``) and ½Σ h c² (``half_v``), (N, n), overwritten: the minimum
    V = Σ h c² − (Σ h c)²/n over the n + 1 pieces (N,), and Σ h c on the best piece (or None)."""
    n = s1.shape[1]
    s1[:, 0] += b1
    s1 = s1.cumsum_(1)  # Σ h c after each drop
    half_v = half_v.cumsum_(1).addcmul_(s1, s1, value=-0.5 / n)  # (V − Σ h c²|first piece) / 2
    first = -0.5 / n * b1 * b1  # the same for the first piece; it wins ties
    if not want_piece:
        return (b2 + 2 * torch.minimum(first, half_v.amin(1))).clamp_(min=0.0), None
    best, piece = half_v.min(1)
    s1_best = torch.where(first <= best, b1, s1.gather(1, piece.unsqueeze(1)).squeeze(1))
    return (b2 + 2 * torch.minimum(first, best)).clamp_(min=0.0), s1_best


def _flat(x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError("groups must hold at least one value")
    x = x.to(torch.float64)
    return x.reshape(-1, x.shape[-1]), _weights(x, h).reshape(-1, x.shape[-1])


def optimal_zero_point(
    x: torch.Tensor, h: torch.Tensor | None, bits: int, chunk_elements: int = 1 << 18
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast exact solver: x = w/s (..., n), h ≥ 0 broadcastable to x or None. Returns (Z, F) of shape x.shape[:-1].

    Rescaling a group's h rescales its F and leaves Z unchanged. Groups go in chunks of about ``chunk_elements``
    values, so memory stays bounded. F is evaluated directly at Z (the sweep's V loses digits when F ≈ 0).
    """
    xf, hf = _flat(x, h)
    rows = max(1, chunk_elements // xf.shape[1])
    zs = []
    for a in range(0, xf.shape[0], rows):
        g = SortedGroups.build(xf[a : a + rows], hf[a : a + rows])
        zs.append(g.solve(torch.ones(g.weight.shape[0], 1, dtype=torch.float64, device=xf.device), bits)[0][:, 0])
    zero_point = torch.cat(zs)
    return zero_point.reshape(x.shape[:-1]), objective(xf, hf, zero_point, bits).reshape(x.shape[:-1])


def exact_zero_point(x: torch.Tensor, h: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference solver enumerating every breakpoint (float64, slow): (Z, F) of shape x.shape[:-1].

    Breakpoints are t = x_i − q − ½ (q = 0..M−1), where element i moves from level q + 1 to q as z grows; below all
    of them every element sits at level M. Crossing t adds h_i to Σ h c and 2 h_i t to Σ h c². On each piece
    [t_(j), t_(j+1)] the minimiser is z = clamp(Σ h c / Σ h, t_(j), t_(j+1)); F is recomputed directly at the best z.
    """
    m = max_code(bits)
    xf, hf = _flat(x, h)
    n_groups, n = xf.shape
    h_sum = hf.sum(1, keepdim=True)
    centre = (hf * xf).sum(1, keepdim=True) / h_sum
    xc = xf - centre  # F is translation-equivariant; centring keeps the sums well conditioned
    levels = torch.arange(m, dtype=torch.float64, device=xf.device)
    t, order = torch.sort((xc.unsqueeze(-1) - levels - 0.5).reshape(n_groups, n * m), dim=1)
    w = hf.repeat_interleave(m, dim=1).gather(1, order)
    s1 = torch.cat([(hf * (xc - m)).sum(1, keepdim=True), w], 1).cumsum(1)  # (N, nM + 1)
    s2 = torch.cat([(hf * (xc - m) ** 2).sum(1, keepdim=True), 2 * w * t], 1).cumsum(1)
    inf = torch.full((n_groups, 1), float("inf"), dtype=torch.float64, device=xf.device)
    z = torch.minimum(torch.maximum(s1 / h_sum, torch.cat([-inf, t], 1)), torch.cat([t, inf], 1))
    value = h_sum * z * z - 2 * s1 * z + s2
    z_best = z.gather(1, value.argmin(1, keepdim=True)).squeeze(1) + centre.squeeze(1)
    zero_point = (-z_best).reshape(x.shape[:-1])
    return zero_point, objective(x, h, zero_point, bits)


def integer_zero_point(x: torch.Tensor, h: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best integer zero-point Z ∈ {0..M} by direct evaluation (spec §2 grid_zp): (Z, F) of shape x.shape[:-1]."""
    m = max_code(bits)
    xf, hf = _flat(x, h)
    best_f = torch.full(xf.shape[:1], float("inf"), dtype=torch.float64, device=xf.device)
    best_z = torch.zeros_like(best_f)
    for zp in range(m + 1):
        err = torch.round(xf + zp).clamp_(0, m) - zp - xf
        f = (hf * err * err).sum(1)
        better = f < best_f
        best_f = torch.where(better, f, best_f)
        best_z = torch.where(better, float(zp), best_z)
    return best_z.reshape(x.shape[:-1]), best_f.reshape(x.shape[:-1])
