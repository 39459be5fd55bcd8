"""How much each (linear, bits, group size) choice costs the model end to end: the losses ``budget`` allocates on.

Raw layer losses tr(ΔW H ΔWᵀ) are not comparable across linears: an error in a value projection and the same
error in a down projection move the model's output by very different amounts. We weight them with the
**output Fisher**, a second-order expansion of the model's cross-entropy around the FP model. With y = W x the
linear's output at a token, g = ∂CE/∂y and F_o = E[g_o²] over the calibration tokens (one backward pass),

    ΔCE ≈ ½ E[(ΔW x)ᵀ diag(g²) (ΔW x)] ≈ ½ Σ_o F_o · (ΔW H ΔWᵀ)_oo,    H = E[x xᵀ]

(gradients and inputs taken as uncorrelated, the Fisher as diagonal). The prediction is in nats per token, the
same unit for every linear, and the sum over linears predicts the increase of log-perplexity. ``weighting="layer"``
drops F (the raw loss) for comparison.

``measure_stats`` runs the FP model once, forward and backward, on a few calibration windows and keeps per
linear H (shared by linears that read the same tensor) and F. ``candidate_losses`` quantizes a seeded random
subset of each linear's rows with the configured initializer and solver at every candidate (rows are independent
in LDLQ/GPTQ for a fixed H) and scales the sum up to all rows. ``plan_for_budget`` ties it to ``budget``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..quant import grid, solvers
from . import adapters, budget
from .config import QuantConfig

log = logging.getLogger(__name__)

WEIGHTINGS = ("fisher", "layer")


@dataclass
class LinearStats:
    """FP statistics of one linear: ``hessian`` H = E[x xᵀ] (in, in) fp32 (possibly shared), ``fisher``
    F = E[(∂CE/∂y)²] (out,) fp32, the CE summed over tokens."""

    hessian: torch.Tensor
    fisher: torch.Tensor


def decoder_linears(model: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """{qualified name: (layer name, nn.Linear)} of the linears inside the decoder layers, named as the walker
    names them."""
    stack = adapters.find_stack(model)
    return {f"{stack.layer_name(i)}.{n}": (stack.layer_name(i), m) for i, layer in enumerate(stack.layers)
            for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _hooks(linears: dict[str, tuple[str, nn.Linear]], grams: dict[str, torch.Tensor],
           fisher: dict[str, torch.Tensor], alias: dict[str, str]) -> list[Any]:
    """Forward hooks accumulating XᵀX once per input tensor (a linear reading the tensor that an earlier linear of
    its layer read is aliased to that one) and registering gradient hooks that accumulate g² per output."""
    seen: dict[str, dict[tuple[int, tuple], tuple[str, torch.Tensor]]] = {}  # layer -> its inputs, kept alive

    def hook(name: str, layer: str):
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, in)
            if layer not in seen:
                seen.clear()
            inputs = seen.setdefault(layer, {})
            first = alias.setdefault(name, inputs.setdefault((x.data_ptr(), tuple(x.shape)), (name, x))[0])
            if first == name:
                x32 = x.float()
                grams[name] = grams.get(name, 0) + (x32.T @ x32).double()
            if out.requires_grad:
                out.register_hook(lambda g: fisher.__setitem__(
                    name, fisher.get(name, 0) + g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)))
        return fn

    return [m.register_forward_hook(hook(n, layer)) for n, (layer, m) in linears.items()]


def measure_stats(model: nn.Module, tokens: torch.Tensor, device: torch.device | None = None) -> dict[str, LinearStats]:
    """H and F of every decoder linear from one forward and backward pass per window of ``tokens`` (n, seqlen)
    through the FP model (its dtype, on ``device``; parameters get no gradients)."""
    linears = decoder_linears(model)
    device = device or next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    fisher: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    handles = _hooks(linears, grams, fisher, alias)
    embed = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for window in tokens.to(device):
                logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()  # (T-1, vocab)
                nn.functional.cross_entropy(logits, window[1:], reduction="sum").backward()
    finally:
        for h in (*handles, embed):
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    n = tokens.numel()
    hess = {name: (grams[name] / n).float() for name in grams}
    return {name: LinearStats(hess[alias[name]], fisher[name] / n) for name in linears}


def candidate_losses(weight: torch.Tensor, stats: LinearStats, options: list[tuple[int, int]], config: QuantConfig,
                     rows: int = 64, seed: int = 0) -> dict[str, dict[tuple[int, int], float]]:
    """{"fisher": {(bits, g): ½ Σ_o F_o r_o}, "layer": {(bits, g): Σ_o r_o}} with r_o = (ΔW H ΔWᵀ)_oo of
    ``weight`` (out, in) quantized by ``config``'s initializer and solver (static parameters), estimated on
    ``rows`` seeded random rows and scaled by out/rows."""
    from ..quant.init import init_params

    out = weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(out, generator=gen)[:rows].sort().values.to(weight.device) if rows < out else None
    w = (weight if idx is None else weight[idx]).float()  # (rows, in)
    f = stats.fisher if idx is None else stats.fisher[idx]
    h = stats.hessian.to(w.device)
    diag = solvers.damped_diagonal(h, config.damping).float()
    solver = solvers.get_solver(config.solver)
    result: dict[str, dict[tuple[int, int], float]] = {"fisher": {}, "layer": {}}
    for bits, group in options:
        g = grid.resolve_group_size(w.shape[1], group)
        s, z = grid.to_storage(*init_params(w, bits, g, method=config.init, hessian_diag=diag,
                                            **config.init_options))
        res = solver(w, h, s, z, bits, g, act_order=config.act_order, damp=config.damping,
                     block_size=config.block_size)
        d = res.weight - w  # (rows, in)
        r = ((d @ h) * d).sum(1)  # (rows,) per-row layer loss
        scale = out / w.shape[0]
        result["fisher"][(bits, group)] = float(0.5 * scale * (f.to(r.device) * r).sum())
        result["layer"][(bits, group)] = float(scale * r.sum())
    return result


@torch.no_grad()
def all_candidate_losses(model: nn.Module, stats: dict[str, LinearStats], config: QuantConfig, rows: int = 64,
                         seed: int = 0) -> dict[str, dict[str, dict[tuple[int, int], float]]]:
    """{weighting: {linear: {(bits, g): predicted loss}}} for every decoder linear and its candidates."""
    out: dict[str, dict[str, dict[tuple[int, int], float]]] = {w: {} for w in WEIGHTINGS}
    for i, (name, (_, linear)) in enumerate(decoder_linears(model).items()):
        losses = candidate_losses(linear.weight.detach(), stats[name], budget.candidates(linear.in_features),
                                  config, rows, seed + i)
        for w in WEIGHTINGS:
            out[w][name] = losses[w]
        log.debug("%s: candidate losses %s", name, losses["fisher"])
    return out


@dataclass
class Sensitivity:
    """Predicted losses of every candidate of every decoder linear: ``losses[weighting][name][(bits, g)]``, the
    linears' ``shapes`` (out, in), and how they were measured (``info``). Reusable for any budget."""

    losses: dict[str, dict[str, dict[tuple[int, int], float]]]
    shapes: dict[str, tuple[int, int]]
    info: dict[str, Any]

    def range(self) -> tuple[float, float]:
        """(lowest, highest) reachable bits per weight."""
        return bpw_range(self.shapes)


def bpw_range(shapes: dict[str, tuple[int, int]]) -> tuple[float, float]:
    """(lowest, highest) average bits per weight reachable with the candidates of linears of these shapes."""
    n = sum(o * i for o, i in shapes.values())
    costs = [[budget.linear_cost(*c, s) for c in budget.candidates(s[1])] for s in shapes.values()]
    low, high = budget.budget_range(costs)
    return low / n, high / n


def check_bpw(bpw: float, shapes: dict[str, tuple[int, int]]) -> None:
    """ConfigError stating the reachable range when ``bpw`` is outside it."""
    low, high = bpw_range(shapes)
    if not low <= bpw <= high:
        raise ConfigError(f"bpw {bpw:g} is outside the reachable range [{low:.4f}, {high:.4f}] bits per weight for "
                          f"these linears and candidates {budget.CANDIDATE_BITS} bits x groups "
                          f"{budget.CANDIDATE_GROUPS}")


def measure_sensitivity(model: nn.Module, tokens: torch.Tensor, config: QuantConfig,
                        device: torch.device | None = None, windows: int = 8, rows: int = 64) -> Sensitivity:
    """FP statistics from the first ``windows`` windows of ``tokens``, then every candidate's predicted loss with
    ``config``'s initializer and solver on ``rows`` rows per linear. The model is not modified."""
    start = time.perf_counter()
    stats = measure_stats(model, tokens[:windows], device)
    t_stats = time.perf_counter() - start
    log.info("sensitivity: FP statistics from %d windows in %.0f s; candidate losses next", min(windows, len(tokens)),
             t_stats)
    linears = decoder_linears(model)
    losses = all_candidate_losses(model, stats, config, rows)
    info = {"windows": min(windows, tokens.shape[0]), "seqlen": tokens.shape[1], "rows": rows,
            "stats_seconds": round(t_stats, 2), "seconds": round(time.perf_counter() - start, 2)}
    return Sensitivity(losses, {n: (m.out_features, m.in_features) for n, (_, m) in linears.items()}, info)


def plan_from_sensitivity(sens: Sensitivity, bpw: float, weighting: str = "fisher"
                          ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """(plan {name: [bits, group_size]}, report) minimising the ``weighting`` losses at ``bpw``."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    check_bpw(bpw, sens.shapes)
    plan, alloc = budget.plan_budget(sens.shapes, sens.losses[weighting], bpw)
    n = sum(o * i for o, i in sens.shapes.values())
    report = {"weighting": weighting, **sens.info, "predicted_loss": alloc.loss, "lower_bound": alloc.lower_bound,
              "bpw": alloc.cost / n}
    log.info("bpw plan (%s): %.4f bpw, predicted loss %.4g (LP bound %.4g)", weighting, report["bpw"], alloc.loss,
             alloc.lower_bound)
    return plan, report


def plan_for_budget(model: nn.Module, tokens: torch.Tensor, config: QuantConfig, device: torch.device | None = None,
                    windows: int = 8, rows: int = 64, weighting: str = "fisher") -> tuple[QuantConfig, dict[str, Any]]:
    """``config`` with ``plan`` = the per-linear (bits, group_size) minimising the predicted loss at
    ``config.bpw`` (refused before any work if out of range), and the plan's report."""
    if config.bpw is None:
        raise ConfigError("plan_for_budget needs config.bpw")
    linears = decoder_linears(model)
    check_bpw(config.bpw, {n: (m.out_features, m.in_features) for n, (_, m) in linears.items()})
    sens = measure_sensitivity(model, tokens, config, device, windows, rows)
    plan, report = plan_from_sensitivity(sens, config.bpw, weighting)
    return QuantConfig.from_dict({**config.to_dict(), "plan": plan}), report


def plan_table(plan: dict[str, list[int]], shapes: dict[str, tuple[int, int]] | None = None) -> str:
    """The plan as a text table: one row per linear (name, bits, group, bits per weight when shapes are given)."""
    width = max((len(n) for n in plan), default=4)
    lines = [f"{'linear':<{width}}  bits  group" + ("    bpw" if shapes else "")]
    for name, (bits, group) in plan.items():
        line = f"{name:<{width}}  {bits:>4}  {('chan' if group == -1 else group):>5}"
        if shapes:
            line += f"  {budget.storage_bits(bits, group, shapes[name][1]):5.3f}"
        lines.append(line)
    return "\n".join(lines)
