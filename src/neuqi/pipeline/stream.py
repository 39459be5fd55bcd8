"""Streaming quantization of a checkpoint on disk: one decoder layer in memory at a time, resumable.

``quantize_checkpoint(path, tokens, config, out)`` gives the same packed checkpoint as ``load_model`` +
``quantize_model`` + ``pack_model`` + ``save_quantized`` (bit-identical tensors) without ever holding the model:

1. the model is built on the meta device (parameters only; buffers such as RoPE frequencies are real) and the
   FP tensors are read lazily from the safetensors shards (``CheckpointSource``);
2. the stem (embeddings) is materialized to capture the hidden states entering layer 0; the tensors outside the
   decoder layers are copied (cast to the compute dtype) into ``stem/`` of the partial run directory, one per file;
3. per layer: materialize it, quantize it (``walker.quantize_layer``), pack it (``QuantLinear``), write its
   tensors to ``layers/<i>.safetensors``, save its outputs (the next layer's inputs) under ``acts/<i+1>/``, record
   the layer as done in ``state.json``, free it;
4. merge the files into ``model.safetensors`` (or shards + index, ``max_shard_mb``), write config, tokenizer and
   ``neuqi_summary.json`` in a temporary directory and rename it to ``out``; then remove the partial directory.

The partial directory ``.<out>.partial`` next to ``out`` survives a crash (SIGKILL included: every file in it is
written to a temporary name and renamed); ``resume=True`` continues after its last finished layer, and refuses
when the config, the calibration tokens, the checkpoint or the dtype differ. Peak host memory: the embedding, one
layer, its Hessians, and the calibration activations (``activations``: host memory, the compute device, or disk).
With ``dist`` (``neuqi.pipeline.distributed``) the batches and each linear's rows are split over the ranks; rank
0 writes.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import jsonio
from ..errors import CheckpointError, ConfigError, ModelError
from ..formats import sharded
from ..formats.output import check_output_dir
from ..formats.packed import pack_model
from ..quant import grid
from . import adapters, walker
from .config import QuantConfig, needs_calibration
from .records import LinearRecord, QuantResult
from .runstate import Activations, RunState, tokens_fingerprint, write_atomic
from .source import CheckpointSource

log = logging.getLogger(__name__)

ACTIVATIONS = ("host", "device", "disk")
SUMMARY_NAME = "neuqi_summary.json"


@dataclass(frozen=True)
class StreamConfig:
    """How ``neuqi quantize`` reads and writes when the model does not fit in memory (see module docstring)."""

    stream: bool = field(default=False, metadata={
        "help": "read the FP checkpoint one decoder layer at a time from its safetensors and write each packed "
                "layer when done (memory does not grow with depth; same checkpoint)"})
    resume: bool = field(default=False, metadata={
        "help": "continue an interrupted --stream run after its last finished layer (same config and data)"})
    activations: str = field(default="host", metadata={
        "help": "where calibration activations live between layers (--stream)", "choices": ACTIVATIONS})
    max_shard_mb: float = field(default=4096, metadata={
        "help": "largest output safetensors file in MiB; bigger outputs are sharded with an index (--stream)"})
    allow_pickle: bool = field(default=False, metadata={
        "help": "accept a checkpoint with only pickle .bin weights (read with torch.load(weights_only=True); "
                "only for files you trust)"})

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {list(ACTIVATIONS)}, got {self.activations!r}")
        mb = self.max_shard_mb
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0:
            raise ConfigError(f"max_shard_mb must be a number > 0, got {self.max_shard_mb!r}")


def _skeleton(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, torch.dtype]:
    """(the model of ``path/config.json`` with its parameters on the meta device, in eval mode; its dtype).
    ``dtype`` None: the config's dtype, else fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..formats.checkpoint import _parameters_on_meta

    try:
        config = AutoConfig.from_pretrained(path)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot build the model from config.json: {exc}") from exc
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.use_cache = False
    return model.eval(), dtype


def _stored_keys(model: nn.Module, prefix: str = "") -> list[str]:
    """state_dict keys (under ``prefix``) with each tied parameter once, under its first name, as
    ``save_quantized`` stores them."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
    return [k for k in model.state_dict() if k not in tied and k.startswith(prefix)]


def _check_source(model: nn.Module, stack: adapters.DecoderStack, source: CheckpointSource,
                  config: QuantConfig) -> None:
    """Every stored tensor is in the checkpoint with the model's shape; every linear takes the group size."""
    expected = model.state_dict()
    keys = [k for k in _stored_keys(model) if expected[k].device.type == "meta"]  # real buffers are computed
    missing = [k for k in keys if k not in source.shapes]
    if missing:
        raise CheckpointError(f"{source.path}: the checkpoint lacks {len(missing)} tensors of the model in "
                              f"config.json, e.g. {missing[:3]}")
    bad = [f"{k} {list(source.shapes[k])} (model: {list(expected[k].shape)})" for k in keys
           if tuple(expected[k].shape) != source.shapes[k]]
    if bad:
        raise CheckpointError(f"{source.path}: tensor shapes disagree with config.json: {'; '.join(bad[:3])}")
    if getattr(config, "bpw", None) is not None and getattr(config, "plan", None) is None:
        raise ConfigError("--bpw plans bit widths on the whole model in memory; quantize in memory, or stream with "
                          "the plan it chose (QuantConfig.plan)")
    for i, layer in enumerate(stack.layers):
        for name, linear in walker._linears(layer).items():
            full = f"{stack.layer_name(i)}.{name}"
            try:
                grid.resolve_group_size(linear.in_features, config.linear_format(full)[1])
            except ConfigError as exc:
                raise ConfigError(f"{full}: {exc}") from None


def _read(source: CheckpointSource, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` with floating-point ones cast to ``dtype`` (as ``from_pretrained(dtype=...)``)."""
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in source.read(keys).items()}


def _materialize(module: nn.Module, prefix: str, source: CheckpointSource, dtype: torch.dtype,
                 device: torch.device) -> nn.Module:
    """Load the meta parameters (and stored buffers) of ``module`` (qualified name ``prefix``) from ``source``
    and move it to ``device``."""
    state = module.state_dict()
    keys = [k for k, t in state.items() if t.device.type == "meta" or f"{prefix}.{k}" in source.shapes]
    tensors = _read(source, [f"{prefix}.{k}" for k in keys], dtype)
    module.load_state_dict({k: tensors[f"{prefix}.{k}"] for k in keys}, strict=False, assign=True)
    return module.to(device)


def _capture(model: nn.Module, stack: adapters.DecoderStack, source: CheckpointSource, batches: list[torch.Tensor],
             dtype: torch.dtype, device: torch.device) -> tuple[list[torch.Tensor], list[adapters.LayerCall]]:
    """The hidden states entering layer 0 for ``batches`` and every layer's call arguments; the stem is loaded
    on ``device`` for this and freed after."""
    stem = [_materialize(model.get_submodule(n), n, source, dtype, device) for n in stack.stem]
    try:
        return adapters.capture_inputs(model, stack, [b.to(device) for b in batches])
    finally:
        for m in stem:
            m.to("meta")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from ..formats.checkpoint import FORMAT_VERSION

    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    write_atomic(path, lambda p: save_file(tensors, p, metadata={"format": "pt", "neuqi": str(FORMAT_VERSION)}))


def _release_memory() -> None:
    """Free the last layer for real: collect the reference cycles holding its tensors, and give the freed heap back
    to the OS (glibc keeps it otherwise, raising its mmap threshold to the size of the tensors freed, so host
    memory would grow with depth)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _barrier(dist: Any) -> None:
    if dist is not None:
        dist.barrier()


def _write_layer(layer: nn.Module, prefix: str, qparams: dict, path: Path) -> None:
    """Pack the fake-quantized linears of ``layer`` (QuantLinear, in place) and write its tensors to ``path``."""
    pack_model(layer, {name[len(prefix) + 1:]: qp for name, qp in qparams.items()})
    _save_tensors(layer.state_dict(prefix=f"{prefix}."), path)


def _finish(model: nn.Module, state: RunState, out: Path, config: QuantConfig, stream: StreamConfig,
            result: QuantResult, tokenizer: Any, overwrite: bool) -> None:
    """Merge the stem and layer files into the checkpoint at ``out`` (atomic rename), then drop the state."""
    from ..formats.atomic import atomic_output_dir
    from ..formats.checkpoint import FORMAT_VERSION, build_quantization_config, replace_linears, save_config

    linears = {r.name: (r.bits, r.group_size) for r in result.records}
    replace_linears(model, {n: s for n, s in linears.items() if isinstance(model.get_submodule(n), nn.Linear)})
    extra = {k: v for k, v in config.to_dict().items() if k not in ("bits", "group_size")}
    qconfig = build_quantization_config(model, {"pipeline": extra})
    files = state.stem_files() + [state.layer_file(i) for i in range(result.layers)]
    with atomic_output_dir(out, overwrite) as tmp:
        metadata = {"format": "pt", "neuqi": str(FORMAT_VERSION)}
        sharded.write_shards(files, tmp, int(stream.max_shard_mb * 2**20), metadata)
        save_config(model, tmp, qconfig)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_NAME).write_text(jsonio.dumps(result.to_dict(), indent=1))
    state.remove()


def _start(model: nn.Module, stack: adapters.DecoderStack, source: CheckpointSource, state: RunState,
           batches: list[torch.Tensor], ids: list[int], config: QuantConfig, stream: StreamConfig,
           dtype: torch.dtype, device: torch.device, writer: bool) -> tuple[Activations | None, list]:
    """Steps 1-2 of the module docstring: (the activations entering the first layer to do, or None without
    calibration; every layer's call arguments). ``batches``: this rank's, with global ids ``ids``."""
    t0 = time.perf_counter()
    hiddens, calls = None, []
    # before the stem is materialized: loading it assigns new parameters, which unties a tied head
    keys = [k for k in _stored_keys(model) if not k.startswith(f"{stack.name}.")]
    if needs_calibration(config):
        captured, calls = _capture(model, stack, source, batches, dtype, device)
        start = state.layers_done
        hiddens = Activations(state, ids, stream.activations, device, start, captured if start == 0 else None)
    if writer and state.state.get("stem_files") is None:  # one file per tensor: one embedding in memory at a time
        real = {k: t for k, t in model.state_dict().items() if k in keys and t.device.type != "meta"}
        for n, key in enumerate(keys):
            _save_tensors({key: real[key] if key in real else _read(source, [key], dtype)[key]}, state.stem_file(n))
        state.state["stem_files"] = len(keys)
        state.save()
    if state.state["capture_s"] is None:
        state.state["capture_s"] = round(time.perf_counter() - t0, 3)  # saved with the first finished layer
    return hiddens, calls


def _quantize_layers(model: nn.Module, stack: adapters.DecoderStack, source: CheckpointSource, state: RunState,
                     hiddens: Activations | None, calls: list, config: QuantConfig, init_fn: walker.InitFn,
                     replay_activations: bool, dtype: torch.dtype, device: torch.device, dist: Any,
                     progress: bool) -> None:
    """Quantize, pack and write the layers from ``state.layers_done`` on, one at a time (steps 3 of the module
    docstring)."""
    from tqdm.auto import tqdm

    writer = dist is None or dist.rank == 0
    start = state.layers_done
    for i in tqdm(range(start, len(stack.layers)), desc="quantize", unit="layer", disable=not progress,
                  initial=start, total=len(stack.layers)):
        t_layer = time.perf_counter()
        prefix = stack.layer_name(i)
        layer = _materialize(stack.layers[i], prefix, source, dtype, device)
        records, qparams, _ = walker.quantize_layer(
            layer, prefix, hiddens, calls[i] if calls else None, config, init_fn, replay_activations, dist,
            None if hiddens is None else hiddens.put)
        if writer:
            _write_layer(layer, prefix, qparams, state.layer_file(i))
        _barrier(dist)  # every rank's outputs and the layer file are on disk
        if writer:
            state.mark_done(i, [r.to_dict() for r in records], time.perf_counter() - t_layer)
        _barrier(dist)
        if hiddens is not None:
            hiddens.advance()
            hiddens.drop(i)
        layer.to("meta")
        del layer, records, qparams
        _release_memory()


@torch.no_grad()
def quantize_checkpoint(
    path: str | os.PathLike,
    calibration_tokens: torch.Tensor,
    config: QuantConfig,
    out: str | os.PathLike,
    stream: StreamConfig | None = None,
    *,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    init_fn: walker.InitFn | None = None,
    replay_activations: bool = True,
    dist: Any = None,
    info: dict[str, dict[str, Any]] | None = None,
) -> QuantResult:
    """Quantize the FP checkpoint directory ``path`` on ``calibration_tokens`` (n, seqlen) into the packed
    checkpoint ``out``, one decoder layer in memory at a time (module docstring); returns the summary written as
    ``neuqi_summary.json`` (its ``qparams`` empty: they are in the checkpoint).

    ``dtype``: the compute dtype (None: the config's). ``device``: where layers run (default cpu). ``dist``: a
    ``neuqi.pipeline.distributed.Dist``. ``info``: {"model": {...}, "calibration": {...}} merged into the summary.
    """
    from .models import parse_dtype

    stream = stream or StreamConfig(stream=True)
    if config.target == "fp":
        raise ConfigError("target='fp' is not supported when streaming (the FP activations would need a second "
                          "store); use quantize_model")
    walker._check_tokens(calibration_tokens)
    path, out = Path(path), Path(out)
    check_output_dir(out, overwrite)
    source = CheckpointSource(path, stream.allow_pickle)
    model, dtype = _skeleton(path, parse_dtype(dtype))
    stack = adapters.find_stack(model)
    _check_source(model, stack, source, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    init_fn = init_fn or walker._default_init()
    batches = list(calibration_tokens.split(config.batch_size))
    ids = list(range(len(batches))) if dist is None else dist.batch_ids(len(batches))
    writer = dist is None or dist.rank == 0

    state = RunState(out, {"config": config.to_dict(), "calibration": tokens_fingerprint(calibration_tokens),
                           "source": source.fingerprint(), "dtype": str(dtype)})
    if writer:
        state.open(stream.resume, overwrite)
    _barrier(dist)
    if not writer:
        state.load()
    start = state.layers_done
    t0 = time.perf_counter()
    try:
        hiddens, calls = _start(model, stack, source, state, [batches[j] for j in ids], ids, config, stream, dtype,
                                device, writer)
        _quantize_layers(model, stack, source, state, hiddens, calls, config, init_fn, replay_activations, dtype,
                         device, dist, progress and writer)
    except OSError as exc:
        raise CheckpointError(f"{exc.filename or out}: {exc.strerror or exc}; the finished layers are kept in "
                              f"{state.dir}: fix this and rerun with --resume") from exc
    if not writer:
        state.load()
    _barrier(dist)  # every rank has read the final state before rank 0 removes it
    timings = {"capture_s": state.state["capture_s"], "layers_s": state.state["layers_s"],
               "total_s": round(time.perf_counter() - t0, 3), "resumed_at_layer": start or None}
    result = QuantResult(
        config=config, records=[LinearRecord.from_dict(r) for r in state.state["records"]],
        model={"class": type(model).__name__, "source": str(path), "dtype": str(dtype).removeprefix("torch."),
               **(info or {}).get("model", {})},
        layers=len(stack.layers), device=str(device), timings=timings, memory=walker._peak_memory(device),
        calibration={"windows": calibration_tokens.shape[0], "seqlen": calibration_tokens.shape[1],
                     "tokens": calibration_tokens.numel(), **(info or {}).get("calibration", {})},
        world_size=1 if dist is None else dist.world_size, extra={"stream": asdict(stream)})
    if writer:
        try:
            _finish(model, state, out, config, stream, result, tokenizer, overwrite)
        except OSError as exc:
            raise CheckpointError(f"writing {out} failed: {exc.strerror or exc}; nothing was written there, the "
                                  f"quantized layers are kept in {state.dir}: fix this and rerun with --resume"
                                  ) from exc
    _barrier(dist)
    return result
