"""Quantization spread over processes with torch.distributed (``torchrun --nproc-per-node N neuqi quantize ...``).

``Dist`` is what the layer loop (``walker``) and the streaming run (``stream``) need from a process group:

* calibration batches: rank r of W holds the global batches r, r + W, r + 2W, ... (``batch_ids``);
* Hessians: at step t every rank computes the fp32 Gram matrix of its batch tW + r (zeros past the end), the W
  matrices are all-gathered and every rank adds them to its fp64 sum in rank order: the additions of one process,
  in the same order, so H is bit-identical to the single-process H (``add_in_order``);
* each linear: rank r fits and solves the output rows ``rows(out)`` (a contiguous block; NeUQI's search and
  GPTQ/LDLQ are row-independent given H, and the act-order permutation comes from diag(H), which every rank
  has); Ŵ, s and Z are all-gathered (``gather_rows``); the recorded losses are the rank-order sums of the
  per-rank losses (equal to the single-process ones up to fp summation order);
* rank 0 writes the checkpoint; ``barrier`` orders the writes.

Backends: NCCL when the compute device is CUDA (each rank takes ``cuda:LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..errors import ConfigError

TIMEOUT = datetime.timedelta(hours=6)  # rank 0 merges the output while the others wait at a barrier


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    """This process's rank in a process group of ``world_size``; ``device`` computes, ``comm`` communicates."""

    rank: int
    world_size: int
    device: torch.device
    comm: torch.device

    @classmethod
    def init(cls, device: torch.device, init_method: str | None = None, rank: int = -1,
             world_size: int = -1) -> Dist:
        """Join the process group (from torchrun's environment unless given): NCCL for CUDA, else gloo."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                     timeout=TIMEOUT)
        comm = device if backend == "nccl" else torch.device("cpu")
        return cls(tdist.get_rank(), tdist.get_world_size(), device, comm)

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()

    def barrier(self) -> None:
        tdist.barrier()

    def batch_ids(self, n: int) -> list[int]:
        """The global batch indices this rank holds: rank, rank + W, ..."""
        if n < self.world_size:
            raise ConfigError(f"{n} calibration batches cannot be split over {self.world_size} processes: use more "
                              "samples or a smaller --batch-size, or fewer processes")
        return list(range(self.rank, n, self.world_size))

    def steps(self, n_local: int) -> int:
        """The largest local batch count over the ranks."""
        t = torch.tensor([n_local], device=self.comm)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def add_in_order(self, acc: torch.Tensor, gram: torch.Tensor | None) -> None:
        """acc (fp64) += the fp32 ``gram`` of every rank, in rank order (a rank without a batch sends zeros,
        which add exactly nothing)."""
        g = torch.zeros(acc.shape, dtype=torch.float32, device=self.comm) if gram is None else gram.to(self.comm)
        parts = [torch.empty_like(g) for _ in range(self.world_size)]
        tdist.all_gather(parts, g)
        for part in parts:
            acc.add_(part.to(acc.device))

    def sum_int(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=self.comm)
        tdist.all_reduce(t)
        return int(t.item())

    def _bounds(self, n: int, rank: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def rows(self, n: int) -> slice:
        """This rank's block of ``n`` output rows (sizes differ by at most one)."""
        return slice(*self._bounds(n, self.rank))

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The (n, ...) tensor whose row blocks ``rows(n)`` of every rank are ``t`` there; on ``t``'s device."""
        size = -(-n // self.world_size)
        padded = torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=self.comm)
        padded[: t.shape[0]] = t.to(self.comm)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        blocks = [p[: stop - start] for p, (start, stop) in
                  zip(parts, (self._bounds(n, r) for r in range(self.world_size)))]
        return torch.cat(blocks).to(t.device)

    def sum_floats(self, values: list[float | None]) -> list[float | None]:
        """Each value summed over the ranks in rank order (None stays None: it is None on every rank)."""
        t = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64, device=self.comm)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(parts, t)
        rows = [p.tolist() for p in parts]
        return [None if v is None else sum(r[i] for r in rows) for i, v in enumerate(values)]
