"""Dense bit packing of integer codes along the input dimension.

Layout (one rule for every width k in 2..8): each row of codes is read as one little-endian bit stream, code i
occupying bits [k·i, k·i + k) of the row; byte j of the packed row holds stream bits [8j, 8j + 8). So

    k = 2:  byte j = c[4j] | c[4j+1]<<2 | c[4j+2]<<4 | c[4j+3]<<6
    k = 4:  byte j = c[2j] | c[2j+1]<<4
    k = 8:  byte j = c[j]
    k = 3:  8 codes → 3 bytes (24 bits), no padding; likewise 5, 6, 7.

A row of ``in`` codes takes ``in·k/8`` bytes, so ``in`` must be a multiple of ``codes_per_unit(k)`` =
8 / gcd(k, 8) (4 for k = 2 and 6, 2 for k = 4, 1 for k = 8, 8 for odd k). Viewed as little-endian int32
words, the same stream is GPTQ's packing (see neuqi.export).
"""

from __future__ import annotations

from math import gcd

import torch

from ..errors import ConfigError
from ..quant.grid import check_bits


def codes_per_unit(bits: int) -> int:
    """Smallest number of codes that fill whole bytes: 8 / gcd(bits, 8)."""
    return 8 // gcd(check_bits(bits), 8)


def packed_width(in_features: int, bits: int) -> int:
    """Packed bytes per row, in·bits/8; raises ConfigError if ``in_features`` does not fill whole bytes."""
    unit = codes_per_unit(bits)
    if in_features % unit != 0:
        raise ConfigError(
            f"{bits}-bit packing needs the input width to be a multiple of {unit}, got {in_features}"
        )
    return in_features * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(…, in) integer codes in [0, 2^bits) → (…, in·bits/8) uint8, laid out as in the module docstring."""
    n = codes.shape[-1]
    width = packed_width(n, bits)
    if codes.is_floating_point():
        raise ConfigError(f"codes must be an integer tensor, got {codes.dtype}")
    unit = codes_per_unit(bits)  # codes per unit; a unit is nbytes = unit·bits/8 ≤ 7 bytes, fits in int64
    nbytes = unit * bits // 8
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // unit, unit)
    if c.numel() and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ConfigError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    shifts = torch.arange(unit, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (…, n/unit, 1): the unit's bits as one integer
    byte_shifts = torch.arange(nbytes, device=codes.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF  # (…, n/unit, nbytes)
    return out.to(torch.uint8).reshape(*codes.shape[:-1], width)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack``: (…, in·bits/8) uint8 → (…, in) uint8 codes."""
    width = packed_width(in_features, bits)
    if packed.dtype != torch.uint8 or packed.shape[-1] != width:
        raise ConfigError(
            f"packed {bits}-bit codes for {in_features} inputs must be uint8 with last dim {width}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.clone()
    unit = codes_per_unit(bits)
    nbytes = unit * bits // 8
    if nbytes == 1:  # k = 2, 4: cheap path on uint8
        shifts = torch.arange(unit, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], in_features)
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], width // nbytes, nbytes)
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(unit, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], in_features)
