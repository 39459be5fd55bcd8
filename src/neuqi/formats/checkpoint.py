"""The neuqi checkpoint: a Hugging Face-style directory holding packed low-bit linears.

Layout (format_version 1)::

    config.json            the model config + quantization_config (below)
    model.safetensors      <name>.qweight (uint8, packed), <name>.scales / <name>.zeros (fp16), <name>.bias,
                           and every unquantized tensor (embeddings, norms, lm_head); a tied tensor
                           is stored once
    tokenizer files, generation_config.json (when given / present)

    quantization_config = {"quant_method": "neuqi", "format_version": 1, "bits": k, "group_size": g or -1,
                           "modules": [qualified names of the QuantLinears],
                           "overrides": {name: {"bits": k', "group_size": g'}} for modules that differ,
                           "packing": ..., "zero_point": "float16 real", ...extra keys from the pipeline}

See neuqi.packed for the formula. ``save_quantized`` writes atomically (``atomic.py``) and byte-reproducibly
(``tensorfile.py``); ``load`` rebuilds a ready model in one call and refuses stored scales that are not finite and
> 0 or zero-points that are not finite.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from ..errors import CheckpointError, ConfigError
from .atomic import atomic_output_dir
from .packed import QuantLinear, _set_submodule, quantized_linears
from .tensorfile import save_safetensors

log = logging.getLogger(__name__)

QUANT_METHOD = "neuqi"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
_RESERVED = (
    "quant_method",
    "format_version",
    "bits",
    "group_size",
    "modules",
    "overrides",
    "packing",
    "zero_point",
)


def _module_spec(layer: QuantLinear) -> dict[str, int]:
    group = -1 if layer.group_size == layer.in_features else layer.group_size
    return {"bits": layer.bits, "group_size": group}


def build_quantization_config(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` dict describing the QuantLinears of ``model`` (see module docstring)."""
    specs = {name: _module_spec(layer) for name, layer in quantized_linears(model)}
    if not specs:
        raise CheckpointError(
            "the model has no QuantLinear layers: pack it with neuqi.packed.pack_model first"
        )
    values = [tuple(s.values()) for s in specs.values()]
    bits, group_size = max(sorted(set(values)), key=values.count)  # the most common setting is the default
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size,
        "modules": list(specs),
        "overrides": {n: s for n, s in specs.items() if (s["bits"], s["group_size"]) != (bits, group_size)},
        "packing": "little-endian bit stream along the input dim (neuqi.packing)",
        "zero_point": "float16 real-valued, w = scale * (q - zero)",
    }
    for key, value in (extra or {}).items():
        if key in ("bits", "group_size") and config["overrides"] == {} and value != config[key]:
            raise CheckpointError(
                f"quant_config says {key}={value!r} but the packed modules have {config[key]!r}"
            )
        if key not in _RESERVED:
            config[key] = value
    return config


def _unique_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """state_dict items with each shared tensor (tied embeddings) yielded once, under its first name."""
    seen: set[tuple[int, int, tuple]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        yield name, tensor


def save_config(model: nn.Module, out_dir: Path, quantization_config: dict[str, Any] | None) -> None:
    """Write config.json (``quantization_config`` replaced, or removed if None) and generation_config.json."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if quantization_config is None:
        config.__dict__.pop("quantization_config", None)
    else:
        config.quantization_config = quantization_config
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    quant_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with QuantLinear layers) as a neuqi checkpoint directory; returns its path.

    The directory is built under a temporary name next to ``out_dir`` and renamed at the end, so a crash never
    leaves a half-written checkpoint. An existing non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    qconfig = build_quantization_config(model, quant_config)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_config(model, tmp, qconfig)
        tensors = {k: t.detach().cpu().contiguous() for k, t in _unique_tensors(model)}
        save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "neuqi": str(FORMAT_VERSION)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``quantization_config`` of a neuqi checkpoint directory; CheckpointError if it is not one."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a neuqi checkpoint: no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{path} is not a neuqi checkpoint: config.json has no neuqi quantization_config"
        )
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported neuqi format_version {qc.get('format_version')!r} "
            f"(this neuqi reads {FORMAT_VERSION})"
        )
    missing = [k for k in ("bits", "group_size", "modules") if k not in qc]
    if missing or not isinstance(qc["modules"], list):
        raise CheckpointError(f"{path}: quantization_config lacks {missing or ['a modules list']}")
    return qc


def module_specs(qc: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{module name: (bits, group_size)} from a quantization_config (group_size -1 = channel-wise)."""
    overrides = qc.get("overrides") or {}
    return {
        name: (
            overrides.get(name, {}).get("bits", qc["bits"]),
            overrides.get(name, {}).get("group_size", qc["group_size"]),
        )
        for name in qc["modules"]
    }


def _param_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if param is None or param.device.type == "meta":
        return None  # keep it as it is
    return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Within the block, parameters registered by modules being built go to the meta device (no memory, no
    init); buffers stay real (e.g. RoPE ``inv_freq``, computed in ``__init__`` and not stored in checkpoints).

    Uses torch's parameter-registration hook, removed on exit; ``torch.device("meta")`` would also put those
    buffers on meta, with nothing to reload them from.
    """
    handle = register_module_parameter_registration_hook(_param_on_meta)
    try:
        yield
    finally:
        handle.remove()


def replace_linears(
    model: nn.Module, specs: dict[str, tuple[int, int]], device: str | torch.device = "meta"
) -> None:
    """Swap each nn.Linear named in ``specs`` for an empty QuantLinear with that (bits, group_size)."""
    for name, (bits, group_size) in specs.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(
                f"quantized module {name!r} does not exist in this model architecture"
            ) from exc
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"quantized module {name!r} is a {type(linear).__name__}, not an nn.Linear")
        try:
            layer = QuantLinear(
                linear.in_features,
                linear.out_features,
                bits,
                group_size,
                bias=linear.bias is not None,
                device=device,
                dtype=linear.weight.dtype,
            )
        except ConfigError as exc:
            raise CheckpointError(f"{name}: {exc}") from exc
        _set_submodule(model, name, layer)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from .sharded import INDEX_NAME, check_shards, read_index

    if (path / INDEX_NAME).is_file():  # sharded (``neuqi quantize --stream`` of a large model)
        weight_map = read_index(path / INDEX_NAME)
        check_shards(path, weight_map)
        files = sorted(set(weight_map.values()))
    else:
        files = [WEIGHTS_NAME]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        weights = path / name
        if not weights.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        try:
            tensors.update(load_file(weights))
        except Exception as exc:  # safetensors raises SafetensorError / OSError for truncated or corrupt files
            raise CheckpointError(f"{weights} cannot be read (truncated or corrupt?): {exc}") from exc
    return tensors


def _check_shapes(
    model: nn.Module, tensors: dict[str, torch.Tensor], specs: dict[str, tuple[int, int]]
) -> None:
    expected = model.state_dict()
    bad = []
    for name in specs:
        for suffix in ("qweight", "scales", "zeros"):
            key = f"{name}.{suffix}"
            if key not in tensors:
                bad.append(f"{key} missing")
            elif tensors[key].shape != expected[key].shape or tensors[key].dtype != expected[key].dtype:
                got, want = tensors[key], expected[key]
                bad.append(f"{key} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
    if bad:
        raise CheckpointError(
            "tensors disagree with quantization_config bits/group_size: "
            + "; ".join(bad[:5])
            + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        )


def check_quantized_values(model: nn.Module, source: str | os.PathLike = "the checkpoint") -> None:
    """CheckpointError naming the first QuantLinear whose stored scales are not finite and > 0 or whose
    zero-points are not finite (a corrupt checkpoint would otherwise evaluate to NaN)."""
    for name, layer in quantized_linears(model):
        for what, t, ok in (("scales", layer.scales, lambda t: torch.isfinite(t) & (t > 0)),
                            ("zeros", layer.zeros, torch.isfinite)):
            if t.device.type == "meta":
                continue
            bad = int((~ok(t)).sum())
            if bad:
                rule = "finite and > 0" if what == "scales" else "finite"
                raise CheckpointError(f"{source}: {name}.{what} has {bad} value(s) that are not {rule}; "
                                      "the checkpoint is corrupt")


def load(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a neuqi checkpoint as a ready (eval-mode) model with QuantLinear layers, on ``device``.

    ``dtype`` casts the unquantized tensors and biases (default: as stored); scales/zeros always stay fp16.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qc = read_quantization_config(path)
    specs = module_specs(qc)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    tensors = _read_tensors(path)
    if dtype is None:
        floats = [
            t.dtype
            for k, t in tensors.items()
            if t.is_floating_point() and not k.endswith((".scales", ".zeros"))
        ]
        dtype = max(sorted(set(floats), key=str), key=floats.count) if floats else torch.float32
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot build the model from config.json: {exc}") from exc
    replace_linears(model, specs)
    _check_shapes(model, tensors, specs)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    tied = {n for names in names_of.values() for n in names[1:]}  # stored once, under the first name
    tied |= set(getattr(model, "all_tied_weights_keys", None) or {})
    quant_keys = {f"{n}.{s}" for n in specs for s in ("qweight", "scales", "zeros")}
    tensors = {
        k: (t.to(dtype) if t.is_floating_point() and k not in quant_keys else t) for k, t in tensors.items()
    }
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # e.g. an embedding whose shape disagrees with config.json
        raise CheckpointError(f"{path}: tensors do not fit the model in config.json: {exc}") from exc
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: state dict mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{path}: tensors not found in the checkpoint: {leftover[:5]}")
    check_quantized_values(model, path)
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved with a checkpoint (AutoTokenizer); CheckpointError if there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: no loadable tokenizer: {exc}") from exc


@dataclass(frozen=True)
class SizeReport:
    """Storage of a packed model. ``bits_per_weight`` = (codes + scales + zeros) bits / quantized weights."""

    quantized_weights: int
    quantized_bytes: int  # qweight + scales + zeros
    other_bytes: int  # everything else (embeddings, norms, lm_head, biases), tied tensors once
    file_bytes: int | None  # on-disk size of the checkpoint directory, if a path was given

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def size_report(model: nn.Module, path: str | os.PathLike | None = None) -> SizeReport:
    """Count the packed storage of ``model``; with ``path``, also the checkpoint's size on disk."""
    n_weights = quant_bytes = 0
    quant_keys = set()
    for name, layer in quantized_linears(model):
        n_weights += layer.in_features * layer.out_features
        for suffix in ("qweight", "scales", "zeros"):
            t = getattr(layer, suffix)
            quant_keys.add(f"{name}.{suffix}")
            quant_bytes += t.numel() * t.element_size()
    other = sum(t.numel() * t.element_size() for k, t in _unique_tensors(model) if k not in quant_keys)
    file_bytes = None
    if path is not None:
        file_bytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return SizeReport(n_weights, quant_bytes, other, file_bytes)


__all__ = [
    "SizeReport",
    "build_quantization_config",
    "check_quantized_values",
    "load",
    "load_tokenizer",
    "module_specs",
    "read_quantization_config",
    "save_quantized",
    "size_report",
]
