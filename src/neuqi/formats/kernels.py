"""Fast forward paths for QuantLinear: torch's int4 weight-only matmul, and a cheaper exact dequantization.

Two paths, chosen per call by ``QuantLinear.forward`` (``kernel="auto"``):

* **int4** (bits ≤ 4, bf16 activations, ≤ INT4_MAX_ROWS rows: decode). PyTorch's tinygemm-style kernels
  (CPU: ``aten._weight_int4pack_mm_for_cpu``; CUDA: ``aten._weight_int4pack_mm``) compute x·Wᵀ with

      w = (q − 8)·scale + zero,   per group of g ∈ {32, 64, 128, 256} input columns,

  so our ŵ = s·(q − Z) maps over exactly with scale = s and zero = s·(8 − Z) (exact in fp32). A 2- or 3-bit code
  is also a 4-bit code, so every k ≤ 4 runs through the same kernel; its codes are shifted per group towards the
  middle of [0, 15] so that the zero stays small (see ``build_int4``). The kernel takes (scale, zero) in the
  activation dtype, bf16 here: both are rounded to bf16 (2^-9 relative), the same order as the reference path's
  rounding of ŵ to bf16, and y is rounded to bf16 as any bf16 matmul's. Its layout (4 bits per weight, plus
  (G, N, 2) scales/zeros) is built on first use and held outside the state dict, so checkpoints do not change;
  it is dropped on any cast or device move.
* **dequant** (everything else: prefill, fp32, shapes the kernel refuses). ŵ = s·(q − Z) evaluated in fp32
  exactly as ``grid.dequantize`` (bit-identical), with a faster unpack (int32 words instead of int64 sums or
  uint8 broadcasts) and in-place group arithmetic, then one cast and a dense matmul. Nothing is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)
# The int4 kernel's cost grows with the rows (~0.035 ms per row for a 1536 × 576 layer, one AMD EPYC thread), the
# dequantize-then-matmul path's barely (~2.5-4.5 ms): they cross near 100 rows.
INT4_MAX_ROWS = 64


@dataclass(frozen=True)
class Int4Weight:
    """A layer's weight in the int4 kernel's layout (device and activation dtype fixed at build time).

    packed: CPU uint8 (N, K/2) / CUDA int32 (N/8, K/(16·t), 32, t/2), opaque;  scale_zero: (G, N, 2) in ``dtype``.
    """

    packed: torch.Tensor
    scale_zero: torch.Tensor
    group_size: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes


def int4_unsupported(
    out_features: int, in_features: int, bits: int, group_size: int, device: torch.device, dtype: torch.dtype
) -> str | None:
    """Why the int4 kernel cannot run this layer (None if it can)."""
    if bits > 4:
        return f"{bits}-bit codes do not fit 4 bits"
    if group_size not in INT4_GROUP_SIZES:
        return f"group size {group_size} is not one of {INT4_GROUP_SIZES}"
    if device.type == "cpu":
        if dtype != torch.bfloat16:  # measured: fp32 and fp16 run 20-40x slower than bf16 in torch 2.13
            return f"the CPU kernel is only fast for bf16 activations, got {dtype}"
        if out_features % 16:
            return f"the CPU kernel needs out_features % 16 == 0, got {out_features}"
        return None
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"the CUDA kernel takes bf16 activations, got {dtype}"
        if out_features % 8 or in_features % 32:
            return f"the CUDA kernel needs out % 8 == 0 and in % 32 == 0, got ({out_features}, {in_features})"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA kernel needs compute capability ≥ 8.0"
        return None
    return f"no int4 kernel for device {device.type}"


def build_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype,
    bits: int = 4,
) -> Int4Weight:
    """Int4Weight from uint8 codes (N, K) in [0, 2^bits) and fp16 (s, Z) of shape (N, G).

    A k-bit code leaves 15 − M (M = 2^k − 1) spare values in 4 bits: each group's codes are shifted by
    c = clamp(round(8 − Z), 0, 15 − M), so that (q + c − 8)·s + zero with zero = s·(8 − c − Z) is s·(q − Z) and
    |8 − c − Z| ≤ 1/2 when Z ∈ [M − 7.5, 8.5]. The kernel rounds zero and s to bf16 (2^-9 relative), so the shift
    turns a zero-point error of up to |8 − Z|·s·2^-9 (≈ 6.5·s·2^-9 at 2 bits) into at most s·2^-10.
    """
    n, k = codes.shape
    s, z = scales.float(), zeros.float()
    shift = (8 - z).round().clamp(0, 15 - (2**bits - 1))  # (N, G) c per group
    shifted = (codes.view(n, -1, group_size).to(torch.int32) + shift.to(torch.int32).unsqueeze(-1)).view(n, k)
    scale_zero = torch.stack([s, s * (8 - shift - z)], -1).transpose(0, 1).contiguous().to(dtype)  # (G, N, 2)
    if shifted.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(shifted, 1)
    else:  # CUDA takes two codes per byte, the even column in the high nibble
        q8 = shifted.to(torch.uint8)
        pairs = (q8[:, ::2] << 4) | q8[:, 1::2]
        tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
    return Int4Weight(packed, scale_zero, group_size, dtype)


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x·Ŵᵀ for x (M, K) in ``w.dtype`` → (M, N)."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group_size, w.scale_zero)
    return torch.ops.aten._weight_int4pack_mm(x, w.packed, w.group_size, w.scale_zero)


def unpack_fast(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """neuqi.packing.unpack for k ∈ {2, 3, 4, 8}, returning int32 codes (…, in) (int32 shifts vectorise well)."""
    mask = (1 << bits) - 1
    if bits == 8:
        return packed.to(torch.int32)
    if bits in (2, 4):  # whole codes per little-endian int32 word (rows are ≥ 4-byte multiples when in % 16 == 0)
        per = 32 // bits
        if packed.shape[-1] % 4 == 0:
            words = packed.view(torch.int32)
        else:
            words = packed.to(torch.int32)
            per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
        return ((words.unsqueeze(-1) >> shifts) & mask).reshape(*packed.shape[:-1], in_features)
    if bits == 3:  # 3 bytes → one 24-bit word → 8 codes
        b = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 3
        return ((word.unsqueeze(-1) >> shifts) & mask).reshape(*packed.shape[:-1], in_features)
    raise ValueError(f"unpack_fast handles 2, 3, 4, 8 bits, got {bits}")


def dequantize_fast(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """Ŵ = s·(q − Z) in fp32, shape (out, in), bit-identical to ``grid.dequantize`` (same two fp32 roundings)."""
    out_features, n_groups = scales.shape
    w = unpack_fast(qweight, bits, in_features).to(torch.float32).view(out_features, n_groups, group_size)
    w.sub_(zeros.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1))
    return w.view(out_features, in_features)
