"""How much each (linear, bits, group size) choice costs the model end to end: the losses ``budget`` allocates on.

Raw layer losses tr(ΔW H ΔWᵀ) are not comparable across linears: an error in a value projection and the same
error in a down projection move the model's output by very different amounts. We weight them with the
**output Fisher**, a second-order expansion of the model's cross-entropy around the FP model. With y = W x the
linear's output at a token, g = ∂CE/∂y and F_o = E[g_o²] over the calibration tokens (one backward pass),

    ΔCE ≈ ½ E[(ΔW x)ᵀ diag(g²) (ΔW x)] ≈ ½ Σ_o F_o · (ΔW H ΔWᵀ)_oo,    H = E[x xᵀ]

(gradients and inputs taken as uncorrelated, the Fisher as diagonal). The prediction is in nats per token, the
same unit for every linear. ``weighting="layer"`` drops F (the raw loss) for comparison.

The second-order diagonal model misjudges how much a linear's error costs end to end. On SmolLM2 the measured
cost of 2-bit g64 is 0.07 to 6.9 times the Fisher prediction (median 1.4). Summed by kind, the Fisher
overestimates the value projections 5x (0.52 predicted, 0.10 measured) and underestimates the MLP 2x. It also
underestimates how much worse channel-wise grouping is than 64-wide groups (k/v: 2.2-2.5x measured, 1.3-1.8x
predicted). ``weighting="kl"`` (the default) therefore **calibrates** the Fisher losses per linear on two measured
anchors: the mean KL(p_FP ‖ p) of the model's next-token distribution when that linear alone is quantized at
2-bit g64 and at 2-bit channel-wise (every other weight FP, ``anchor_kl``, run from the layer's cached input).
Every candidate's Fisher loss is scaled by its anchor's KL / Fisher ratio (``calibrated_losses``): the Fisher
keeps the shape across bits and group sizes, the anchors set the level.

``measure_stats`` runs the FP model once, forward and backward, on a few calibration windows and keeps per
linear H (shared by linears that read the same tensor) and F. ``candidate_losses`` quantizes a seeded random
subset of each linear's rows with the configured initializer, solver and refinement at every candidate (rows are
independent in LDLQ/GPTQ and in the refinement for a fixed H) and scales the sum up to all rows. ``plan_for_budget``
ties it to ``budget``.

``plan_for_budget`` measures without the refinement (``QuantConfig.refine``) even when the run refines: on SmolLM2
a plan on refined candidate losses and refined anchors was no better (2.5 bpw: 55.72 / 67.45 WikiText-2 / C4
against 54.50 / 64.27 for the unrefined plan, both refined; 3.5 bpw: 25.31 / 33.67 against 25.35 / 34.09) and
its measurement costs more.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..quant import grid, solvers
from . import adapters, budget
from .config import BPW_WEIGHTINGS, QuantConfig

log = logging.getLogger(__name__)

WEIGHTINGS = BPW_WEIGHTINGS  # "kl" needs the anchors (``anchor_kl``)
MEASURED = ("fisher", "layer")  # what ``candidate_losses`` gives


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


def quantize_rows(weight: torch.Tensor, stats: LinearStats, bits: int, group_size: int,
                  config: QuantConfig) -> torch.Tensor:
    """``weight`` (rows, in) quantized at (bits, group_size) by ``config``'s initializer, solver and refinement
    (``config.refine_rounds()``) with the FP Hessian of ``stats`` (static parameters), dequantized, fp32: the
    pipeline the plan will run, so the candidates are judged by what it will produce."""
    from ..quant.init import init_params

    w = weight.float()
    h = stats.hessian.to(w.device)
    diag = solvers.damped_diagonal(h, config.damping).float()
    g = grid.resolve_group_size(w.shape[1], group_size)
    s, z = grid.to_storage(*init_params(w, bits, g, method=config.init, hessian_diag=diag, **config.init_options))
    res = solvers.get_solver(config.solver)(w, h, s, z, bits, g, act_order=config.act_order, damp=config.damping,
                                             block_size=config.block_size)
    if config.refine_rounds():
        res = solvers.refine(w, h, res, bits, g, damp=config.refine_damping, rounds=config.refine_rounds(),
                             act_order=config.act_order)
    return res.weight


def candidate_losses(weight: torch.Tensor, stats: LinearStats, options: list[tuple[int, int]], config: QuantConfig,
                     rows: int = 64, seed: int = 0) -> dict[str, dict[tuple[int, int], float]]:
    """{"fisher": {(bits, g): ½ Σ_o F_o r_o}, "layer": {(bits, g): Σ_o r_o}} with r_o = (ΔW H ΔWᵀ)_oo of
    ``weight`` (out, in) quantized by ``quantize_rows``, estimated on ``rows`` seeded random rows and scaled by
    out/rows."""
    out = weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(out, generator=gen)[:rows].sort().values.to(weight.device) if rows < out else None
    w = (weight if idx is None else weight[idx]).float()  # (rows, in)
    f = stats.fisher if idx is None else stats.fisher[idx]
    h = stats.hessian.to(w.device)
    result: dict[str, dict[tuple[int, int], float]] = {"fisher": {}, "layer": {}}
    for bits, group in options:
        d = quantize_rows(w, stats, bits, group, config) - w  # (rows, in)
        r = ((d @ h) * d).sum(1)  # (rows,) per-row layer loss
        scale = out / w.shape[0]
        result["fisher"][(bits, group)] = float(0.5 * scale * (f.to(r.device) * r).sum())
        result["layer"][(bits, group)] = float(scale * r.sum())
    return result


@torch.no_grad()
def all_candidate_losses(model: nn.Module, stats: dict[str, LinearStats], config: QuantConfig, rows: int = 64,
                         seed: int = 0) -> dict[str, dict[str, dict[tuple[int, int], float]]]:
    """{weighting: {linear: {(bits, g): predicted loss}}} for every decoder linear and its candidates."""
    out: dict[str, dict[str, dict[tuple[int, int], float]]] = {w: {} for w in MEASURED}
    for i, (name, (_, linear)) in enumerate(decoder_linears(model).items()):
        losses = candidate_losses(linear.weight.detach(), stats[name], budget.candidates(linear.in_features),
                                  config, rows, seed + i)
        for w in MEASURED:
            out[w][name] = losses[w]
        log.debug("%s: candidate losses %s", name, losses["fisher"])
    return out


ANCHORS = ((2, 64), (2, -1))  # the formats measured end to end: 2-bit grouped and 2-bit channel-wise


def _layer_inputs(model: nn.Module, stack: adapters.DecoderStack, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The FP hidden states entering each decoder layer for ``tokens`` (n, T): one (n, T, H) tensor per layer."""
    inputs: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in stack.layers]
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _logits_from(model: nn.Module, stack: adapters.DecoderStack, start: int, hidden: torch.Tensor,
                 tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``tokens`` when ``hidden`` enters layer ``start``: layers before it are skipped (the
    one before returns ``hidden``), so only layers start… and the head are computed."""

    def make(j: int, layer: nn.Module):
        if j >= start:
            return layer
        return lambda *args, **kwargs: hidden if j == start - 1 else (args[0] if args else kwargs["hidden_states"])

    with adapters.layers_standing_in(stack.layers, make):
        return model(input_ids=tokens, use_cache=False).logits


def _kl(logp_ref: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_ref ‖ p) with p = softmax(``logits``); both (…, V)."""
    logp = torch.log_softmax(logits.float(), -1)
    return float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean())


@contextmanager
def _float32(model: nn.Module) -> Iterator[None]:
    """``model`` in float32 inside the block; every parameter and buffer gets its own dtype back after (a bf16 or
    fp16 value survives the round trip through fp32 exactly)."""
    dtypes = {name: t.dtype for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    try:
        model.float()
        yield
    finally:
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            if t.dtype != dtypes[name]:
                t.data = t.data.to(dtypes[name])


@torch.no_grad()
def anchor_kl(model: nn.Module, stats: dict[str, LinearStats], tokens: torch.Tensor, config: QuantConfig,
              anchors: tuple[tuple[int, int], ...] = ANCHORS) -> dict[str, dict[tuple[int, int], float]]:
    """{linear: {anchor: KL}}: the mean per-token KL(p_FP ‖ p) of the next-token distribution on ``tokens``
    (n, T) when that linear alone is quantized at the anchor (bits, group) (all rows, ``quantize_rows``) and every
    other weight stays FP. The forwards run in float32 whatever the model's dtype: one quantized linear moves the
    logits little, and a bf16 forward's own rounding is larger (a floor of about 1.4e-3 nats per linear on
    SmolLM2, where a 2-bit key projection measures 7e-5 in float32). The model is restored, dtypes included;
    anchors a linear's width does not allow are left out."""
    with _float32(model):
        return _anchor_kl(model, stats, tokens, config, anchors)


def _anchor_kl(model: nn.Module, stats: dict[str, LinearStats], tokens: torch.Tensor, config: QuantConfig,
               anchors: tuple[tuple[int, int], ...]) -> dict[str, dict[tuple[int, int], float]]:
    stack = adapters.find_stack(model)
    tokens = tokens.to(next(model.parameters()).device)
    inputs = _layer_inputs(model, stack, tokens)
    logp_fp = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), -1)
    index = {id(layer): i for i, layer in enumerate(stack.layers)}
    result: dict[str, dict[tuple[int, int], float]] = {}
    for name, (layer, linear) in decoder_linears(model).items():
        i, w0 = index[id(model.get_submodule(layer))], linear.weight.detach().clone()
        allowed = budget.candidates(linear.in_features)
        result[name] = {}
        for bits, group in anchors:
            if (bits, group) not in allowed:
                continue
            try:
                linear.weight.copy_(quantize_rows(w0, stats[name], bits, group, config).to(w0.dtype))
                result[name][(bits, group)] = _kl(logp_fp, _logits_from(model, stack, i, inputs[i], tokens))
            finally:
                linear.weight.copy_(w0)
        log.debug("%s: anchor KL %s", name, result[name])
    return result


def calibrated_losses(fisher: dict[str, dict[tuple[int, int], float]],
                      kl: dict[str, dict[tuple[int, int], float]]) -> dict[str, dict[tuple[int, int], float]]:
    """Fisher losses rescaled per linear to the measured end-to-end KL of its anchors:

        loss(ℓ, c) = fisher(ℓ, c) · KL(ℓ, a) / fisher(ℓ, a),

    a = ``nearest_anchor(c, measured)``: of the same kind as c (channel-wise or grouped) when one is measured,
    then the nearest in bits. The Fisher losses keep the shape across bits and group sizes within a linear; the
    anchors fix how much a linear's error costs the model end to end, and how much worse channel-wise grouping is
    than the Fisher says."""
    out: dict[str, dict[tuple[int, int], float]] = {}
    for name, losses in fisher.items():
        measured, anchors = kl[name], list(kl[name])
        out[name] = {}
        for c, value in losses.items():
            a = nearest_anchor(c, anchors)
            out[name][c] = value * measured[a] / max(losses[a], 1e-30)
    return out


def nearest_anchor(candidate: tuple[int, int], anchors: list[tuple[int, int]]) -> tuple[int, int]:
    """The anchor that calibrates ``candidate`` (bits, g): among the anchors of its kind (g = -1 or grouped; all
    when none is), the one nearest in bits, then nearest in group size, then the first listed."""
    kind = [a for a in anchors if (a[1] == -1) == (candidate[1] == -1)] or anchors
    return min(kind, key=lambda a: (abs(a[0] - candidate[0]), abs(a[1] - candidate[1])))


@dataclass
class Sensitivity:
    """Predicted losses of every candidate of every decoder linear: ``losses[weighting][name][(bits, g)]``, the
    linears' ``shapes`` (out, in), and how they were measured (``info``). Reusable for any budget."""

    losses: dict[str, dict[str, dict[tuple[int, int], float]]]
    shapes: dict[str, tuple[int, int]]
    info: dict[str, Any]
    anchors: dict[str, dict[tuple[int, int], float]] | None = None  # ``anchor_kl``; gives losses["kl"]

    def __post_init__(self) -> None:
        if self.anchors is not None and "kl" not in self.losses:
            self.losses["kl"] = calibrated_losses(self.losses["fisher"], self.anchors)

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


def kl_windows_of(tokens: torch.Tensor, windows: int, kl_windows: int) -> torch.Tensor:
    """The windows the anchors are measured on: the ``kl_windows`` after the first ``windows`` (those give H and F),
    or the last ones when ``tokens`` has no more."""
    extra = tokens[windows:windows + kl_windows]
    return extra if extra.shape[0] == kl_windows else tokens[-kl_windows:]


def measure_sensitivity(model: nn.Module, tokens: torch.Tensor, config: QuantConfig,
                        device: torch.device | None = None, windows: int = 8, rows: int = 64, kl_windows: int = 2,
                        kl_seqlen: int = 512) -> Sensitivity:
    """FP statistics from the first ``windows`` windows of ``tokens``, every candidate's predicted loss with
    ``config``'s initializer and solver on ``rows`` rows per linear, and (``kl_windows`` > 0) the end-to-end KL of
    the ``ANCHORS`` on the first ``kl_seqlen`` tokens of ``kl_windows`` further windows (``kl_windows_of``). The
    model is not modified."""
    start = time.perf_counter()
    stats = measure_stats(model, tokens[:windows], device)
    t_stats = time.perf_counter() - start
    log.info("sensitivity: FP statistics from %d windows in %.0f s; candidate losses next", min(windows, len(tokens)),
             t_stats)
    linears = decoder_linears(model)
    losses = all_candidate_losses(model, stats, config, rows)
    info = {"windows": min(windows, tokens.shape[0]), "seqlen": tokens.shape[1], "rows": rows,
            "refine": config.refine_rounds(), "refine_damping": config.refine_damping,
            "stats_seconds": round(t_stats, 2)}
    info["seconds"] = round(time.perf_counter() - start, 2)
    sens = Sensitivity(losses, {n: (m.out_features, m.in_features) for n, (_, m) in linears.items()}, info)
    return add_anchors(sens, model, tokens, config, kl_windows, kl_seqlen, stats) if kl_windows > 0 else sens


def add_anchors(sens: Sensitivity, model: nn.Module, tokens: torch.Tensor, config: QuantConfig, kl_windows: int = 2,
                kl_seqlen: int = 512, stats: dict[str, LinearStats] | None = None) -> Sensitivity:
    """``sens`` with the end-to-end ``ANCHORS`` measured (``anchor_kl``) on the first ``kl_seqlen`` tokens of
    ``kl_windows`` windows after the ``sens.info["windows"]`` that gave H and F (``kl_windows_of``); ``stats`` are
    re-measured on those windows when not given. The time is added to ``info["seconds"]``."""
    start = time.perf_counter()
    windows = sens.info["windows"]
    stats = stats if stats is not None else measure_stats(model, tokens[:windows])
    kl_tokens = kl_windows_of(tokens, windows, kl_windows)[:, :kl_seqlen]
    log.info("sensitivity: end-to-end KL of %s per linear on %s tokens", list(ANCHORS), tuple(kl_tokens.shape))
    anchors = anchor_kl(model, stats, kl_tokens, config)
    seconds = round(time.perf_counter() - start, 2)
    info = {**sens.info, "kl_tokens": list(kl_tokens.shape), "anchors": [list(a) for a in ANCHORS],
            "kl_seconds": seconds, "seconds": round(sens.info["seconds"] + seconds, 2)}
    losses = {w: by for w, by in sens.losses.items() if w != "kl"}
    return Sensitivity(losses, sens.shapes, info, anchors)


def plan_from_sensitivity(sens: Sensitivity, bpw: float, weighting: str = "kl"
                          ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """(plan {name: [bits, group_size]}, report) minimising the ``weighting`` losses at ``bpw``."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    if weighting not in sens.losses:
        raise ConfigError(f"the {weighting!r} weighting needs the end-to-end anchors (measure with kl_windows > 0)")
    check_bpw(bpw, sens.shapes)
    plan, alloc = budget.plan_budget(sens.shapes, sens.losses[weighting], bpw)
    n = sum(o * i for o, i in sens.shapes.values())
    report = {"weighting": weighting, **sens.info, "predicted_loss": alloc.loss, "lower_bound": alloc.lower_bound,
              "bpw": alloc.cost / n}
    log.info("bpw plan (%s): %.4f bpw, predicted loss %.4g (LP bound %.4g)", weighting, report["bpw"], alloc.loss,
             alloc.lower_bound)
    return plan, report


def planning_config(config: QuantConfig) -> QuantConfig:
    """The config the sensitivities of a ``config`` run are measured with: the same without refinement (the module
    docstring says why)."""
    return dataclasses.replace(config, refine=0)


def plan_for_budget(model: nn.Module, tokens: torch.Tensor, config: QuantConfig, device: torch.device | None = None,
                    windows: int = 8, rows: int = 64) -> tuple[QuantConfig, dict[str, Any]]:
    """``config`` with ``plan`` = the per-linear (bits, group_size) minimising the ``config.bpw_weighting`` losses
    at ``config.bpw`` (refused before any work if out of range), and the plan's report."""
    if config.bpw is None:
        raise ConfigError("plan_for_budget needs config.bpw")
    linears = decoder_linears(model)
    check_bpw(config.bpw, {n: (m.out_features, m.in_features) for n, (_, m) in linears.items()})
    weighting = config.bpw_weighting
    kl_windows = 2 if weighting == "kl" else 0
    sens = measure_sensitivity(model, tokens, planning_config(config), device, windows, rows, kl_windows=kl_windows)
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
