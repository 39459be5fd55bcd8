"""The uniform quantization grid with a real-valued zero-point (spec §1).

One convention, used everywhere in neuqi. For k bits, M = 2^k − 1, a weight ``w`` in a group with
scale ``s > 0`` and zero-point ``Z`` (any real number) is stored as the integer code and read back as

    q = clamp(round(w / s + Z), 0, M)        # torch.round: ties to even
    ŵ = s · (q − Z)

so the grid of one group is {−s·Z, s·(1 − Z), …, s·(M − Z)}. A *group* is ``group_size`` consecutive input columns of
one output row; ``group_size = -1`` means one group per row (channel-wise). ``scale`` and ``zero_point`` have shape
``(out, n_groups)`` with ``n_groups = in // group_size``.

(The reference code's internal offset is z = −Z; neuqi only ever uses Z.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, WeightError

MIN_BITS, MAX_BITS = 2, 8
# Smallest scale we store: the smallest positive *normal* fp16 number, so s survives the fp16 round trip exactly.
MIN_SCALE = 2.0**-14
FP16_MAX = torch.finfo(torch.float16).max  # 65504


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise ConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int ≥ ``minimum`` (bools refused), else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def max_code(bits: int) -> int:
    """M = 2^bits − 1, the largest code."""
    return (1 << check_bits(bits)) - 1


def resolve_group_size(in_features: int, group_size: int) -> int:
    """Return the effective group size: ``in_features`` for -1, else ``group_size`` if it divides ``in_features``."""
    if group_size == -1:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ConfigError(f"group_size must be a positive integer or -1 (channel-wise), got {group_size!r}")
    if in_features % group_size != 0:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        hint = f"; sizes that divide it: {divisors}" if divisors else "; use -1 (channel-wise)"
        raise ConfigError(f"group_size {group_size} does not divide the input width {in_features}{hint}")
    return group_size


def check_finite(tensor: torch.Tensor, name: str = "weight", limit: float | None = FP16_MAX) -> None:
    """Raise WeightError if ``tensor`` holds NaN or Inf, or a magnitude above ``limit``.

    The default limit is the fp16 range, the most the stored scales and zero-points can reach: a larger weight would
    be stored clamped, i.e. wrong. ``limit=None`` checks finiteness only.
    """
    with torch.no_grad():
        finite = torch.isfinite(tensor)
        if not finite.all():
            bad = (~finite).sum().item()
            raise WeightError(f"{name} has {bad} NaN/Inf values; neuqi cannot quantize it")
        top = tensor.abs().max().item() if tensor.numel() else 0.0
    if limit is not None and top > limit:
        raise WeightError(
            f"{name} has values up to {top:.3g}, beyond ±{limit:.0f} (the fp16 range of the stored scales and "
            "zero-points); neuqi cannot quantize it"
        )


def check_params(shape: torch.Size | tuple[int, int], scale: torch.Tensor, zero_point: torch.Tensor,
                 group_size: int) -> None:
    """ConfigError unless ``scale`` and ``zero_point`` fit a weight of ``shape`` (out, in): both of shape
    (out, in // group_size), every scale finite and > 0, every zero-point finite."""
    if len(shape) != 2:
        raise ConfigError(f"the weight must be 2-D (out, in), got shape {tuple(shape)}")
    expected = (shape[0], shape[1] // resolve_group_size(shape[1], group_size))
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if tuple(t.shape) != expected:
            raise ConfigError(
                f"{name} has shape {tuple(t.shape)}, expected (out, in / group_size) = {expected} for a weight "
                f"{tuple(shape)} with group_size {group_size}"
            )
    with torch.no_grad():
        if not (torch.isfinite(scale) & (scale > 0)).all():
            raise ConfigError(f"scales must be finite and > 0, got min {scale.min().item():.3g} (or NaN/Inf)")
        if not torch.isfinite(zero_point).all():
            raise ConfigError("zero-points must be finite, got NaN/Inf")


def to_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) → (out, n_groups, g) view of consecutive input columns."""
    out_features, in_features = weight.shape
    g = resolve_group_size(in_features, group_size)
    return weight.reshape(out_features, in_features // g, g)


def expand_params(param: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """(out, n_groups) → (out, in): each group's value repeated over its columns."""
    g = resolve_group_size(in_features, group_size)
    return param.repeat_interleave(g, dim=1)


def _quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: int = -1
) -> torch.Tensor:
    """``quantize`` without the input checks: the kernel for callers that validated once (hot loops)."""
    m = max_code(bits)
    w = to_groups(weight.float(), group_size)  # (out, G, g)
    q = torch.round(w / scale.float().unsqueeze(-1) + zero_point.float().unsqueeze(-1)).clamp_(0, m)
    return q.reshape(weight.shape).to(torch.uint8)


def _dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int = -1
) -> torch.Tensor:
    """``dequantize`` without the input checks; differentiable in ``scale`` and ``zero_point``."""
    q = to_groups(codes.float(), group_size)  # (out, G, g)
    w = scale.float().unsqueeze(-1) * (q - zero_point.float().unsqueeze(-1))
    return w.reshape(codes.shape)


def quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: int = -1
) -> torch.Tensor:
    """Integer codes q = clamp(round(w/s + Z), 0, M) as uint8, shape (out, in). Computed in fp32.

    Checks the shapes (``check_params``) and that ``weight`` is finite (WeightError)."""
    check_bits(bits)
    check_params(weight.shape, scale, zero_point, group_size)
    check_finite(weight, limit=None)
    return _quantize(weight.detach(), scale.detach(), zero_point.detach(), bits, group_size)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int = -1
) -> torch.Tensor:
    """ŵ = s·(q − Z) in fp32, shape (out, in); differentiable in ``scale`` and ``zero_point``. Checks the shapes."""
    check_params(codes.shape, scale, zero_point, group_size)
    return _dequantize(codes, scale, zero_point, group_size)


def fake_quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: int = -1
) -> torch.Tensor:
    """dequantize(quantize(w)): the weight as the quantized model sees it, fp32, shape (out, in). A plain tensor
    (no autograd history) unless ``scale``/``zero_point`` require gradients."""
    codes = quantize(weight, scale, zero_point, bits, group_size)
    return _dequantize(codes, scale, zero_point, group_size)


def to_storage(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round (scale, zero_point) to the fp16 values a checkpoint stores, returned as fp32.

    Codes must be chosen with these values so that the saved model dequantizes to what was evaluated (spec §11.5).
    A scale below MIN_SCALE is raised to it, so it stays a positive normal fp16 number. WeightError for a scale or
    zero-point that fp16 cannot hold (non-finite, or beyond ±65504: the weights are too large to store).
    """
    with torch.no_grad():
        for name, t in (("scale", scale), ("zero_point", zero_point)):
            bad = ~torch.isfinite(t) | (t.abs() > FP16_MAX)
            if bad.any():
                where = tuple(bad.nonzero()[0].tolist())
                value = t[where].item()
                why = "is not finite" if not math.isfinite(value) else (
                    f"does not fit fp16 storage (±{FP16_MAX:.0f}): the weights are too large, or a group too narrow "
                    "for its offset")
                raise WeightError(f"{name} {value:.3g} at (row, group) {where} {why}")
    s = scale.float().clamp(min=MIN_SCALE).half().float()
    z = zero_point.float().half().float()
    return s, z


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one linear: ``scale``, ``zero_point`` of shape (out, n_groups), fp32."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int  # -1 for channel-wise

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.scale.shape != self.zero_point.shape or self.scale.dim() != 2:
            raise ConfigError(
                f"scale {tuple(self.scale.shape)} and zero_point {tuple(self.zero_point.shape)} "
                "must both be (out, n_groups)"
            )

    def effective_group_size(self, in_features: int) -> int:
        return resolve_group_size(in_features, self.group_size)
