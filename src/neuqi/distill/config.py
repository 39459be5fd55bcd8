"""Distillation settings (``DistillConfig``, validated, JSON round-trip) and what a run measured
(``DistillHistory``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..pipeline.config import check_positive_int

LOSSES = ("mse", "kl")
COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
CONFIG_VERSION = 1


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings; the optimizer, schedule and data follow the reference (spec §6). The loss does not:
    the KL of the logits beats the reference's MSE on the final hidden states on every SmolLM2 setting measured
    (README "Distillation"). ``nsamples``, ``seqlen``, ``seed`` and ``avoid_calibration_overlap`` say which windows
    the CLI samples; ``distill`` uses the tokens given."""

    loss: str = field(default="kl", metadata={"help": "kl: KL(teacher||student) on the logits; mse: final hidden "
                                              "states (the reference's loss)", "choices": LOSSES})
    lr: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate"})
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warmup fraction, then cosine to 0"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "global grad-norm clip"})
    batch_size: int = field(default=1, metadata={"help": "windows per optimizer step"})
    epochs: int = field(default=1, metadata={"help": "passes over the windows"})
    nsamples: int = field(default=256, metadata={"help": "distillation windows"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per window"})
    seed: int = field(default=0, metadata={"help": "window sampling and shuffling seed"})
    train_scales: bool = True
    train_zeros: bool = True
    train_norms: bool = field(default=True, metadata={"help": "also train the norm weights (as the reference "
                                                      "does)"})
    compute_dtype: str = field(default="auto", metadata={"help": "autocast dtype (auto: bf16 where native, else "
                                                         "fp32); the master copies are fp32",
                                                         "choices": tuple(COMPUTE_DTYPES)})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer in "
                                                                   "backward (large models on one GPU)"})
    cache_teacher: bool = field(default=True, metadata={"help": "precompute the teacher's outputs on the CPU "
                                                        "instead of running it every step", "flag": "--teacher-cache"})
    kl_chunk: int = field(default=1024, metadata={"help": "positions per logits chunk for the kl loss"})
    avoid_calibration_overlap: bool = field(default=True, metadata={
        "help": "exclude every document sharing a 16-token run with the calibration windows"})
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
        for name in ("batch_size", "epochs", "nsamples", "kl_chunk"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("seqlen", self.seqlen, minimum=2)
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

    def add_step(self, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        self.loss.append(loss)
        self.lr.append(lr)
        self.grad_norm.append(grad_norm)
        self.seconds.append(round(seconds, 4))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where it is native (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if COMPUTE_DTYPES[name] is not None:
        return COMPUTE_DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32
