"""Mixed precision to a bits-per-weight budget: the candidate formats, their exact storage, and the allocation.

Each quantized linear ℓ (n_ℓ = out·in weights) picks one candidate c = (bits k, group size g) from
``candidates(in)``: k ∈ {2, 3, 4} × g ∈ {32, 64, 128} where g divides ``in``, plus channel-wise (g = in, stored as
-1). Its storage is exact: k bits per code plus one fp16 scale and one fp16 zero-point per group,

    cost(ℓ, c) = n_ℓ·k + 32·out·in/g  bits,  i.e.  k + 32/g bits per weight (``storage_bits``),

the same count as ``neuqi.formats.checkpoint.size_report``. Given a predicted loss per (ℓ, c) (``sensitivity``),
``allocate`` solves the multiple-choice knapsack

    minimise Σ_ℓ loss(ℓ, c_ℓ)  subject to  Σ_ℓ cost(ℓ, c_ℓ) ≤ B·Σ_ℓ n_ℓ

by the Lagrangian greedy on each linear's lower convex hull of (cost, loss): start every linear at its cheapest
candidate, take hull upgrades in order of decreasing loss saved per bit while they fit, then spend what is left
on the single replacements that save the most. The fractional (LP) solution of the greedy is a lower bound on the
optimum, reported as ``Allocation.lower_bound``. Costs are integers (bits), so the budget check is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from ..errors import ConfigError

CANDIDATE_BITS = (2, 3, 4)
CANDIDATE_GROUPS = (32, 64, 128, -1)
PARAM_BITS = 32  # one fp16 scale + one fp16 zero-point per group


def storage_bits(bits: int, group_size: int, in_features: int) -> float:
    """Bits per weight of a (bits, group_size) linear with ``in_features`` inputs: bits + 32/g (g = in if -1)."""
    g = in_features if group_size == -1 else group_size
    return bits + PARAM_BITS / g


def linear_cost(bits: int, group_size: int, shape: tuple[int, int]) -> int:
    """Exact storage in bits of an (out, in) linear: codes + fp16 scale and zero per group."""
    out, in_features = shape
    g = in_features if group_size == -1 else group_size
    return out * in_features * bits + PARAM_BITS * out * (in_features // g)


def candidates(in_features: int, bits: Sequence[int] = CANDIDATE_BITS,
               groups: Sequence[int] = CANDIDATE_GROUPS) -> list[tuple[int, int]]:
    """The (bits, group_size) candidates of a linear with ``in_features`` inputs; groups that do not divide it
    are left out, channel-wise (-1) always stays."""
    return [(k, g) for k in bits for g in groups if g == -1 or (g < in_features and in_features % g == 0)]


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate index per item, its total cost and loss, and the LP lower bound on the optimal loss."""

    choice: list[int]
    cost: int
    loss: float
    lower_bound: float


def _hull(costs: Sequence[int], losses: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of the points (cost, loss), by increasing cost and strictly decreasing loss."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], losses[i]))
    pareto: list[int] = []
    for i in order:
        if not pareto or (losses[i] < losses[pareto[-1]] and costs[i] > costs[pareto[-1]]):
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:  # drop points above the segment joining their neighbours
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (costs[b] - costs[a]) * (losses[i] - losses[a]) - (losses[b] - losses[a]) * (costs[i] - costs[a])
            if cross > 0:
                break
            hull.pop()
        hull.append(i)
    return hull


def budget_range(costs: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(Σ cheapest, Σ richest) cost over the items."""
    return sum(min(c) for c in costs), sum(max(c) for c in costs)


def allocate(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int) -> Allocation:
    """Pick one candidate per item minimising Σ loss under Σ cost ≤ ``budget`` (all costs integers).

    ``costs[i][c]``, ``losses[i][c]``: candidate c of item i. Raises ConfigError if even the cheapest choice
    exceeds the budget.
    """
    if len(costs) != len(losses) or any(len(c) != len(v) or not c for c, v in zip(costs, losses)):
        raise ConfigError("allocate needs one non-empty (cost, loss) list per item, of equal lengths")
    low, _ = budget_range(costs)
    if low > budget:
        raise ConfigError(f"budget {budget} is below the cheapest choice {low}")
    hulls = [_hull(c, v) for c, v in zip(costs, losses)]
    choice = [h[0] for h in hulls]
    spent = sum(c[i] for c, i in zip(costs, choice))
    # every hull segment (item, step), by decreasing loss saved per bit; per item the order is the hull's
    steps = [(i, j) for i, h in enumerate(hulls) for j in range(1, len(h))]

    def ratio(step: tuple[int, int]) -> float:
        i, j = step
        a, b = hulls[i][j - 1], hulls[i][j]
        return (losses[i][a] - losses[i][b]) / (costs[i][b] - costs[i][a])

    steps.sort(key=lambda s: (-ratio(s), s[0], s[1]))
    blocked: set[int] = set()
    bound = None
    for i, j in steps:
        if i in blocked or hulls[i][j - 1] != choice[i]:
            continue
        extra = costs[i][hulls[i][j]] - costs[i][choice[i]]
        if spent + extra > budget:
            blocked.add(i)  # later hull steps of this item are worse per bit: skip them all
            if bound is None:  # the LP optimum takes this step fractionally
                base = sum(v[k] for v, k in zip(losses, choice))
                bound = base - ratio((i, j)) * (budget - spent)
            continue
        choice[i] = hulls[i][j]
        spent += extra
    choice, spent = _fill(costs, losses, choice, spent, budget)
    loss = sum(v[k] for v, k in zip(losses, choice))
    return Allocation(choice, spent, loss, loss if bound is None else min(bound, loss))


def _fill(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], choice: list[int], spent: int,
          budget: int) -> tuple[list[int], int]:
    """Spend the budget left by the greedy: repeatedly apply the single replacement that saves the most loss."""
    choice = list(choice)
    while True:
        best, gain = None, 0.0
        for i, (c, v) in enumerate(zip(costs, losses)):
            for k in range(len(c)):
                if spent - c[choice[i]] + c[k] <= budget and v[choice[i]] - v[k] > gain:
                    best, gain = (i, k), v[choice[i]] - v[k]
        if best is None:
            return choice, spent
        i, k = best
        spent += costs[i][k] - costs[i][choice[i]]
        choice[i] = k


def budget_bits(bpw: float, n_weights: int) -> int:
    """⌊bpw·n_weights⌋ bits, computed exactly from the decimal value of ``bpw``."""
    if not (isinstance(bpw, (int, float)) and math.isfinite(bpw) and bpw > 0):
        raise ConfigError(f"bpw must be a positive number, got {bpw!r}")
    return math.floor(Fraction(str(bpw)) * n_weights)


def plan_budget(shapes: dict[str, tuple[int, int]], losses: dict[str, dict[tuple[int, int], float]],
                bpw: float) -> tuple[dict[str, list[int]], Allocation]:
    """{name: [bits, group_size]} minimising Σ losses[name][(bits, group)] at ``bpw`` average bits per weight.

    ``shapes[name]`` = (out, in); ``losses[name]`` maps each candidate to its predicted loss. A budget outside
    the reachable range is refused with a ConfigError that states the range.
    """
    names = list(shapes)
    options = [list(losses[n]) for n in names]
    costs = [[linear_cost(k, g, shapes[n]) for k, g in opts] for n, opts in zip(names, options)]
    values = [[losses[n][o] for o in opts] for n, opts in zip(names, options)]
    n_weights = sum(o * i for o, i in shapes.values())
    low, high = budget_range(costs)
    budget = budget_bits(bpw, n_weights)
    if budget < low or bpw > high / n_weights:
        raise ConfigError(f"bpw {bpw:g} is outside the reachable range [{low / n_weights:.4f}, "
                          f"{high / n_weights:.4f}] bits per weight for these linears and candidates")
    alloc = allocate(costs, values, budget)
    plan = {n: list(opts[k]) for n, opts, k in zip(names, options, alloc.choice)}
    return plan, alloc
