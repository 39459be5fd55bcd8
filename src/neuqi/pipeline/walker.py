"""Layer-wise post-training quantization of a causal LM (spec §4): the runner, separate from the method.

``quantize_model(model, tokens, config)`` quantizes every ``nn.Linear`` inside the decoder layers IN PLACE:

1. capture the hidden states entering layer 0 for all calibration windows and the (args, kwargs) each layer is
   called with (``adapters.capture_inputs``);
2. for each layer (alone on the compute device), discover its linear groups (linears reading the same tensor),
then for each group in execution order ("seq" mode: later groups see the already quantized earlier ones):
   * run the layer on all windows, only until the group's input is seen (a private exception stops it), and
     accumulate H = XᵀX / n_tokens (each batch product in fp32, summed in fp64);
   * per linear: fit (s, Z) with the initializer on the damped diagonal h = diag(H) + λ (spec §3), round them
     to fp16 storage, run the solver (``neuqi.solvers``) and write Ŵ back in the model dtype;
3. rerun the quantized layer on all windows: its outputs are the next layer's inputs.

With ``target="fp"`` an FP copy of each layer runs beside it on the FP model's hidden states. The pass that
accumulates H also runs the copy to the same linear and accumulates C = X̃ᵀX / n_tokens (X̃ the FP input), and
each linear is solved on the target W* = W·C·H⁻¹ (``solvers.fp_target``): it reproduces the FP model's output,
not its own.

The forward passes run in the model's dtype; quantization math in fp32 on an fp32 copy of each weight.
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..quant import grid, solvers
from ..quant.grid import QParams
from . import adapters, sensitivity
from .config import QuantConfig, needs_calibration
from .precision import bf16_gram_applies, bf16_gram_precision
from .records import LinearRecord, QuantResult
from .replay import Replay

log = logging.getLogger(__name__)

InitFn = Callable[
    ..., tuple[torch.Tensor, torch.Tensor]
]  # init_params(weight, bits, group_size, method, ...)
Sink = Callable[[int, torch.Tensor], None]  # sink(batch index, layer output) instead of returning the outputs


class Collective(Protocol):
    """What the layer loop needs from a process group (``neuqi.pipeline.distributed.Dist``); None: one process."""

    def steps(self, n_local: int) -> int: ...  # max local batch count over ranks

    def add_in_order(self, acc: torch.Tensor, gram: torch.Tensor | None) -> None: ...  # acc += g_0 + ... in rank order

    def sum_int(self, n: int) -> int: ...

    def rows(self, n: int) -> slice: ...  # this rank's output rows

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor: ...  # (local rows, ...) -> (n, ...)

    def sum_floats(self, values: list[float | None]) -> list[float | None]: ...


class _GroupInputSeen(Exception):
    """Stops a layer's forward once the linear group's input was accumulated; caught only in ``_hessian``."""


def _default_init() -> InitFn:
    from ..quant.init import init_params

    return init_params


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def check_model(stack: adapters.DecoderStack, config: QuantConfig) -> None:
    """Every linear of every layer must take its group size (``config.linear_format``) and hold finite weights
    (checked before any work). Under ``bpw`` without a plan the planner picks group sizes that fit."""
    for i, layer in enumerate(stack.layers):
        for name, linear in _linears(layer).items():
            full = f"{stack.layer_name(i)}.{name}"
            try:
                if config.bpw is None or config.plan is not None:
                    grid.resolve_group_size(linear.in_features, config.linear_format(full)[1])
            except ConfigError as exc:
                raise ConfigError(f"{full}: {exc}") from None
            grid.check_finite(linear.weight, full)


def _call(layer: nn.Module, hidden: torch.Tensor, call: adapters.LayerCall) -> Any:
    args, kwargs = adapters.fit_batch(call, hidden.shape[0])
    return layer(hidden, *args, **kwargs)


def _hessian(
    layer: nn.Module,
    linear: nn.Linear,
    hiddens: Sequence[torch.Tensor],
    call: adapters.LayerCall,
    replay: Replay,
    dist: Collective | None = None,
    fp: tuple[nn.Module, nn.Linear, Sequence[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(H = XᵀX / n_tokens (in, in) fp64, n_tokens, C) of the input X of ``linear`` over all batches.

    H sums the per-batch fp32 Gram matrices in fp64 in batch order. With ``dist`` (rank r holds the global
    batches r, r + W, ...), step t gathers the W Gram matrices of batches tW..tW+W−1 and every rank adds them in
    rank order: the same additions in the same order as one process, so H is bit-identical.
    ``fp`` = (FP layer, its copy of ``linear``, FP hidden states): C = X̃ᵀX / n_tokens (in, in) fp64 with X̃ the
    copy's input for the same tokens (the FP layer runs on the FP hidden states); else C is None."""
    if fp is not None and dist is not None:
        raise ConfigError("target='fp' runs in one process (the FP activations are not sharded across ranks)")
    acc = torch.zeros(
        linear.in_features, linear.in_features, dtype=torch.float64, device=linear.weight.device
    )
    cross = None if fp is None else torch.zeros_like(acc)
    count = [0]
    grams: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}

    def pre(_module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, linear.in_features)  # (tokens, in)
        if dist is None:
            acc.add_(gram(x))  # fp32 product, fp64 sum
        else:
            grams.append(gram(x))
        count[0] += x.shape[0]
        if fp is not None:
            seen["x"] = x
        raise _GroupInputSeen

    def pre_fp(_module: nn.Module, args: tuple) -> None:
        x_fp = args[0].reshape(-1, linear.in_features).float()
        cross.add_(x_fp.T @ seen.pop("x").float())  # X̃ᵀX, fp32 product, fp64 sum
        raise _GroupInputSeen

    handles = [linear.register_forward_pre_hook(pre)]
    if fp is not None:
        handles.append(fp[1].register_forward_pre_hook(pre_fp))
    bf16 = bool(hiddens) and bf16_gram_applies(hiddens[0].dtype, hiddens[0].device)
    try:
        with bf16_gram_precision(bf16):  # the layer's bf16 forward is unaffected; the products are exact (gram)
            for j in range(len(hiddens) if dist is None else dist.steps(len(hiddens))):
                if j < len(hiddens):
                    replay.set_batch(j)
                    _run_to(linear, layer, hiddens[j], call)
                    if fp is not None:
                        _run_to(fp[1], fp[0], fp[2][j], call)
                if dist is not None:
                    dist.add_in_order(acc, grams.pop() if grams else None)
    finally:
        for handle in handles:
            handle.remove()
    n_tokens = count[0] if dist is None else dist.sum_int(count[0])
    if cross is not None:
        cross.div_(n_tokens)
    return acc.div_(n_tokens), n_tokens, cross  # in place: a wide fp64 H is large


def _run_to(linear: nn.Linear, layer: nn.Module, hidden: torch.Tensor, call: adapters.LayerCall) -> None:
    """Run ``layer`` on ``hidden`` until ``linear``'s pre-hook raises ``_GroupInputSeen``."""
    try:
        _call(layer, hidden, call)
    except _GroupInputSeen:
        return
    raise ModelError(f"{type(linear).__name__} was not called by its layer's forward")


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx (in, in) in fp32 for x (tokens, in).

    Called inside ``precision.bf16_gram_precision`` for bf16 activations on the CPU: the product then runs on bf16
    inputs with fp32 accumulation, exact per product (bf16·bf16 fits fp32), so it equals the fp32 product up to
    summation order and is about twice as fast.
    """
    x32 = x.float()
    return x32.T @ x32


def _peak_memory(device: torch.device) -> dict[str, float]:
    mem = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        mem["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return mem


def _quantize_linear(
    name: str, linear: nn.Linear, hessian: torch.Tensor | None, config: QuantConfig, init_fn: InitFn,
    dist: Collective | None = None, cross: torch.Tensor | None = None,
) -> tuple[LinearRecord, QParams]:
    """Fit parameters, solve, write Ŵ back into ``linear``; returns (record, QParams). ``hessian`` None: RTN with
    an unweighted initializer (no calibration), whose records carry no losses. ``cross`` C = X̃ᵀX / n: fit and
    solve on the FP target W* (``solvers.fp_target``) instead of W; the recorded losses are then against W*.

    With ``dist`` each rank fits and solves its block of output rows (both are row-independent given H; the
    act-order permutation comes from diag(H), shared) and Ŵ, s, Z are gathered; the losses are the rank-order
    sums of the per-rank losses."""
    start = time.perf_counter()
    n_out = linear.weight.shape[0]
    weight = linear.weight.detach()[slice(None) if dist is None else dist.rows(n_out)].float()  # (out, in) fp32
    if cross is not None:
        weight = solvers.fp_target(weight, hessian, cross, config.damping)
    bits, group_size = config.linear_format(name)  # the plan's choice under --bpw, else the config's
    g = grid.resolve_group_size(weight.shape[1], group_size)
    # (in,) spec §3: diag of the damped H
    h = None if hessian is None else solvers.damped_diagonal(hessian, config.damping).float()

    def fit(w: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = (groups.unsqueeze(1) * g + torch.arange(g, device=groups.device)).flatten()
        s, z = init_fn(w, bits, g, method=config.init, hessian_diag=None if h is None else h[cols],
                       **config.init_options)
        try:
            return grid.to_storage(s, z)
        except ConfigError as exc:  # e.g. a scale beyond fp16: say which layer
            raise ConfigError(f"{name}: {exc}") from None

    record = LinearRecord(name=name, shape=tuple(linear.weight.shape), bits=bits, group_size=group_size,
                          seconds=0.0)
    scale = zero = None
    if config.param_fit == "static" or config.solver == "rtn":
        scale, zero = fit(weight, torch.arange(weight.shape[1] // g, device=weight.device))
        record.init_seconds = round(time.perf_counter() - start, 4)
        if hessian is not None:
            w_rtn = grid.fake_quantize(weight, scale, zero, bits, g)
            record.init_loss = float((((w_rtn - weight) ** 2) * h).sum())
            record.loss_before = solvers.proxy_loss(w_rtn, weight, hessian)
    solver = solvers.get_solver(config.solver)
    res = solver(weight, hessian, scale, zero, bits, g, act_order=config.act_order, damp=config.damping,
                 block_size=config.block_size, fit=None if scale is not None else fit, name=name)
    if config.refine_rounds():
        res = solvers.refine(weight, hessian, res, bits, g, damp=config.refine_damping, rounds=config.refine_rounds(),
                             act_order=config.act_order)
    w_hat, scale, zero = res.weight, res.scale, res.zero_point
    record.loss = None if hessian is None else res.loss
    if dist is not None:
        w_hat, scale, zero = (dist.gather_rows(t, n_out) for t in (w_hat, scale, zero))
        record.loss, record.loss_before, record.init_loss = dist.sum_floats(
            [record.loss, record.loss_before, record.init_loss])
    with torch.no_grad():
        linear.weight.copy_(w_hat.to(linear.weight.dtype))
    record.damping = res.damping
    record.seconds = round(time.perf_counter() - start, 4)
    return record, QParams(scale.cpu(), zero.cpu(), bits, group_size)


def _quantize_layer(
    layer: nn.Module,
    prefix: str,
    modules: dict[str, nn.Linear],
    hiddens: Sequence[torch.Tensor],
    call: adapters.LayerCall,
    config: QuantConfig,
    init_fn: InitFn,
    records: list[LinearRecord],
    qparams: dict[str, QParams],
    replay_activations: bool = True,
    dist: Collective | None = None,
    sink: Sink | None = None,
    fp: tuple[nn.Module, Sequence[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Quantize one layer group by group (appending to ``records`` and ``qparams``); returns its outputs (or
    hands output j to ``sink(j, output)`` and returns []). ``fp`` = (the layer's FP copy, the FP hidden states):
    every linear is fitted to the FP output (``target="fp"``)."""
    trace = adapters.trace_layer(layer, lambda: _call(layer, hiddens[0][:1], call))
    replay = Replay(layer, trace, replay_activations)
    try:
        for group in trace.groups:
            fp_pair = None if fp is None else (fp[0], fp[0].get_submodule(group[0]), fp[1])
            hessian, n_tokens, cross = _hessian(layer, modules[group[0]], hiddens, call, replay, dist, fp_pair)
            for name in group:
                record, qp = _quantize_linear(f"{prefix}.{name}", modules[name], hessian, config, init_fn, dist,
                                              cross)
                record.tokens = n_tokens
                records.append(record)
                qparams[record.name] = qp
                log.info("%s %s: loss %.5g (rtn %.5g) damp %.3g, %.2f s", record.name, record.shape, record.loss,
                         record.loss_before if record.loss_before is not None else float("nan"), record.damping,
                         record.seconds)
            replay.group_done()
        outputs: list[torch.Tensor] = []
        for j in range(len(hiddens)):
            replay.set_batch(j)
            out = adapters.layer_output(_call(layer, hiddens[j], call))
            if sink is None:
                outputs.append(out)
            else:
                sink(j, out)
        return outputs
    finally:
        replay.close()


def quantize_layer(
    layer: nn.Module,
    prefix: str,
    hiddens: Sequence[torch.Tensor] | None,
    call: adapters.LayerCall | None,
    config: QuantConfig,
    init_fn: InitFn,
    replay_activations: bool = True,
    dist: Collective | None = None,
    sink: Sink | None = None,
    fp: tuple[nn.Module, Sequence[torch.Tensor]] | None = None,
) -> tuple[list[LinearRecord], dict[str, QParams], list[torch.Tensor] | None]:
    """Quantize the linears of one decoder layer (already on the compute device) in place: (records, {qualified
    name: QParams}, the layer's outputs for the next layer). ``hiddens`` None: RTN without calibration (outputs
    None). ``prefix``: the layer's qualified name, e.g. ``model.layers.3``. ``fp`` = (an FP copy of the layer,
    the FP model's hidden states entering it): fit every linear to the FP output (``target="fp"``)."""
    records: list[LinearRecord] = []
    qparams: dict[str, QParams] = {}
    modules = _linears(layer)
    if hiddens is None:  # RTN without calibration: every linear, no Hessian
        for name, module in modules.items():
            record, qp = _quantize_linear(f"{prefix}.{name}", module, None, config, init_fn, dist)
            records.append(record)
            qparams[record.name] = qp
        return records, qparams, None
    outputs = _quantize_layer(layer, prefix, modules, hiddens, call, config, init_fn, records, qparams,
                              replay_activations, dist, sink, fp)
    return records, qparams, outputs


def _check_tokens(tokens: torch.Tensor) -> None:
    if tokens.dim() != 2 or tokens.dtype != torch.long or tokens.numel() == 0:
        raise ConfigError(f"calibration tokens must be a non-empty (n, seqlen) LongTensor, got {tokens.dtype} "
                          f"{tuple(tokens.shape)}")


def _capture(model: nn.Module, stack: adapters.DecoderStack, tokens: torch.Tensor, config: QuantConfig,
             device: torch.device) -> tuple[list[torch.Tensor], list[adapters.LayerCall]]:
    """The hidden states entering layer 0 for every calibration batch, and each layer's call arguments; the stem
    (embeddings) runs on ``device`` and goes back where it was."""
    home = next(model.parameters()).device
    stem = [model.get_submodule(n) for n in stack.stem]
    for m in stem:
        m.to(device)
    try:
        return adapters.capture_inputs(model, stack, [b.to(device) for b in tokens.split(config.batch_size)])
    finally:
        for m in stem:
            m.to(home)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration_tokens: torch.Tensor,
    config: QuantConfig,
    device: str | torch.device | None = None,
    progress: bool = True,
    init_fn: InitFn | None = None,
    replay_activations: bool = True,
) -> QuantResult:
    """Quantize the decoder linears of ``model`` in place on ``calibration_tokens`` (n, seqlen) LongTensor.

    ``device``: where each layer is computed (default: where the model is); only one layer is there at a time.
    ``init_fn``: the parameter initializer (default ``neuqi.init.init_params``).
    ``replay_activations``: keep the inputs and outputs of a layer's finished sub-blocks to skip recomputing them
    (same result, about half the forward work; False saves that memory, see ``Replay``).
    Returns a ``QuantResult``: the config, one ``LinearRecord`` per linear, timings, peak memory, and ``qparams``
    {qualified name: QParams} for ``neuqi.formats.packed.pack_model``.
    """
    from tqdm.auto import tqdm

    _check_tokens(calibration_tokens)
    stack = adapters.find_stack(model)
    check_model(stack, config)
    init_fn = init_fn or _default_init()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    plan_report = None
    if config.bpw is not None and config.plan is None:  # mixed precision: choose (bits, group) per linear first
        config, plan_report = sensitivity.plan_for_budget(model, calibration_tokens, config, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()

    hiddens, calls = _capture(model, stack, calibration_tokens, config, device) if needs_calibration(config) else (
        None, [])
    timings: dict[str, Any] = {"capture_s": round(time.perf_counter() - t0, 3), "layers_s": []}

    records: list[LinearRecord] = []
    qparams: dict[str, QParams] = {}
    fp_hiddens = list(hiddens) if hiddens is not None and config.target == "fp" else None  # FP model's states
    for i in tqdm(range(len(stack.layers)), desc="quantize", unit="layer", disable=not progress):
        t_layer = time.perf_counter()
        layer = stack.layers[i].to(device)
        fp_layer = copy.deepcopy(layer) if fp_hiddens is not None else None
        layer_records, layer_qparams, outputs = quantize_layer(
            layer, stack.layer_name(i), hiddens, calls[i] if calls else None, config, init_fn, replay_activations,
            fp=None if fp_layer is None else (fp_layer, fp_hiddens))
        if fp_layer is not None:
            fp_hiddens = [adapters.layer_output(_call(fp_layer, h, calls[i])) for h in fp_hiddens]
            del fp_layer
        records += layer_records
        qparams.update(layer_qparams)
        hiddens = outputs
        stack.layers[i].to(home)
        timings["layers_s"].append(round(time.perf_counter() - t_layer, 3))

    model.train(was_training)
    timings["total_s"] = round(time.perf_counter() - t0, 3)

    return QuantResult(
        config=config, records=records, qparams=qparams, model={"class": type(model).__name__},
        layers=len(stack.layers), device=str(device), timings=timings, memory=_peak_memory(device),
        calibration={"windows": calibration_tokens.shape[0], "seqlen": calibration_tokens.shape[1],
                     "tokens": calibration_tokens.numel()},
        extra={} if plan_report is None else {"plan": plan_report},
    )
