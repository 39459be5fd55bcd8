"""Lightweight distillation of a packed model: train scales and zero-points, codes frozen (spec §6, §11.10).

Student: a model with ``QuantLinear`` layers (codes q, fp16 s and Z); teacher: the original model. Only s and
Z (optionally the norm weights) train: Ŵ = s·(q − Z), ∂L/∂s = Σ_group ∂L/∂Ŵ·(q − Z), ∂L/∂Z = −s·Σ_group ∂L/∂Ŵ.

Losses on windows (B, T): ``mse`` (the reference's) = mean over all B·T·H elements of (h_T − h_S)², h = the
last hidden state after the final norm; ``kl`` = KL(p_T ‖ p_S) of the next-token distributions averaged over
the B·T positions, with logits built and back-propagated ``kl_chunk`` positions at a time.

Precision: every trained tensor has an fp32 master ``nn.Parameter`` whatever the model dtype (the reference
ran AdamW on bf16 tensors, where a 3e-4 step vanishes once |Z| ≥ 0.125; spec §6). While training, each
QuantLinear is swapped for a stand-in holding the masters and its unpacked codes (1 byte/weight); matmuls
run under autocast in ``compute_dtype`` (bf16 ≈ 4x the fp32 matmul speed on an AVX512-BF16 CPU). At the end
the masters are rounded to fp16 (``grid.to_storage``) into the QuantLinear buffers: the packed model and its
saved checkpoint hold exactly what inference uses.

Teacher targets are cached by default: one no-grad pass stores h_T, (n, T, H) fp32 on the CPU (75 MB for
64×512 SmolLM2 windows, 8.6 GB for 256×2048 on a 7B model); the teacher then goes back where it was and extra
epochs reuse the targets (``kl`` keeps a copy of its lm_head on the device). So a 2-bit 7B student fits one
24 GB GPU with per-decoder-layer gradient checkpointing (~13 GB: codes 1.6 packed + 6.5 unpacked, masters and
AdamW 1.8, fp16 embeddings and head 0.5, activations). ``cache_teacher=False`` runs the teacher every step.

On purpose unlike the reference: the student runs in eval mode (deterministic, no dropout); biases and
embeddings are frozen, norm weights too unless ``train_norms`` (the reference trained them: nothing froze
them); scales are clamped to ≥ ``grid.MIN_SCALE`` after each step (storable); warmup is lr·(t+1)/w over
w = ceil(warmup_ratio·steps) steps, then cosine to 0 (HF's first step has lr 0).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError, ModelError
from .eval.perplexity import decoder_layers
from .formats.packed import QuantLinear, _set_submodule, quantized_linears
from .quant import grid

log = logging.getLogger(__name__)

LOSSES = ("mse", "kl")
COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
CONFIG_VERSION = 1


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings; defaults follow the reference (spec §6). ``nsamples``, ``seqlen``, ``seed``
    and ``avoid_calibration_overlap`` say which windows the CLI samples; ``distill`` uses the tokens given."""

    loss: str = field(default="mse", metadata={"help": "mse: final hidden states (reference); kl: logits"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate"})
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warmup fraction, then cosine to 0"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "global grad-norm clip; None: off"})
    batch_size: int = 1
    epochs: int = 1
    nsamples: int = 256
    seqlen: int = 2048
    seed: int = 0
    train_scales: bool = True
    train_zeros: bool = True
    train_norms: bool = field(default=False, metadata={"help": "also train norm weights (reference: yes)"})
    compute_dtype: str = field(default="auto", metadata={"help": "autocast: auto (bf16 if native), float32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer"})
    cache_teacher: bool = field(default=True, metadata={"help": "precompute teacher targets on the CPU"})
    kl_chunk: int = field(default=1024, metadata={"help": "positions per logits chunk for the kl loss"})
    avoid_calibration_overlap: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown distillation loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                              f"got {self.compute_dtype!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"need weight_decay >= 0 and 0 <= warmup_ratio < 1, "
                              f"got {self.weight_decay}, {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        for name in ("batch_size", "epochs", "nsamples", "seqlen", "kl_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be at least 2, got {self.seqlen}")
        if not (self.train_scales or self.train_zeros or self.train_norms):
            raise ConfigError("nothing to train: enable train_scales, train_zeros or train_norms")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        d = dict(d)
        if d.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise ConfigError(f"unsupported DistillConfig version {d['version']!r} "
                              f"(this neuqi reads {CONFIG_VERSION})")
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class DistillHistory:
    """What ``distill`` measured: one entry per optimizer step, plus totals (seconds are wall time)."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # global norm before clipping
    seconds: list[float] = field(default_factory=list)
    teacher_seconds: float = 0.0  # the caching pass (0 without a cache)
    total_seconds: float = 0.0
    trainable: int = 0  # number of trained scalars
    compute_dtype: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ trainable tensors
class _Dequantize(torch.autograd.Function):
    """Ŵ = s·(q − Z) in ``dtype``, (out, G·g), from codes q (out, G, g) uint8 and fp32 s, Z (out, G).

    Backward in fp32: ∂s = Σ_g dŴ·q − Z·Σ_g dŴ, ∂Z = −s·Σ_g dŴ. Saves only q, s, Z; ~4x cheaper on the CPU
    than autograd through ``grid.dequantize`` of the packed codes.
    """

    @staticmethod
    def forward(ctx, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
        ctx.save_for_backward(codes, s, z)
        with torch.autocast(codes.device.type, enabled=False):
            w = torch.addcmul((-s * z).unsqueeze(-1), codes, s.unsqueeze(-1))  # (out, G, g) fp32
        return w.flatten(1).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, s, z = ctx.saved_tensors
        g = grad.float().view(codes.shape)  # (out, G, g)
        g_sum = g.sum(-1)
        ds = torch.linalg.vecdot(g, codes.float()) - z * g_sum if ctx.needs_input_grad[1] else None
        dz = -s * g_sum if ctx.needs_input_grad[2] else None
        return None, ds, dz, None


class _TrainableQuantLinear(nn.Module):
    """Stands in for a QuantLinear while training: fp32 master s, Z (``nn.Parameter``s) and unpacked codes."""

    def __init__(self, layer: QuantLinear, train_scales: bool, train_zeros: bool) -> None:
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: its fp16 buffers stay out of this module's state
        self.codes = layer.codes().view(layer.out_features, -1, layer.group_size)  # (out, G, g) uint8
        self.scales = nn.Parameter(layer.scales.detach().float(), requires_grad=train_scales)
        self.zeros = nn.Parameter(layer.zeros.detach().float(), requires_grad=train_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = self.layer.bias
        w = _Dequantize.apply(self.codes, self.scales, self.zeros, dtype)  # (out, in)
        return F.linear(x, w, None if bias is None else bias.to(dtype))


class MasterWeights:
    """fp32 master ``nn.Parameter``s of the trained tensors, installed in the model while training.

    Each QuantLinear is replaced by a ``_TrainableQuantLinear`` holding masters of its s and Z. A trained
    norm's ``weight`` is replaced by an fp32 master; if the model is not fp32, a forward hook casts the norm's
    output back to its input dtype. ``finish`` writes the trained values into the original tensors (fp16 s, Z
    through ``grid.to_storage``) and puts the originals back; ``restore`` puts them back untouched.
    """

    def __init__(self, model: nn.Module, train_scales: bool = True, train_zeros: bool = True,
                 train_norms: bool = False) -> None:
        self.model = model
        self.layers = {name: _TrainableQuantLinear(layer, train_scales, train_zeros)
                       for name, layer in quantized_linears(model)}
        for name, trainable in self.layers.items():
            _set_submodule(model, name, trainable)
        self.norms: list[tuple[nn.Module, nn.Parameter, nn.Parameter]] = []
        self._hooks = []
        for norm in norm_modules(model) if train_norms else []:
            original = norm.weight
            norm.weight = nn.Parameter(original.detach().float().clone())
            self.norms.append((norm, original, norm.weight))
            if original.dtype != torch.float32:
                self._hooks.append(norm.register_forward_hook(_cast_output_like_input))
        if not self.parameters():
            raise ModelError("nothing to train: the student has no QuantLinear layers (or norms)")

    def parameters(self) -> list[nn.Parameter]:
        quant = [p for t in self.layers.values() for p in (t.scales, t.zeros) if p.requires_grad]
        return quant + [master for _, _, master in self.norms]

    @torch.no_grad()
    def project(self) -> None:
        """Keep every scale a positive normal fp16 number (storable); called after each optimizer step."""
        for t in self.layers.values():
            t.scales.clamp_(min=grid.MIN_SCALE)

    @torch.no_grad()
    def finish(self) -> None:
        """Write the trained values into the original tensors, then ``restore``."""
        for t in self.layers.values():
            s, z = grid.to_storage(t.scales, t.zeros)
            t.layer.scales.copy_(s)
            t.layer.zeros.copy_(z)
        for _, original, master in self.norms:
            original.copy_(master)
        self.restore()

    def restore(self) -> None:
        """Put the original QuantLinears and norm weights back and remove the hooks."""
        for name, trainable in self.layers.items():
            _set_submodule(self.model, name, trainable.layer)
        for norm, original, _ in self.norms:
            norm.weight = original
        for hook in self._hooks:
            hook.remove()
        self.layers, self.norms, self._hooks = {}, [], []


def _cast_output_like_input(module: nn.Module, args: tuple, output: Any) -> Any:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that look like RMSNorm/LayerNorm: class name ending in ``Norm``, a 1-d ``weight`` parameter."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith("norm")
            and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1]


# --------------------------------------------------------------------------------------- model plumbing
class _Checkpointed(nn.Module):
    """Runs a decoder layer under torch.utils.checkpoint (its activations are recomputed in backward)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str) -> Any:  # e.g. ``attention_type`` read by the model's forward
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


@contextmanager
def layer_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Wrap every decoder layer in ``_Checkpointed`` for the duration of the block."""
    if not enabled:
        yield
        return
    layers = decoder_layers(model)  # adapters.find_stack wants nn.Linear blocks; these hold QuantLinears
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Checkpointed(layer)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state after the final norm, (B, T, H): the base model's output, no lm_head."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def lm_head(model: nn.Module, head: nn.Module | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (…, H) → logits (…, V) through ``head`` (default: the model's lm_head), with the model's final logit
    soft-capping if it has one (Gemma 2)."""
    head = head if head is not None else model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no lm_head; use loss='mse'")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head if not cap else (lambda h: torch.tanh(head(h) / cap) * cap)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where it is native (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if COMPUTE_DTYPES[name] is not None:
        return COMPUTE_DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32


# ----------------------------------------------------------------------------------------------- training
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
                   heads: tuple[Callable, Callable] | None, autocast: Any) -> float:
    """Forward the student on ``ids`` (B, T), back-propagate the loss against ``target`` h_T; return it."""
    with autocast:
        hidden = final_hidden(student, ids)  # (B, T, H)
    if config.loss == "kl":
        return _kl_backward(hidden, target, *heads, config.kl_chunk, autocast)
    loss = F.mse_loss(hidden.float(), target)
    loss.backward()
    return loss.item()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
    from tqdm.auto import tqdm

    config = config or DistillConfig()
    if student is teacher:
        raise ConfigError("the student and the teacher must be different models")
    if tokens.dim() != 2 or len(tokens) < 1 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise ConfigError(f"tokens must be an integer tensor (n, seqlen >= 2), got {tuple(tokens.shape)}")
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(student.parameters()).device
    dtype = resolve_compute_dtype(config.compute_dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    history = DistillHistory(compute_dtype=str(dtype).removeprefix("torch."))
    n, bsz = len(tokens), config.batch_size
    steps_per_epoch = math.ceil(n / bsz)
    total_steps = steps_per_epoch * config.epochs
    warmup = math.ceil(config.warmup_ratio * total_steps)

    teacher_home = next(teacher.parameters()).device
    teacher.to(device)
    targets, heads = None, None
    if config.cache_teacher:
        try:
            targets = teacher_targets(teacher, tokens, bsz, device, autocast, progress)  # (n, T, H) CPU
            if config.loss == "kl":
                heads = lm_head(student), lm_head(teacher, copy.deepcopy(teacher.get_output_embeddings()))
        finally:
            teacher.to(teacher_home)
        history.teacher_seconds = round(time.perf_counter() - start, 3)
    elif config.loss == "kl":
        heads = lm_head(student), lm_head(teacher)

    student.to(device)
    was_training = student.training
    student.eval()
    grad_flags = {p: p.requires_grad for p in student.parameters()}
    for p in grad_flags:
        p.requires_grad_(False)
    masters = MasterWeights(student, config.train_scales, config.train_zeros, config.train_norms)
    params = masters.parameters()
    history.trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    generator = torch.Generator().manual_seed(config.seed)
    ok = False
    try:
        bar = tqdm(total=total_steps, desc=f"distill ({config.loss})", disable=not progress)
        with layer_checkpointing(student, config.gradient_checkpointing), bar:
            for step in range(total_steps):
                t_step = time.perf_counter()
                if step % steps_per_epoch == 0:
                    order = torch.randperm(n, generator=generator)
                idx = order[(step % steps_per_epoch) * bsz :][:bsz]
                ids = tokens[idx].to(device)  # (B, T)
                if targets is not None:
                    target = targets[idx].to(device)  # (B, T, H) fp32
                else:
                    with torch.no_grad(), autocast:
                        target = final_hidden(teacher, ids).float()
                lr = config.lr * _lr_factor(step, total_steps, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss = _loss_backward(student, ids, target, config, heads, autocast)
                if not math.isfinite(loss):
                    raise ModelError(f"distillation loss became {loss} at step {step}; lower the lr")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
                optimizer.step()
                masters.project()
                history.loss.append(loss)
                history.lr.append(lr)
                history.grad_norm.append(grad_norm)
                history.seconds.append(round(time.perf_counter() - t_step, 4))
                bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}")
                bar.update(1)
        ok = True
    finally:
        if ok:
            masters.finish()
        else:
            masters.restore()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        student.train(was_training)
        if not config.cache_teacher:
            teacher.to(teacher_home)
    history.total_seconds = round(time.perf_counter() - start, 3)
    log.info("distilled %d steps in %.1f s: loss %.4g -> %.4g", total_steps, history.total_seconds,
             history.loss[0], history.loss[-1])
    return history


__all__ = ["DistillConfig", "DistillHistory", "MasterWeights", "distill", "final_hidden", "norm_modules",
           "teacher_targets"]
