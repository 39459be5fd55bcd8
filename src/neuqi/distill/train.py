"""The distillation run (spec §6): teacher targets, the mse / kl losses, and the training loop ``distill``."""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, ModelError
from ..pipeline.adapters import find_stack, layers_standing_in, lm_head
from .config import DistillConfig, DistillHistory, resolve_compute_dtype
from .masters import MasterWeights

log = logging.getLogger(__name__)

Heads = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]  # (student, teacher)


# --------------------------------------------------------------------------------------- model plumbing
@contextmanager
def layer_checkpointing(layers: nn.ModuleList | None) -> Iterator[None]:
    """Within the block each decoder layer of ``layers`` runs under torch.utils.checkpoint (its activations are
    recomputed in backward), through a ``StandIn`` put in its place. None: a no-op."""
    if layers is None:
        yield
        return
    with layers_standing_in(layers, lambda _i, layer: functools.partial(checkpoint, layer, use_reentrant=False)):
        yield


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state after the final norm, (B, T, H): the base model's output, no lm_head."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


# ------------------------------------------------------------------------------------------------- losses
def teacher_targets(teacher: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device,
                    autocast: Any = None, progress: bool = False) -> torch.Tensor:
    """h_T for every window: (n, T, H) fp32 on the CPU (the teacher must be on ``device``)."""
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad(), autocast or nullcontext():
        for i in tqdm(range(0, len(tokens), batch_size), desc="teacher", disable=not progress, leave=False):
            out.append(final_hidden(teacher, tokens[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def _kl_backward(h: torch.Tensor, h_teacher: torch.Tensor, head_s: Callable, head_t: Callable, chunk: int,
                 autocast: Any) -> float:
    """Mean over positions of KL(p_T ‖ p_S); back-propagates into ``h`` (B, T, H) one chunk at a time."""
    h_leaf = h.detach().requires_grad_(True)
    n_pos = h.shape[0] * h.shape[1]
    total = 0.0
    for start in range(0, h.shape[1], chunk):
        sl = slice(start, start + chunk)
        with autocast:
            log_ps = F.log_softmax(head_s(h_leaf[:, sl]).float(), dim=-1)  # (B, c, V)
            with torch.no_grad():
                log_pt = F.log_softmax(head_t(h_teacher[:, sl]).float(), dim=-1)
            kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / n_pos
        kl.backward()  # frees this chunk's logits
        total += kl.item()
    h.backward(h_leaf.grad)
    return total


def _loss_backward(student: nn.Module, ids: torch.Tensor, target: torch.Tensor, config: DistillConfig,
                   heads: Heads | None, autocast: Any) -> float:
    """Forward the student on ``ids`` (B, T), back-propagate the loss against ``target`` h_T; return it."""
    with autocast:
        hidden = final_hidden(student, ids)  # (B, T, H)
    if config.loss == "kl":
        return _kl_backward(hidden, target, *heads, config.kl_chunk, autocast)
    loss = F.mse_loss(hidden.float(), target)
    loss.backward()
    return loss.item()


# ----------------------------------------------------------------------------------------------- training
def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batch_indices(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """Window indices of each step: every epoch a fresh permutation of range(n), cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def _check_inputs(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor) -> None:
    if student is teacher:
        raise ConfigError("the student and the teacher must be different models")
    if tokens.dim() != 2 or len(tokens) < 1 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise ConfigError(f"tokens must be an integer tensor (n, seqlen >= 2), got {tuple(tokens.shape)}")


def _teacher_side(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, config: DistillConfig,
                  device: torch.device, autocast: Any, progress: bool) -> tuple[torch.Tensor | None, Heads | None]:
    """(cached targets h_T (n, T, H) on the CPU or None, the (student, teacher) lm_heads for ``kl`` or None).

    The teacher must be on ``device``. With the cache, the ``kl`` teacher head is a copy, so the teacher itself
    can go back where it was."""
    targets = heads = None
    if config.cache_teacher:
        targets = teacher_targets(teacher, tokens, config.batch_size, device, autocast, progress)
        if config.loss == "kl":
            heads = lm_head(student), lm_head(teacher, copy.deepcopy(teacher.get_output_embeddings()))
    elif config.loss == "kl":
        heads = lm_head(student), lm_head(teacher)
    return targets, heads


@contextmanager
def _masters_installed(student: nn.Module, config: DistillConfig) -> Iterator[MasterWeights]:
    """The student in eval mode with every parameter frozen and ``MasterWeights`` in place. On a clean exit the
    trained values are written back; on an error the originals are restored. Mode and grad flags come back."""
    was_training = student.training
    student.eval()
    grad_flags = {p: p.requires_grad for p in student.parameters()}
    for p in grad_flags:
        p.requires_grad_(False)
    try:
        masters = MasterWeights(student, config.train_scales, config.train_zeros, config.train_norms)
        try:
            yield masters
        except BaseException:
            masters.restore()
            raise
        masters.finish()
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        student.train(was_training)


def _train(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, targets: torch.Tensor | None,
           heads: Heads | None, masters: MasterWeights, config: DistillConfig, device: torch.device, autocast: Any,
           history: DistillHistory, progress: bool) -> None:
    """AdamW on the masters over ``epochs`` passes of shuffled batches, one optimizer step per batch."""
    from tqdm.auto import tqdm

    params = masters.parameters()
    history.trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    total = math.ceil(len(tokens) / config.batch_size) * config.epochs
    warmup = math.ceil(config.warmup_ratio * total)
    batches = _batch_indices(len(tokens), config.batch_size, config.epochs, config.seed)
    with tqdm(total=total, desc=f"distill ({config.loss})", disable=not progress) as bar:
        for step, idx in enumerate(batches):
            t_step = time.perf_counter()
            ids = tokens[idx].to(device)  # (B, T)
            if targets is not None:
                target = targets[idx].to(device)  # (B, T, H) fp32
            else:
                with torch.no_grad(), autocast:
                    target = final_hidden(teacher, ids).float()
            lr = config.lr * _lr_factor(step, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = _loss_backward(student, ids, target, config, heads, autocast)
            if not math.isfinite(loss):
                raise ModelError(f"distillation loss became {loss} at step {step}; lower the lr")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            optimizer.step()
            masters.project()
            history.add_step(loss, lr, grad_norm, time.perf_counter() - t_step)
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}")
            bar.update(1)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokens: torch.Tensor,
    config: DistillConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> DistillHistory:
    """Train the student's scales and zero-points (and norms if asked) in place to match ``teacher``.

    tokens: LongTensor (n, T). The student moves to ``device`` (default: where it is) and stays there; the
    teacher runs on ``device`` and goes back where it was. Codes never change. On success the trained s and Z
    are in the QuantLinear fp16 buffers; on an error the student keeps its original values.
    """
    config = config or DistillConfig()
    _check_inputs(student, teacher, tokens)
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(student.parameters()).device
    dtype = resolve_compute_dtype(config.compute_dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    history = DistillHistory(compute_dtype=str(dtype).removeprefix("torch."))
    layers = find_stack(student).layers if config.gradient_checkpointing else None
    teacher_home = next(teacher.parameters()).device
    teacher.to(device)
    try:
        try:
            targets, heads = _teacher_side(student, teacher, tokens, config, device, autocast, progress)
        finally:
            if config.cache_teacher:  # the targets are all it is needed for
                teacher.to(teacher_home)
                history.teacher_seconds = round(time.perf_counter() - start, 3)
        student.to(device)
        with _masters_installed(student, config) as masters, layer_checkpointing(layers):
            _train(student, teacher, tokens, targets, heads, masters, config, device, autocast, history, progress)
    finally:
        teacher.to(teacher_home)
    history.total_seconds = round(time.perf_counter() - start, 3)
    log.info("distilled %d steps in %.1f s: loss %.4g -> %.4g", len(history.loss), history.total_seconds,
             history.loss[0], history.loss[-1])
    return history
