"""Scoped oneDNN matmul precision for the Hessian products XᵀX of bf16 activations on the CPU.

With ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, an fp32 matmul on the CPU rounds its inputs to bf16
and accumulates in fp32. For X holding bf16 values (a bf16 model's activations, converted to fp32), the rounding
is exact and bf16·bf16 products are exact in fp32, so XᵀX equals the fp32 product up to summation order, about
twice as fast. The flag is process-wide state: ``bf16_gram_precision`` sets it once for a block and restores it.
Every fp32 matmul inside the block is affected, so the block must hold only products of bf16-valued tensors
(the Hessian accumulation of a bf16 layer), never the solvers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _matmul_flags():
    """``torch.backends.mkldnn.matmul`` when this torch has the ``fp32_precision`` flag, else None."""
    flags = getattr(torch.backends.mkldnn, "matmul", None)
    return flags if hasattr(flags, "fp32_precision") else None


def bf16_gram_applies(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``bf16_gram_precision`` changes anything for activations of ``dtype`` on ``device``."""
    return dtype == torch.bfloat16 and torch.device(device).type == "cpu" and _matmul_flags() is not None


@contextmanager
def bf16_gram_precision(enabled: bool = True) -> Iterator[bool]:
    """Within the block, CPU fp32 matmuls take bf16 inputs with fp32 accumulation; yields whether it is on.

    ``enabled=False`` (e.g. ``bf16_gram_applies(x.dtype, x.device)`` is false) or a torch without the flag: a
    no-op that yields False. The previous setting is restored on exit, also on an exception.
    """
    flags = _matmul_flags() if enabled else None
    if flags is None:
        yield False
        return
    previous = flags.fp32_precision
    flags.fp32_precision = "bf16"
    try:
        yield True
    finally:
        flags.fp32_precision = previous


__all__ = ["bf16_gram_applies", "bf16_gram_precision"]
