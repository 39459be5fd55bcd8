"""GPTQ-convention perplexity (spec §5).

The test text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (the tail is
dropped); each window's mean NLL of its ``seqlen - 1`` next-token predictions is taken from fp32 logits, and
PPL = exp(mean over windows). C4 is capped at 256 windows, as GPTQ's ``c4_new``.

Two execution paths give the same numbers: ``full`` calls the model (when it is, or fits, on the device) and
``layers`` runs one decoder layer at a time on the device with the activations of all windows kept on the CPU, so a
model larger than the device still evaluates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError, ModelError
from ..pipeline.adapters import DecoderStack, capture_inputs, find_stack, fit_batch, layer_output, lm_head
from ..pipeline.data import load_text

log = logging.getLogger(__name__)

PPL_TASKS = ("wikitext2", "c4")
C4_MAX_WINDOWS = 256  # GPTQ c4_new: 256 * seqlen tokens
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


# ------------------------------------------------------------------------------------------------- placement
def model_device(module: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer); CPU for an empty module."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def model_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def default_device() -> torch.device:
    """The current accelerator (CUDA, XPU, MPS, ...) if there is one, else the CPU."""
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return acc if acc is not None else torch.device("cpu")


def fits_on_device(model: nn.Module, device: str | torch.device, headroom: float = 0.8) -> bool:
    """Whether the whole model fits in ``headroom`` of the device's free memory (always true for the CPU)."""
    device = torch.device(device)
    if device.type == "cpu" or model_device(model) == device:
        return True
    try:
        free, _ = torch.accelerator.get_memory_info(device)
    except (RuntimeError, ValueError, AssertionError) as exc:  # no memory query for this backend
        log.debug("cannot query free memory on %s (%s); assuming the model fits", device, exc)
        return True
    return model_bytes(model) < headroom * free


def _to(obj: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """Move the tensors inside nested tuples/lists/dicts to ``device`` (shared tensors are moved once)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


# -------------------------------------------------------------------------------------------- model structure
def _final_norm(model: nn.Module, stack: DecoderStack) -> nn.Module:
    parent_name = stack.name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for name in _NORM_NAMES:
        norm = getattr(parent, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ModelError(
        f"cannot find the final norm of {type(parent).__name__} (looked for {', '.join(_NORM_NAMES)}); "
        "evaluate with mode='full' instead"
    )


# ------------------------------------------------------------------------------------------------- perplexity
def _nll_from_hidden(hidden: torch.Tensor, ids: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     chunk: int = 1024) -> torch.Tensor:
    """Per-window mean NLL (B,) fp32 of ``ids[:, 1:]`` given ``hidden`` (B, T, H), with at most (B, chunk, V)
    logits alive at a time."""
    bsz, seqlen = ids.shape
    total = torch.zeros(bsz, dtype=torch.float32, device=hidden.device)
    for s in range(0, seqlen - 1, chunk):
        e = min(s + chunk, seqlen - 1)
        logits = head(hidden[:, s:e]).float()  # (B, c, V) fp32
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, s + 1 : e + 1].flatten(), reduction="none")
        total += nll.view(bsz, -1).sum(1)
    return total / (seqlen - 1)


def _nll_full(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, bar) -> list[torch.Tensor]:
    out = []
    for ids in batches:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        out.append(_nll_from_hidden(logits, ids, lambda x: x).cpu())
        bar.update(1)
    return out


def _nll_layers(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, bar) -> list[torch.Tensor]:
    stack = find_stack(model)
    norm, head = _final_norm(model, stack), lm_head(model)
    offload = torch.device("cpu")
    stem_device = model_device(model.get_input_embeddings())
    hidden, calls = capture_inputs(model, stack, [ids.to(stem_device) for ids in batches])  # only the stem runs
    hidden = [h.to(offload) for h in hidden]  # (B, T, H) per batch, all windows
    memo: dict[int, Any] = {}
    calls = [_to(call, device, memo) for call in calls]  # rotary embeddings, masks: moved once
    for layer, call in zip(stack.layers, calls):
        home = model_device(layer)
        layer.to(device)
        for j, h in enumerate(hidden):
            args, kwargs = fit_batch(call, h.shape[0])
            hidden[j] = layer_output(layer(h.to(device), *args, **kwargs)).to(offload)
        layer.to(home)
        bar.update(1)
    tail = nn.ModuleList([norm, model.get_output_embeddings()])
    home = model_device(tail)
    tail.to(device)
    try:
        return [_nll_from_hidden(norm(h.to(device)), ids.to(device), head).cpu() for h, ids in zip(hidden, batches)]
    finally:
        tail.to(home)
        bar.update(1)


def corpus_ids(tokenizer, dataset: str) -> torch.Tensor:
    """The whole evaluation text of ``dataset`` (``wikitext2``, ``c4`` or a path), tokenized once: LongTensor (n,)."""
    text = load_text(dataset, "test")
    return torch.as_tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
    mode: str = "auto",
) -> dict[str, Any]:
    """GPTQ-convention perplexity of ``model`` on ``dataset`` (see the module docstring).

    ``device``: where to compute (default: where the model is). ``mode``: ``full`` (call the model; it is moved to
    ``device`` for the call and back), ``layers`` (one decoder layer at a time on ``device``), or ``auto`` (``full``
    when the model fits on the device). The model is left where it was.
    Returns ``{dataset, ppl, nll, windows, seqlen, tokens, mode, device, seconds}``.
    """
    from tqdm.auto import tqdm

    if seqlen < 2 or batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise ConfigError(f"need seqlen >= 2, batch_size >= 1, max_windows >= 1; got {seqlen}, {batch_size}, "
                          f"{max_windows}")
    if mode not in ("auto", "full", "layers"):
        raise ConfigError(f"unknown perplexity mode {mode!r}; choose auto, full or layers")
    start = time.perf_counter()
    ids = corpus_ids(tokenizer, dataset)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise DataError(f"{dataset}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    cap = min(x for x in (n_windows, max_windows, C4_MAX_WINDOWS if dataset == "c4" else None) if x)
    windows = ids[: cap * seqlen].view(cap, seqlen)  # (N, T)
    batches = list(windows.split(batch_size))

    home = model_device(model)
    device = torch.device(device) if device is not None else home
    if mode == "auto":
        mode = "full" if fits_on_device(model, device) else "layers"
    total = len(batches) if mode == "full" else len(find_stack(model).layers) + 1
    was_training = model.training
    model.eval()
    with tqdm(total=total, desc=f"ppl {dataset} ({mode})", disable=not progress, leave=False) as bar:
        if mode == "full":
            model.to(device)
            try:
                nlls = _nll_full(model, batches, device, bar)
            finally:
                model.to(home)
        else:
            nlls = _nll_layers(model, batches, device, bar)
    model.train(was_training)
    nll = torch.cat(nlls).double().mean().item()
    name = dataset if dataset in PPL_TASKS else Path(dataset).stem
    return {"dataset": name, "ppl": math.exp(nll), "nll": nll, "windows": cap, "seqlen": seqlen,
            "tokens": cap * seqlen, "mode": mode, "device": str(device),
            "seconds": round(time.perf_counter() - start, 3)}
