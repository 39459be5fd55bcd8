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

The forward passes run in the model's dtype; quantization math in fp32 on an fp32 copy of each weight.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..quant import grid, solvers
from ..quant.grid import QParams
from . import adapters
from .config import QuantConfig, needs_calibration
from .replay import Replay

log = logging.getLogger(__name__)

InitFn = Callable[
    ..., tuple[torch.Tensor, torch.Tensor]
]  # init_params(weight, bits, group_size, method, ...)
class _GroupInputSeen(Exception):
    """Stops a layer's forward once the linear group's input was accumulated; caught only in ``_hessian``."""


def _default_init() -> InitFn:
    from ..quant.init import init_params

    return init_params


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def check_model(stack: adapters.DecoderStack, config: QuantConfig) -> None:
    """Every linear of every layer must take ``config.group_size`` and hold finite weights (checked before
    any work)."""
    for i, layer in enumerate(stack.layers):
        for name, linear in _linears(layer).items():
            full = f"{stack.layer_name(i)}.{name}"
            try:
                grid.resolve_group_size(linear.in_features, config.group_size)
            except ConfigError as exc:
                raise ConfigError(f"{full}: {exc}") from None
            grid.check_finite(linear.weight, full)


def _call(layer: nn.Module, hidden: torch.Tensor, call: adapters.LayerCall) -> Any:
    args, kwargs = adapters.fit_batch(call, hidden.shape[0])
    return layer(hidden, *args, **kwargs)


def _hessian(
    layer: nn.Module,
    linear: nn.Linear,
    hiddens: list[torch.Tensor],
    call: adapters.LayerCall,
    replay: Replay,
) -> tuple[torch.Tensor, int]:
    """(H = XᵀX / n_tokens (in, in) fp64, n_tokens) of the input X of ``linear`` over all batches."""
    acc = torch.zeros(
        linear.in_features, linear.in_features, dtype=torch.float64, device=linear.weight.device
    )
    count = [0]

    def pre(_module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, linear.in_features)  # (tokens, in)
        acc.add_(gram(x))  # fp32 product, fp64 sum
        count[0] += x.shape[0]
        raise _GroupInputSeen

    handle = linear.register_forward_pre_hook(pre)
    try:
        for j, hidden in enumerate(hiddens):
            replay.set_batch(j)
            try:
                _call(layer, hidden, call)
            except _GroupInputSeen:
                continue
            raise ModelError(f"{type(linear).__name__} was not called by its layer's forward")
    finally:
        handle.remove()
    return acc / count[0], count[0]


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx (in, in) in fp32 for x (tokens, in).

    For bf16 x on CPU the product runs on bf16 inputs with fp32 accumulation (oneDNN's bf16 precision for fp32
    matmuls): bf16 values times bf16 values are exact in fp32, so it equals the fp32 product up to summation
    order, and is about twice as fast. Other cases convert to fp32 first.
    """
    x32 = x.float()
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not hasattr(mkldnn_matmul, "fp32_precision"):
        return x32.T @ x32
    previous = mkldnn_matmul.fp32_precision
    mkldnn_matmul.fp32_precision = "bf16"
    try:
        return x32.T @ x32
    finally:
        mkldnn_matmul.fp32_precision = previous


def _peak_memory(device: torch.device) -> dict[str, float]:
    mem = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        mem["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return mem


def _quantize_linear(
    name: str, linear: nn.Linear, hessian: torch.Tensor | None, config: QuantConfig, init_fn: InitFn
) -> tuple[dict[str, Any], QParams]:
    """Fit parameters, solve, write Ŵ back into ``linear``; returns (record, QParams). ``hessian`` None: RTN with
    an unweighted initializer (no calibration), whose records carry no losses."""
    start = time.perf_counter()
    weight = linear.weight.detach().float()  # (out, in) fp32 master copy
    g = grid.resolve_group_size(weight.shape[1], config.group_size)
    # (in,) spec §3: diag of the damped H
    h = None if hessian is None else solvers.damped_diagonal(hessian, config.damping).float()

    def fit(w: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = (groups.unsqueeze(1) * g + torch.arange(g, device=groups.device)).flatten()
        s, z = init_fn(w, config.bits, g, method=config.init, hessian_diag=None if h is None else h[cols],
                       **config.init_options)
        return grid.to_storage(s, z)

    record: dict[str, Any] = {
        "name": name,
        "shape": list(weight.shape),
        "init_loss": None,
        "loss_before": None,
        "init_seconds": None,
    }
    scale = zero = None
    if config.param_fit == "static" or config.method == "rtn":
        scale, zero = fit(weight, torch.arange(weight.shape[1] // g, device=weight.device))
        record["init_seconds"] = round(time.perf_counter() - start, 4)
        if hessian is not None:
            w_rtn = grid.fake_quantize(weight, scale, zero, config.bits, g)
            record["init_loss"] = float((((w_rtn - weight) ** 2) * h).sum())
            record["loss_before"] = solvers.proxy_loss(w_rtn, weight, hessian)
    solver = solvers.get_solver(config.method)
    res = solver(
        weight,
        hessian,
        scale,
        zero,
        config.bits,
        g,
        act_order=config.act_order,
        damp=config.damping,
        block_size=config.block_size,
        fit=None if scale is not None else fit,
        name=name,
    )
    with torch.no_grad():
        linear.weight.copy_(res.weight.to(linear.weight.dtype))
    loss = None if hessian is None else res.loss
    record.update(loss=loss, damping=res.damping, seconds=round(time.perf_counter() - start, 4))
    qp = QParams(res.scale.cpu(), res.zero_point.cpu(), config.bits, config.group_size)
    return record, qp


def _quantize_layer(
    layer: nn.Module,
    prefix: str,
    modules: dict[str, nn.Linear],
    hiddens: list[torch.Tensor],
    call: adapters.LayerCall,
    config: QuantConfig,
    init_fn: InitFn,
    records: list[dict[str, Any]],
    qparams: dict[str, QParams],
    replay_activations: bool = True,
) -> list[torch.Tensor]:
    """Quantize one layer group by group (appending to ``records`` and ``qparams``); returns its outputs."""
    trace = adapters.trace_layer(layer, lambda: _call(layer, hiddens[0][:1], call))
    replay = Replay(layer, trace, replay_activations)
    try:
        for group in trace.groups:
            hessian, n_tokens = _hessian(layer, modules[group[0]], hiddens, call, replay)
            for name in group:
                record, qp = _quantize_linear(f"{prefix}.{name}", modules[name], hessian, config, init_fn)
                record["tokens"] = n_tokens
                records.append(record)
                qparams[record["name"]] = qp
                log.info(
                    "%s %s: loss %.5g (rtn %s) damp %.3g, %.2f s",
                    record["name"],
                    tuple(record["shape"]),
                    record["loss"],
                    "-" if record["loss_before"] is None else f"{record['loss_before']:.5g}",
                    record["damping"],
                    record["seconds"],
                )
            replay.group_done()
        outputs = []
        for j, h in enumerate(hiddens):
            replay.set_batch(j)
            outputs.append(adapters.layer_output(_call(layer, h, call)))
        return outputs
    finally:
        replay.close()


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration_tokens: torch.Tensor,
    config: QuantConfig,
    device: str | torch.device | None = None,
    progress: bool = True,
    init_fn: InitFn | None = None,
    replay_activations: bool = True,
) -> dict[str, Any]:
    """Quantize the decoder linears of ``model`` in place on ``calibration_tokens`` (n, seqlen) LongTensor.

    ``device``: where each layer is computed (default: where the model is); only one layer is there at a time.
    ``init_fn``: the parameter initializer (default ``neuqi.init.init_params``).
    ``replay_activations``: keep the inputs and outputs of a layer's finished sub-blocks to skip recomputing them
    (same result, about half the forward work; False saves that memory, see ``Replay``).
    Returns a summary: ``config``, per-linear ``records`` {name, shape, init_loss, loss_before, loss, damping,
    seconds, init_seconds, tokens}, ``totals``, ``timings``, ``memory``, and ``qparams`` {qualified name:
    QParams} for ``neuqi.packed.pack_model``.
    """
    from tqdm.auto import tqdm

    if (
        calibration_tokens.dim() != 2
        or calibration_tokens.dtype != torch.long
        or calibration_tokens.numel() == 0
    ):
        raise ConfigError(
            f"calibration tokens must be a non-empty (n, seqlen) LongTensor, got "
            f"{calibration_tokens.dtype} {tuple(calibration_tokens.shape)}"
        )
    stack = adapters.find_stack(model)
    check_model(stack, config)
    init_fn = init_fn or _default_init()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()

    hiddens: list[torch.Tensor] | None = None
    calls: list[adapters.LayerCall] = []
    if needs_calibration(config):
        stem = [model.get_submodule(n) for n in stack.stem]
        for m in stem:
            m.to(device)
        try:
            batches = [b.to(device) for b in calibration_tokens.split(config.batch_size)]
            hiddens, calls = adapters.capture_inputs(model, stack, batches)
        finally:
            for m in stem:
                m.to(home)
    timings: dict[str, Any] = {"capture_s": round(time.perf_counter() - t0, 3), "layers_s": []}

    records: list[dict[str, Any]] = []
    qparams: dict[str, QParams] = {}
    for i in tqdm(range(len(stack.layers)), desc="quantize", unit="layer", disable=not progress):
        t_layer = time.perf_counter()
        layer = stack.layers[i].to(device)
        prefix = stack.layer_name(i)
        modules = _linears(layer)
        if hiddens is None:  # RTN without calibration: every linear, no Hessian
            for name, module in modules.items():
                record, qp = _quantize_linear(f"{prefix}.{name}", module, None, config, init_fn)
                records.append(record)
                qparams[record["name"]] = qp
        else:
            hiddens = _quantize_layer(layer, prefix, modules, hiddens, calls[i], config, init_fn, records, qparams,
                                      replay_activations)
        stack.layers[i].to(home)
        timings["layers_s"].append(round(time.perf_counter() - t_layer, 3))

    model.train(was_training)
    timings["total_s"] = round(time.perf_counter() - t0, 3)

    def total(key: str) -> float | None:
        values = [r[key] for r in records]
        return None if any(v is None for v in values) else float(sum(values))

    return {
        "config": config.to_dict(),
        "model": type(model).__name__,
        "layers": len(stack.layers),
        "calibration": {
            "windows": calibration_tokens.shape[0],
            "seqlen": calibration_tokens.shape[1],
            "tokens": calibration_tokens.numel(),
        },
        "device": str(device),
        "records": records,
        "totals": {
            "linears": len(records),
            "loss": total("loss"),
            "loss_before": total("loss_before"),
            "init_loss": total("init_loss"),
        },
        "timings": timings,
        "memory": _peak_memory(device),
        "qparams": qparams,
    }
